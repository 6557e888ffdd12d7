"""The README's first commands run as a test (Polygraphy style): what users paste must work.

    README.md ─first fenced block with `spa ...` lines─▶ commands ─sandbox─▶ subprocess, exit 0

A line like `pip install . && spa prune examples/tiny_resnet.onnx --ratio 0.5 -o x.onnx`
runs only its `spa ...` part (the package is already installed). Commands run from the
repository root so they see `examples/`, but everything they write goes to tmp_path:
`-o/--output/--save-plan` values are moved there, `spa prune` without `-o` gets the
default name inside tmp_path, and later commands reading those files are pointed there.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spa.cli import app as cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OUTPUT_DESTS = {"output", "save_plan"}  # options whose value is a file spa writes
INPUT_DESTS = {"model", "plan"}  # files spa reads (maybe written by an earlier command)

# ---------------------------------------------------------------- parsing the README


def code_blocks(markdown: str) -> list[list[str]]:
    """Lines of every fenced code block (``` or ~~~, any info string), in order."""
    blocks, current, fence = [], None, None
    for line in markdown.splitlines():
        stripped = line.strip()
        m = re.match(r"(`{3,}|~{3,})", stripped)
        if current is None and m:
            current, fence = [], m.group(1)
        elif current is not None and m and stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def spa_commands(block: list[str]) -> list[str]:
    """The `spa ...` commands of a block: continuations joined, prompts and `x && ` prefixes dropped."""
    text = re.sub(r"\s*\\\n\s*", " ", "\n".join(block))
    commands = []
    for line in text.splitlines():
        line = re.sub(r"^\s*[$>]\s+", "", line).strip()
        for part in re.split(r"\s*(?:&&|;|\|\|)\s*", line):
            if part.startswith("spa ") or part == "spa":
                commands.append(part)
    return commands


def readme_commands(markdown: str) -> list[str]:
    """Commands of the first fenced block that has any `spa` command ([] if none)."""
    for block in code_blocks(markdown):
        found = spa_commands(block)
        if found:
            return found
    return []


# ---------------------------------------------------------------- sandboxing the commands


def _options(command: str) -> dict[str, argparse.Action]:
    """{option string: action} of a subcommand, read from spa's own parser."""
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        return {}
    return {s: a for a in sub.choices[command]._actions for s in a.option_strings}


def _positional_dest(command: str) -> str | None:
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        return None
    pos = [a.dest for a in sub.choices[command]._actions if not a.option_strings]
    return pos[0] if pos else None


def _to_tmp(value: str, tmp: Path) -> str:
    """Where an output goes: the same relative path under tmp (absolute ones: their name)."""
    p = Path(value)
    target = tmp / (p.name if p.is_absolute() else p)
    target.parent.mkdir(parents=True, exist_ok=True)
    return str(target)


def _read_from(value: str, tmp: Path) -> str:
    """An input written by an earlier command lives under tmp; anything else stays as given."""
    p = Path(value)
    return str(tmp / p) if not p.is_absolute() and (tmp / p).exists() else value


def sandbox(command: str, tmp: Path) -> list[str]:
    """argv for `command` with every file it writes moved under `tmp`."""
    argv = shlex.split(command, comments=True)
    assert argv and argv[0] == "spa", command
    sub = next((a for a in argv[1:] if not a.startswith("-")), None)
    opts, positional = _options(sub), _positional_dest(sub)
    out, seen, i, model = [argv[0]], {}, 1, None
    while i < len(argv):
        tok = argv[i]
        name, eq, inline = tok.partition("=")
        if tok.startswith("-o") and len(tok) > 2 and not tok.startswith("--"):
            name, eq, inline = "-o", "=", tok[2:]
        action = opts.get(name) if tok.startswith("-") else None
        if action is not None and action.nargs != 0:
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if eq else 2
            seen[action.dest] = True
            if action.dest in OUTPUT_DESTS:
                value = _to_tmp(value, tmp)
            elif action.dest in INPUT_DESTS:
                value = _read_from(value, tmp)
            out += [name, value]
            continue
        if not tok.startswith("-") and tok != sub and positional and model is None:
            model = tok
            tok = _read_from(tok, tmp) if positional in INPUT_DESTS else tok
        out.append(tok)
        i += 1
    if sub == "prune" and "output" not in seen and model is not None:  # default: MODEL.pruned.onnx beside it
        src = Path(model)
        out += ["-o", _to_tmp(str(src.with_name(src.stem + ".pruned.onnx")), tmp)]
    return out


def spa_exe() -> str:
    beside = Path(sys.executable).with_name("spa")
    return str(beside) if beside.exists() else (shutil.which("spa") or pytest.skip("no `spa` console script"))


def _repo_state() -> dict:
    """Files at the top of the repo and in examples/ (what a stray output would land in)."""
    return {str(p.relative_to(ROOT)): p.stat().st_mtime_ns
            for p in [*ROOT.iterdir(), *(ROOT / "examples").rglob("*")] if p.is_file()}


def run_commands(commands: list[str], tmp: Path) -> None:
    before = _repo_state()
    for command in commands:
        argv = sandbox(command, tmp)
        proc = subprocess.run([spa_exe(), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, (
            f"README command failed (exit {proc.returncode}): {command}\n"
            f"ran as: {shlex.join(argv)}\nstderr:\n{proc.stderr[-3000:]}")
        assert "Traceback" not in proc.stderr, proc.stderr
    assert _repo_state() == before, "a README command wrote into the repository"


# ---------------------------------------------------------------- tests


def test_readme_first_commands(tmp_path):
    if not README.is_file():
        pytest.skip(f"{README} does not exist yet")
    commands = readme_commands(README.read_text())
    if not commands:
        pytest.skip("README.md has no fenced code block with a `spa ...` command")
    run_commands(commands, tmp_path)


SAMPLE = """\
# spa

Some words.

```
pip install . && spa prune examples/tiny_resnet.onnx --ratio 0.5 -o tiny_resnet.pruned.onnx
spa analyze tiny_resnet.pruned.onnx \\
    --json
$ spa prune examples/tiny_resnet.onnx --ratio=0.25 --save-plan plans/p.json  # default output name
spa prune examples/tiny_resnet.onnx --plan plans/p.json -oout/again.onnx
```

```bash
spa this-block-is-never-run
```
"""


def test_parser_and_sandbox_on_a_sample_readme(tmp_path):
    """The harness itself, so it is known to work before README.md exists."""
    commands = readme_commands(SAMPLE)
    assert commands == [
        "spa prune examples/tiny_resnet.onnx --ratio 0.5 -o tiny_resnet.pruned.onnx",
        "spa analyze tiny_resnet.pruned.onnx --json",
        "spa prune examples/tiny_resnet.onnx --ratio=0.25 --save-plan plans/p.json  # default output name",
        "spa prune examples/tiny_resnet.onnx --plan plans/p.json -oout/again.onnx",
    ]
    first = sandbox(commands[0], tmp_path)
    assert first == ["spa", "prune", "examples/tiny_resnet.onnx", "--ratio", "0.5",
                     "-o", str(tmp_path / "tiny_resnet.pruned.onnx")]
    third = sandbox(commands[2], tmp_path)
    assert third[-4:] == ["--save-plan", str(tmp_path / "plans" / "p.json"),
                          "-o", str(tmp_path / "examples" / "tiny_resnet.pruned.onnx")]
    run_commands(commands, tmp_path)
    assert (tmp_path / "tiny_resnet.pruned.onnx").is_file()
    assert (tmp_path / "examples" / "tiny_resnet.pruned.onnx").is_file()
    assert (tmp_path / "out" / "again.onnx").read_bytes() == (tmp_path / "examples" / "tiny_resnet.pruned.onnx").read_bytes()


def test_no_spa_block_means_no_commands():
    assert readme_commands("# title\n\n```python\nimport spa\n```\n") == []
    assert readme_commands("no code at all") == []


def readme_python(markdown: str, heading: str = "## Python API") -> str:
    """The first ```python block after `heading` (what the README shows Python users)."""
    section = markdown[markdown.index(heading):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_readme_python_api_runs(tmp_path):
    """The README's Python API section, run as written (in a folder that has examples/)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    code = readme_python(README.read_text())
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tiny_resnet.small.onnx").is_file() and (tmp_path / "tiny_resnet.compressed.onnx").is_file()
    assert "'int8'" in done.stdout  # the compress stages were printed
    assert "spa.cli" not in code

"""Hostile inputs (issue 18, first classes): outputs never clobber what a command reads or a
non-regular file, special files are refused before reading, non-finite data is refused, and a
SIGTERM during saving leaves nothing behind. Each case: exit code, one `error:` line, no
traceback, no new file, every input byte-identical."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile

import numpy as np
import pytest

from tests.test_cli import EXAMPLE, assert_untouched, snapshot, spa


@pytest.fixture
def work(tmp_path, monkeypatch):
    """m.onnx (the bundled example), calib.npz, bad.npz (one NaN), plan.json; the cwd. TMPDIR is
    tmp/ inside it, so a snapshot of the folder also sees temporary files left behind."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    shutil.copy(EXAMPLE, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    x[1, 2, 3, 4] = np.nan
    np.savez(tmp_path / "bad.npz", input=x)
    (tmp_path / "plan.json").write_text(json.dumps({"schema_version": 1, "groups": {}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_error(res, code: int = 1) -> str:
    assert res.rc == code, res
    assert len(res.error_lines) == 1 and "Traceback" not in res.err, res.err
    assert res.out == ""
    return res.error_lines[0]


@pytest.mark.parametrize("argv", [
    ["quantize", "m.onnx", "--calib", "calib.npz", "-o", "calib.npz"],
    ["sparsify", "m.onnx", "--method", "obs", "--calib", "calib.npz", "-o", "calib.npz"],
    ["prune", "m.onnx", "--plan", "plan.json", "-o", "plan.json"],
    ["prune", "m.onnx", "--ratio", "0.3", "--criterion", "obspa", "--calib", "calib.npz", "-o", "calib.npz"],
    ["prune", "m.onnx", "--ratio", "0.3", "--save-plan", "calib.npz", "--calib", "calib.npz", "--criterion", "apoz"],
    ["bench", "m.onnx", "-o", "m.onnx"],
    ["compress", "m.onnx", "--int8", "--calib", "calib.npz", "-o", "calib.npz"],
    ["sensitivity", "m.onnx", "--calib", "calib.npz", "--plot", "calib.npz"],
], ids=["quantize-calib", "sparsify-calib", "prune-plan", "prune-calib", "save-plan-calib", "bench-model",
        "compress-calib", "plot-calib"])
def test_an_output_never_names_an_input(capsys, work, argv):
    before = snapshot(work)
    line = one_error(spa(capsys, *argv))
    assert "refusing to write" in line
    assert_untouched(work, before)


def _special(folder):
    """A character device (as root) or else a FIFO: something that is not a regular file."""
    path = folder / "dev"
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
    except (PermissionError, OSError):
        os.mkfifo(path)
    return path


@pytest.mark.parametrize("argv", [
    ["prune", "m.onnx", "--ratio", "0.5", "-o", "dev"],
    ["quantize", "m.onnx", "--fp16", "-o", "dev"],
    ["bench", "m.onnx", "--duration-s", "0.01", "-o", "dev"],
])
def test_an_output_is_never_a_device_or_fifo(capsys, work, argv):
    special = _special(work)
    kind = stat.S_IFMT(special.lstat().st_mode)
    before = {p: p.read_bytes() for p in work.iterdir() if p.is_file()}
    line = one_error(spa(capsys, *argv))
    assert "not a regular file" in line
    assert stat.S_IFMT(special.lstat().st_mode) == kind  # still the device/FIFO, not replaced
    assert {p: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("argv", [
    ["analyze", "dev"],
    ["prune", "dev", "--ratio", "0.5", "-o", "out.onnx"],
    ["prune", "m.onnx", "--plan", "dev", "-o", "out.onnx"],
    ["quantize", "m.onnx", "--calib", "dev", "-o", "out.onnx"],
])
def test_special_files_are_refused_before_reading(capsys, work, argv):
    _special(work)
    before = snapshot(work)
    line = one_error(spa(capsys, *argv))  # a FIFO would hang and /dev/zero exhaust memory if read
    assert "not a regular file" in line
    assert_untouched(work, before)


@pytest.mark.parametrize("argv", [
    ["quantize", "m.onnx", "--calib", "bad.npz", "-o", "out.onnx"],
    ["prune", "m.onnx", "--ratio", "0.3", "--criterion", "mean-act", "--calib", "bad.npz", "-o", "out.onnx"],
    ["sparsify", "m.onnx", "--method", "obs", "--calib", "bad.npz", "-o", "out.onnx"],
    ["eval", "m.onnx", "--data", "bad.npz"],
])
def test_non_finite_data_is_refused_naming_the_key(capsys, work, argv):
    before = snapshot(work)
    line = one_error(spa(capsys, *argv))
    assert "non-finite" in line and "'input'" in line
    assert_untouched(work, before)


def test_non_finite_arrays_in_python_are_refused():
    import spa as spa_api

    x = np.full((2, 3, 32, 32), np.inf, np.float32)
    with pytest.raises(spa_api.SpaError, match="calib= holds .* non-finite"):
        spa_api.quantize(EXAMPLE, calib={"input": x})


def test_a_plan_nested_too_deep_is_one_line(capsys, work):
    (work / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    before = snapshot(work)
    line = one_error(spa(capsys, "prune", "m.onnx", "--plan", "deep.json", "-o", "out.onnx"))
    assert "plan" in line
    assert_untouched(work, before)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGINT", "exception"])
def test_an_interrupted_save_leaves_nothing(capsys, work, monkeypatch, how):
    """A signal (or a fault) arrives while the written temp file is being checked: the run unwinds
    like Ctrl-C, removes its temporaries, writes no output, and says so in one line."""
    from spa.core import checks

    real = checks.output_check

    def killed(*args, **kwargs):
        if how == "exception":
            raise RuntimeError("disk on fire")
        os.kill(os.getpid(), getattr(signal, how))
        return real(*args, **kwargs)

    monkeypatch.setattr("spa.passes.base.output_check", killed)
    before = snapshot(work)
    try:
        res = spa(capsys, "prune", "m.onnx", "--ratio", "0.5", "-o", "out.onnx")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    line = one_error(res)
    says = {"SIGINT": "interrupted;", "exception": "internal error (RuntimeError: disk on fire)"}
    assert says.get(how, f"interrupted ({how})") in line
    assert_untouched(work, before)


@pytest.mark.parametrize("argv, code, says", [
    (["prune", "m.onnx", "--ratio", "0.3", "--seed", "-1", "-o", "out.onnx"], 2, "invalid --seed -1"),
    (["compare", "m.onnx", "m.onnx", "--min-cosine", "2"], 2, "invalid --min-cosine 2.0"),
    (["bench", "m.onnx", "--duration-s", "nan"], 2, "duration"),
    (["analyze", "m.onnx", "--plan", "bad_plan.json"], 1, "plan names group 'nope:0'"),
])
def test_bad_values_are_refused_before_any_work(capsys, work, argv, code, says):
    """Values that used to run (or end in an internal error): one line, and on a non-terminal
    stderr nothing else: the step lines of a failed run are not shown."""
    (work / "bad_plan.json").write_text(json.dumps({"schema_version": 1, "groups": {"nope:0": [1]}}))
    before = snapshot(work)
    res = spa(capsys, *argv)
    line = one_error(res, code)
    assert says in line
    assert res.err.strip().splitlines() == [line]  # the error alone
    assert_untouched(work, before)


def test_a_successful_run_still_shows_its_steps_and_unmatched_excludes(capsys, work):
    res = spa(capsys, "prune", "m.onnx", "--ratio", "0.3", "--exclude", "head.*", "-o", "out.onnx")
    assert res.rc == 0, res.err
    assert "note: exclude pattern 'head.*' matches no node or weight name" in res.err
    assert "saving + checking:" in res.err  # held back on a pipe, shown once the command succeeded
    doc = json.loads(spa(capsys, "prune", "m.onnx", "--ratio", "0.3", "--exclude", "head.*", "-o", "out.onnx",
                         "--json").out)
    assert any("head.*" in n for n in doc["notes"])


def test_files_written_besides_the_model_are_announced(capsys, work):
    res = spa(capsys, "bench", "m.onnx", "--duration-s", "0.01", "--warmup-ms", "0", "-o", "bench.json")
    assert res.rc == 0 and "wrote bench.json" in res.err and (work / "bench.json").is_file()


def test_float64_data_is_cast_and_a_wrong_rank_is_one_line(capsys, work):
    """float64 arrays feed a float32 model (cast, as a user expects); an array without the sample
    axis is refused naming the key and both ranks (it used to surface as ONNX Runtime's message)."""
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32))  # float64
    np.savez(work / "c64.npz", input=x)
    np.savez(work / "rank.npz", input=x[0])
    np.savez(work / "zero_d.npz", input=np.float32(3.0))
    res = spa(capsys, "quantize", "m.onnx", "--calib", "c64.npz", "-o", "q.onnx", "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["fidelity_on_calib"]["samples"] == 4
    before = snapshot(work)
    for argv in (["eval", "m.onnx", "--data", "rank.npz"],
                 ["prune", "m.onnx", "--ratio", "0.3", "--criterion", "obspa", "--calib", "rank.npz", "-o", "o.onnx"]):
        line = one_error(spa(capsys, *argv))
        assert "array 'input' has rank 3" in line and "takes rank 4" in line
    for argv in (["eval", "m.onnx", "--data", "zero_d.npz"], ["sensitivity", "m.onnx", "--calib", "zero_d.npz"],
                 ["quantize", "m.onnx", "--calib", "zero_d.npz", "-o", "q2.onnx"]):
        line = one_error(spa(capsys, *argv))  # a 0-d array used to end in "internal error (TypeError ...)"
        assert "array 'input' has rank 0" in line and ".." not in line
    assert_untouched(work, before)


def test_broken_npz_and_overlong_output_names_are_one_line(capsys, work):
    """Faults that used to end in "internal error": an .npz cut short or with a damaged member,
    an output name longer than the file system allows."""
    data = (work / "calib.npz").read_bytes()
    (work / "cut.npz").write_bytes(data[:100])
    damaged = bytearray(data)
    at = damaged.find(b"(4, 3, 32, 32)")
    damaged[at:at + 14] = b"(9, 3, 32, 32)"  # the member's header lies: its CRC no longer matches
    (work / "lie.npz").write_bytes(bytes(damaged))
    before = snapshot(work)
    for name in ("cut.npz", "lie.npz"):
        line = one_error(spa(capsys, "quantize", "m.onnx", "--calib", name, "-o", "q.onnx"))
        assert "not a valid .npz file" in line
    line = one_error(spa(capsys, "prune", "m.onnx", "--ratio", "0.3", "-o", "a" * 300 + ".onnx"))
    assert "cannot write" in line and "too long" in line
    assert_untouched(work, before)


def test_calibration_data_overflowing_float32_is_one_line(capsys, work):
    """Finite data whose activations overflow float32 in the model: ORT's calibrator finds no
    scale; the error says why, and none of its numpy warnings reach the user."""
    x = np.clip(np.random.default_rng(0).standard_normal((4, 3, 32, 32)), -1, 1).astype(np.float32) * 3e38
    np.savez(work / "huge.npz", input=x)
    before = snapshot(work)
    res = spa(capsys, "quantize", "m.onnx", "--calib", "huge.npz", "-o", "q.onnx")
    line = one_error(res)
    assert "float32 range" in line and res.err.strip().splitlines() == [line], res.err
    assert_untouched(work, before)

"""The package's layout as a test: which module may import which, no import cycles, lazy imports
only for optional extras, no over-long functions, few positional parameters.

Files are read with `ast` (nothing is imported): spa/ is `spa`, passes/ is `spa.passes` and
backends/ is `spa.backends`, as pyproject's package-dir maps them.

Layers (a module may import only from its own layer or layers to its left):

    spa.core -> spa.backends -> spa.passes | spa.scoring -> spa.planning -> spa.training | spa.torch
             -> spa.reporting -> spa.api -> spa.cli

spa.passes and spa.scoring never import each other; spa.torch imports only spa.core; only the
top package spa/__init__.py imports from `spa` itself, and it may import anything but spa.cli.
"""

import ast
import os
import pathlib
from dataclasses import dataclass

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"spa": ROOT / "spa", "spa.passes": ROOT / "passes", "spa.backends": ROOT / "backends"}

LAYERS = {"spa.core": 0, "spa.backends": 1, "spa.passes": 2, "spa.scoring": 2, "spa.planning": 3,
          "spa.training": 4, "spa.torch": 4, "spa.reporting": 5, "spa.api": 6, "spa.cli": 7}
# Same layer, still forbidden: (importer's subpackage, imported subpackage)
FORBIDDEN = {("spa.passes", "spa.scoring"), ("spa.scoring", "spa.passes")}
# spa.torch (the ONNX -> torch translation) stands beside training but needs only the core.
ONLY = {"spa.torch": {"spa.core", "spa.torch"}}
# Exact (importer, imported) pairs allowed against the layer rule, each with its reason.
ALLOWED_PAIRS: dict[tuple[str, str], str] = {
    ("spa.scoring.gradients", "spa.torch"): "gradient saliency runs the ONNX graph as torch (lazily; spa.torch needs "
                                            "only the core)",
    ("spa.backends.torch_exec", "spa.torch"): "the torch backend executes the graph through spa.torch (lazily; "
                                              "spa.torch needs only the core)",
}

# Optional extras a function may import lazily (and spa modules that import one at their top).
EXTRAS = {"torch", "tensorrt", "matplotlib", "onnxslim", "transformers", "sklearn", "ray", "onnxruntime_genai", "yaml"}
EXTRA_PREFIXES = ("onnxruntime.quantization", "onnxruntime.transformers", "onnxruntime.tools")

MAX_LINES = 60
MAX_POSITIONAL = 3


@dataclass(frozen=True)
class Import:
    path: str       # file, relative to the repository root
    line: int
    source: str     # importing module
    target: str     # imported module (a submodule where `from pkg import sub` names one)
    lazy: bool      # inside a function


def package_files():
    """{module name: (path, is_package)} for every .py file of the package."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for dirpath, dirnames, filenames in os.walk(folder):     # symlinked spa/passes, spa/backends not followed
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not (pathlib.Path(dirpath) / d).is_symlink())
            rel = pathlib.Path(dirpath).relative_to(folder).parts
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                parts = [package, *rel] + ([] if name == "__init__.py" else [name[:-3]])
                modules[".".join(parts)] = (pathlib.Path(dirpath) / name, name == "__init__.py")
    return modules


def _resolve(node, module, is_package):
    """The absolute module a `from ... import` names (relative levels resolved)."""
    if not node.level:
        return node.module
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source, module, is_package=False, path="<string>", known=()):
    """Every import statement of a source text as Import records (one per imported module)."""
    tree = ast.parse(source)
    found = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(path, child.lineno, module, a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, module, is_package)
                targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names}
                found.extend(Import(path, child.lineno, module, t, lazy) for t in sorted(targets))
            visit(child, inner)

    visit(tree, False)
    return found


def subpackage(module):
    """The layer-bearing subpackage of a spa module ('spa' for the top package)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer_violation(imp):
    """Why `imp` breaks the layer rule, or None."""
    if not (imp.target == "spa" or imp.target.startswith("spa.")):
        return None
    src, dst = subpackage(imp.source), subpackage(imp.target)
    if (imp.source, imp.target) in ALLOWED_PAIRS or src == dst:
        return None
    if dst == "spa":
        return "imports the top package spa (import the module that defines the name)"
    if src == "spa":
        return "the top package must not import spa.cli" if dst == "spa.cli" else None
    if src in ONLY and dst not in ONLY[src]:
        return f"{src} may import only {sorted(ONLY[src])}"
    if (src, dst) in FORBIDDEN:
        return f"{src} must not import {dst}"
    if dst in LAYERS and src in LAYERS and LAYERS[dst] > LAYERS[src]:
        return f"layer {src} must not import {dst} (a layer to its right)"
    return None


def is_extra(target):
    return target.split(".")[0] in EXTRAS or target.startswith(EXTRA_PREFIXES)


def heavy_modules(records):
    """spa modules that import an optional extra at their top, directly or through other spa modules."""
    top = [r for r in records if not r.lazy]
    heavy = {r.source for r in top if is_extra(r.target)}
    while True:
        more = {r.source for r in top if r.target in heavy} - heavy
        if not more:
            return heavy
        heavy |= more


def lazy_violations(records):
    heavy = heavy_modules(records)
    return [f"{r.path}:{r.line}: {r.source} imports {r.target} inside a function (only optional extras may be lazy)"
            for r in records if r.lazy and not is_extra(r.target) and r.target not in heavy]


def import_graph(records, modules):
    """Module-level imports among spa modules; a package importing its own submodules is no edge."""
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for r in records:
        if r.lazy or r.target not in modules or r.target == r.source:
            continue
        if modules[r.source][1] and r.target.startswith(r.source + "."):
            continue
        graph.add_edge(r.source, r.target, where=f"{r.path}:{r.line}")
    return graph


def cycle_violations(graph):
    out = []
    for cycle in nx.simple_cycles(graph):
        hops = zip(cycle, cycle[1:] + cycle[:1])
        out.append("import cycle: " + " -> ".join(f"{a} ({graph.edges[a, b]['where']})" for a, b in hops))
    return out


def _marked(lines, node, marker):
    """A `# long:` / `# positional:` comment on the def line or in the comment lines right above
    it (above its decorators)."""
    if marker in lines[node.lineno - 1]:
        return True
    i = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        if marker in lines[i]:
            return True
        i -= 1
    return False


def _positional(node, method):
    params = [a.arg for a in node.args.posonlyargs + node.args.args]
    if method and params and params[0] in ("self", "cls"):
        params = params[1:]
    return len(params)


def function_violations(source, path="<string>"):
    """Over-long functions and public functions with too many positional parameters."""
    tree, lines, out = ast.parse(source), source.splitlines(), []
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, funcs):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES and not _marked(lines, node, "# long:"):
                out.append(f"{path}:{node.lineno}: {node.name} is {length} lines (> {MAX_LINES}; split it or "
                           "mark it `# long: reason`)")
    public = [(n, False) for n in tree.body if isinstance(n, funcs)]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        public += [(n, True) for n in cls.body if isinstance(n, funcs)]
    for node, method in public:
        count = _positional(node, method)
        if not node.name.startswith("_") and count > MAX_POSITIONAL and not _marked(lines, node, "# positional:"):
            out.append(f"{path}:{node.lineno}: {node.name} takes {count} positional parameters (> {MAX_POSITIONAL}; "
                       "make the rest keyword-only or mark it `# positional: reason`)")
    return out


def _collect():
    modules = package_files()
    known = set(modules)
    records, sources = [], {}
    for module, (path, is_package) in modules.items():
        rel = str(path.relative_to(ROOT))
        sources[rel] = path.read_text()
        records += imports_of(sources[rel], module, is_package, rel, known)
    return modules, records, sources


MODULES, RECORDS, SOURCES = _collect()


def _report(violations):
    assert not violations, f"{len(violations)} violation(s):\n" + "\n".join(violations)


def test_layers():
    _report([f"{r.path}:{r.line}: {r.source} imports {r.target}: {why}"
             for r in RECORDS if (why := layer_violation(r))])


def test_no_import_cycles():
    _report(cycle_violations(import_graph(RECORDS, MODULES)))


def test_lazy_imports_only_for_extras():
    _report(lazy_violations(RECORDS))


def test_functions_short_and_few_positional():
    _report([v for path, text in SOURCES.items() for v in function_violations(text, path)])


def test_allowed_pairs_exist():
    pairs = {(r.source, r.target) for r in RECORDS}
    _report([f"ALLOWED_PAIRS entry {p} matches no import (remove it)" for p in ALLOWED_PAIRS if p not in pairs])


SYNTHETIC = '''
from spa.api.result import Result
from spa import prune
from . import graph
from .. import cli


def run(a, b, c, d):
    import json
    import torch
    return json, torch


def ok(a, b, c, *, d):  # fine
    pass


# positional: mirrors numpy's signature
def marked(a, b, c, d):
    pass


class K:
    def method(self, a, b, c):
        pass

    def wide(self, a, b, c, d):
        pass
''' + "\n\ndef long():\n" + "    x = 1\n" * 60 + "\n\n# long: a table\ndef long_ok():\n" + "    x = 1\n" * 60


def test_checks_catch_violations():
    known = {"spa.core.graph", "spa.cli", "spa.api.result"}
    records = imports_of(SYNTHETIC, "spa.core.thing", path="x.py", known=known)
    assert {(r.target, r.lazy) for r in records} == {("spa.api.result", False), ("spa", False),
                                                     ("spa.core.graph", False), ("spa.cli", False),
                                                     ("json", True), ("torch", True)}
    bad = {r.target for r in records if layer_violation(r)}
    assert bad == {"spa.api.result", "spa", "spa.cli"}
    assert lazy_violations(records) == ["x.py:9: spa.core.thing imports json inside a function (only optional "
                                        + "extras may be lazy)"]
    found = function_violations(SYNTHETIC, "x.py")
    assert [v.split(":")[1] + " " + v.split()[1] for v in found] == ["31 long", "8 run", "27 wide"]
    # a lazy import of a spa module that imports an extra at its top is fine
    heavy = imports_of("import torch\n", "spa.torch", True) + imports_of("def f():\n    import spa.torch\n", "spa.x")
    assert lazy_violations(heavy) == []
    # cycles, but not a package importing its own submodule
    pkg = imports_of("from spa.a import b\n", "spa.a", True, known={"spa.a.b"})
    sub = imports_of("from spa.a import x\nimport spa.c\n", "spa.a.b")
    back = imports_of("import spa.a.b\n", "spa.c")
    mods = {"spa.a": ("a", True), "spa.a.b": ("b", False), "spa.c": ("c", False)}
    cycles = cycle_violations(import_graph(pkg + sub + back, mods))
    assert len(cycles) == 1 and "spa.a.b" in cycles[0] and "spa.c" in cycles[0]

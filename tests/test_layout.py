"""Architecture guards, read from the source (fast: nothing heavy is imported):

- no import cycles among sdengine's modules (module- and function-level imports; `if TYPE_CHECKING:` excepted;
  `from . import x` in a submodule depends on its package's __init__);
- `sdengine --help` and `sdengine info --help` import no torch;
- `Request` is built with keywords only, everywhere (a positional call silently shifts values when a field is added).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sdengine"
SCANNED = ["sdengine", "tests", "benchmarks", "scripts"]  # for Request calls


# ---- the import graph -----------------------------------------------------------------------------------------

def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under package (a package is named by its __init__.py)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those in the body of an `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`) block."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a `from <level dots><name> import ...` in `module` refers to."""
    if not level:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside functions."""
    mods = modules(package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(module, path.name == "__init__.py", node.level, node.module)
                # `from pkg import x`: pkg's __init__ runs, and x may be a submodule
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[module].update(t for t in targets if t in mods and t != module)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of more than one module: each is one or more import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest way from the component's first module back to itself (breadth first, inside it)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        if start in graph[v]:
            return paths[v] + [start]
        for w in sorted(graph[v] & component):
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"not a cycle: {component}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a -> b -> ... -> a) per strongly connected component."""
    return sorted(shortest_cycle(graph, component) for component in strongly_connected(graph))


def test_no_import_cycles_in_sdengine():
    graph = import_graph(ROOT / PACKAGE)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the scan sees the package's imports
    # Any cycle fails, named by the modules it runs through (not an xfail: a cycle here is a bug to fix).
    found = [f"{' -> '.join(shortest_cycle(graph, c))}   (modules in the loop: {', '.join(sorted(c))})"
             for c in strongly_connected(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("files, expected", [
    ({"__init__.py": "", "a.py": "from .b import x\n", "b.py": "from . import a\nx = 1\n"},
     [["pkg.a", "pkg.b", "pkg.a"]]),
    ({"__init__.py": "", "a.py": "def f():\n    from pkg import b\n", "b.py": "import pkg.a\n"},  # in a function
     [["pkg.a", "pkg.b", "pkg.a"]]),
    ({"__init__.py": "from .a import f\n", "a.py": "from .b import g\ndef f(): ...\n", "b.py": "import os\n"},
     []),  # a package's __init__ importing its submodules is no cycle
    ({"__init__.py": "from .sub.c import y\n", "sub/__init__.py": "", "sub/c.py": "from .. import z\ny = 1\n"},
     [["pkg", "pkg.sub.c", "pkg"]]),  # a submodule importing its own package's __init__
    ({"__init__.py": "from .w import load\n", "w.py": "from .merge import m\ndef load(): ...\n",
      "merge.py": "from . import load\ndef m(): ...\n"},
     [["pkg", "pkg.w", "pkg.merge", "pkg"]]),
    ({"__init__.py": "", "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import x\n",
      "b.py": "from .a import y\n"}, []),  # annotations only
    ({"__init__.py": "", "a.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    from .b import x\n",
      "b.py": "from .a import y\n"}, [["pkg.a", "pkg.b", "pkg.a"]]),  # the else branch runs
], ids=["relative", "function-level", "init-imports-submodules", "own-init", "through-init", "type-checking", "else"])
def test_the_cycle_check_finds_cycles(tmp_path, files, expected):
    assert cycles(import_graph(write_package(tmp_path, files))) == expected


# ---- the CLI's help imports no torch --------------------------------------------------------------------------

HELP_PROBE = """
import sys
from sdengine.cli import run
try:
    run(sys.argv[1:])
except SystemExit as e:
    assert e.code == 0, e.code
else:
    raise AssertionError("--help did not exit")
print("heavy:", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "safetensors", "PIL")))
"""


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"]], ids=["sdengine", "info"])
def test_help_imports_no_torch(argv):
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sdengine"), result.stdout
    heavy = result.stdout.rsplit("heavy: ", 1)[1]
    assert "'torch" not in heavy, heavy


# ---- Request is built with keywords ---------------------------------------------------------------------------

def bound_to_ours(tree: ast.AST, in_package: bool) -> tuple[set[str], set[str]]:
    """(names bound to sdengine's Request, names bound to sdengine or one of its modules) in a file."""
    requests, modules_ = set(), set()
    if in_package and any(isinstance(n, ast.ClassDef) and n.name == "Request" for n in ast.walk(tree)):
        requests.add("Request")  # sdengine/request.py itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules_.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            ours = node.level > 0 and in_package or (node.module or "").split(".")[0] == PACKAGE
            if ours:
                requests.update(a.asname or a.name for a in node.names if a.name == "Request")
                modules_.update(a.asname or a.name for a in node.names if a.name != "Request")
    return requests, modules_


def expected_to_raise(tree: ast.AST) -> set[int]:
    """Nodes inside `with pytest.raises(...)`: a call that must fail builds no Request."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(isinstance(item.context_expr, ast.Call)
                                              and ast.unparse(item.context_expr.func) == "pytest.raises"
                                              for item in node.items):
            inside.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return inside


def request_calls(path: Path, root: Path = ROOT) -> list[tuple[str, bool]]:
    """(`file:line: call`, whether it passes positional or *starred arguments) for each call of sdengine's Request
    in a file, but those expected to raise."""
    tree = ast.parse(path.read_text(), str(path))
    requests, modules_ = bound_to_ours(tree, path.relative_to(root).parts[0] == PACKAGE)
    skipped = expected_to_raise(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in skipped:
            continue
        func = node.func
        if (isinstance(func, ast.Name) and func.id in requests) or (
                isinstance(func, ast.Attribute) and func.attr == "Request"
                and ast.unparse(func.value).split(".")[0] in modules_):
            found.append((node.lineno, f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)[:100]}",
                          bool(node.args)))
    return [(where, positional) for _, where, positional in sorted(found)]


def test_request_is_built_with_keywords_only():
    files = [p for d in SCANNED if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))]
    calls = [call for path in files for call in request_calls(path)]
    assert len(calls) > 10, calls  # the scan recognizes the call sites
    positional = [where for where, is_positional in calls if is_positional]
    assert not positional, "Request(...) with positional arguments:\n" + "\n".join(positional)


def test_the_request_scan_finds_positional_calls(tmp_path):
    (tmp_path / "tests").mkdir()
    path = tmp_path / "tests" / "example.py"
    path.write_text("import pytest\nimport sdengine\nimport urllib.request\n"
                    "from sdengine.request import Request\nfrom sdengine import request as rq\n"
                    "Request('a cat', steps=2)\nsdengine.Request(*args)\nrq.Request('x')\nRequest(prompt='ok')\n"
                    "urllib.request.Request('http://x')\nwith pytest.raises(TypeError):\n    Request('refused')\n")
    assert [(where.split(": ")[0], positional) for where, positional in request_calls(path, tmp_path)] == [
        ("tests/example.py:6", True), ("tests/example.py:7", True), ("tests/example.py:8", True),
        ("tests/example.py:9", False)]

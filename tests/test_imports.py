"""The package's layout is its architecture: stages as subpackages, each importing only the
stages below it, at most seven layers from the vocabulary to the front ends, and no import cycle.
Every import counts (module level and inside functions; only ``if TYPE_CHECKING:`` blocks are
annotations, not imports). The pytest plugin imports only the library's light options."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "harness"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, known: set[str]) -> set[str]:
    """The harness modules ``path`` imports (``from harness import x`` counts as harness.x when
    that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != here:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in files}
    return {module_name(p): imports(p, known) - {"harness"} for p in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


#: The layers, bottom up: a module may import modules of a lower layer, and of its own
#: subpackage (the top-level modules of a layer count as one unit). The CLI and the plugin sit side
#: by side on top (the plugin is outside the package and checked on its own below).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("harness", "harness.vocab", "harness.errors", "harness.options", "harness.target",
     "harness.escape", "harness.shard"),
    ("harness.case",),
    ("harness.exact",),
    ("harness.backends", "harness.results"),
    ("harness.checks",),
    ("harness.run",),
    ("harness.cli", "harness.parity"),
)


#: Modules kept at the top of the package as stable import paths for backend plugins
#: (``from harness.outputs import Outputs``), with the unit they belong to.
PLUGIN_PATHS = {"harness.inputs": "harness.exact", "harness.outputs": "harness.exact"}


def unit(module: str) -> str:
    """The unit of ``LAYERS`` a module belongs to (its subpackage, or itself at the top)."""
    if module in PLUGIN_PATHS:
        return PLUGIN_PATHS[module]
    for units in LAYERS:
        for name in sorted(units, key=len, reverse=True):
            if module == name or (name != "harness" and module.startswith(name + ".")):
                return name
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def layer(module: str) -> int:
    name = unit(module)
    return next(i for i, units in enumerate(LAYERS) if name in units)


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports that reach a layer above their own, or a sibling unit of the same layer (two
    units side by side know nothing of each other; the top-level core modules are one unit)."""
    bad = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = layer(module), layer(target)
            same_unit = unit(module) == unit(target) or (a == b == 0)
            if b > a or (b == a and not same_unit):
                bad.append(f"{module} (layer {a}) imports {target} (layer {b})")
    return bad


def depth(edges: dict[str, set[str]]) -> int:
    """Layers of the import graph: the longest chain of imports between distinct units."""
    units = {unit(m) for m in edges}
    between: dict[str, set[str]] = {u: set() for u in units}
    for module, targets in edges.items():
        between[unit(module)].update(unit(t) for t in targets if unit(t) != unit(module))
    memo: dict[str, int] = {}
    path: list[str] = []

    def longest(u: str) -> int:
        if u in path:
            raise AssertionError(f"units import each other: {' -> '.join(path[path.index(u):])}")
        if u not in memo:
            path.append(u)
            memo[u] = 1 + max((longest(v) for v in between[u]), default=0)
            path.pop()
        return memo[u]

    return max(longest(u) for u in units)


def test_no_import_cycle_among_harness_modules():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_stage_imports_only_the_stages_below_it():
    assert upward(graph()) == []


def test_the_import_graph_has_at_most_seven_layers():
    assert depth(graph()) <= 7


def test_the_layer_check_sees_an_upward_import():
    edges = {"harness.case.model": {"harness.run.session"}, "harness.run.session": set(),
             "harness.exact.reference": {"harness.backends.base"},
             "harness.backends.base": set()}
    assert upward(edges) == [
        "harness.case.model (layer 1) imports harness.run.session (layer 5)",
        "harness.exact.reference (layer 2) imports harness.backends.base (layer 3)"]
    assert upward({"harness.results.report": {"harness.backends.base"}}) == [
        "harness.results.report (layer 3) imports harness.backends.base (layer 3)"]


def test_the_fingerprint_knows_no_backend():
    edges = graph()
    assert not {m for m in edges["harness.target"] if m.startswith("harness.backends")}


def test_the_plugin_imports_only_the_light_options_at_module_level():
    tree = ast.parse((REPO / "attn_harness_pytestplugin.py").read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert {n for n in names if n.split(".")[0] in ("harness", "torch", "hypothesis")} == {
        "harness.errors", "harness.options"}


def test_nothing_in_the_package_imports_the_plugin():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "attn_harness_pytestplugin" not in names, path


#: Imported only where needed (``banned-module-level-imports`` in pyproject.toml): what the CLI's
#: report and compare must run without.
HEAVY = ("torch", "numpy", "pytest", "_pytest", "hypothesis", "matplotlib", "triton")


def test_report_and_compare_import_neither_torch_nor_pytest(tmp_path):
    """``attn-harness report`` and ``compare`` run on another machine's records, in a process
    that never imports torch, pytest or hypothesis (their imports stay inside functions)."""
    results = REPO / "tests/fixtures/nightly/artifacts/results-cpu-x86_64-none/results.jsonl"
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from harness.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            codes = [main(["report", {str(results)!r}]),
                     main(["compare", {str(results)!r}, "--baseline", {str(results)!r}])]
        print(json.dumps([codes, sorted(m for m in sys.modules
                                        if m.split(".")[0] in {HEAVY!r})]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    codes, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert codes[0] == 0 and codes[1] in (0, 1)
    assert heavy == []

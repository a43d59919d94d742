"""The package's layers import downward only, and no module imports itself back in a loop.

The layer order is written once, in LAYERS. Every import counts, at any depth: also the ones
inside functions, which Python runs late and which hide a loop from an import-time check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("rstpm._version",),  # the version string
    ("rstpm.core",),  # the method: torch only, no files
    ("rstpm.config", "rstpm.hardware"),  # a run's configuration; the CPU's flags
    ("rstpm.data",),  # layouts, image loading, input policy, synthesis
    ("rstpm.metrics",),  # protocol metrics, curves, threshold maths, verdicts
    ("rstpm.runs",),  # the run directory, teacher weights, checkpoints
    ("rstpm.training",),  # fit / resume on one stage loop
    ("rstpm.inference",),  # backends, Detector, predict, export
    ("rstpm.evaluation",),  # rstpm test, reports, recalibration, bench
    ("rstpm.serve", "rstpm.cluster"),  # the HTTP service; Ray fan-out, batch scoring, DDP
    ("rstpm.cli", "rstpm.__main__", "rstpm"),  # the command line and the package's facade
)
"""Lowest first: a module may import from its own layer and the layers before it."""


def module_names(src: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` under ``src``."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        names[name.removesuffix(".__init__")] = path
    return names


def _imported(module: str, path: Path, node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The package's modules an import statement names (``from a import b``: a.b when that is
    a module, else a)."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            parts = parts if path.name == "__init__.py" else parts[:-1]
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        candidates = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
            for alias in node.names
        ]
    else:
        return []
    out = []
    for name in candidates:
        while name and name not in known:  # `import a.b.c` of a package names its parents too
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph(src: Path, package: str) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}."""
    known = module_names(src, package)
    graph: dict[str, dict[str, int]] = {}
    for module, path in known.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(module, path, node, known):
                if target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def layer_of(module: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> int | None:
    """The index of the layer whose prefix matches ``module`` most closely (None: no layer).
    A prefix covers its sub-modules, except the package root, which stands for itself only."""
    best, best_length = None, -1
    for index, prefixes in enumerate(layers):
        for prefix in prefixes:
            covers = "." in prefix and module.startswith(prefix + ".")
            matches = module == prefix or covers
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def upward_imports(
    graph: dict[str, dict[str, int]], layers: tuple[tuple[str, ...], ...] = LAYERS
) -> list[str]:
    """Each import of a module from a later layer than its own, as one readable line."""
    found = []
    for module, edges in sorted(graph.items()):
        own = layer_of(module, layers)
        for target, line in sorted(edges.items()):
            other = layer_of(target, layers)
            if own is not None and other is not None and other > own:
                found.append(
                    f"{module} (line {line}) imports {target}: layer {layers[other][0]} is "
                    f"above {layers[own][0]}"
                )
    return found


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(SRC, "rstpm")


def test_every_module_belongs_to_a_layer(graph: dict[str, dict[str, int]]) -> None:
    assert [m for m in graph if layer_of(m) is None] == []


def test_layers_import_downward_only(graph: dict[str, dict[str, int]]) -> None:
    assert upward_imports(graph) == []


def test_no_import_cycles(graph: dict[str, dict[str, int]]) -> None:
    assert import_cycles(graph) == []


def test_the_method_core_imports_only_itself(graph: dict[str, dict[str, int]]) -> None:
    core = {m: e for m, e in graph.items() if m.startswith("rstpm.core")}
    assert core and all(t.startswith("rstpm.core") for e in core.values() for t in e)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "rstpm" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


SYNTHETIC = {
    "__init__.py": "",
    "core/__init__.py": "",
    "core/model.py": "import torch\n",
    "runs/__init__.py": "",
    "runs/files.py": "from rstpm.core.model import x\n",
    "inference/__init__.py": "",
    "inference/detector.py": "from ..runs import files\n",
}


def test_a_synthetic_tree_that_keeps_the_order_passes(tmp_path: Path) -> None:
    graph = import_graph(_tree(tmp_path, SYNTHETIC), "rstpm")
    assert graph["rstpm.inference.detector"] == {"rstpm.runs.files": 1}
    assert upward_imports(graph) == [] and import_cycles(graph) == []


@pytest.mark.parametrize(
    "statement",
    [
        "from rstpm.inference.detector import Detector\n",  # top level
        "def load():\n    from rstpm.inference import detector\n",  # inside a function
        "def load():\n    import rstpm.inference.detector\n",
        "from ..inference import detector\n",  # relative
    ],
)
def test_an_upward_import_fails(tmp_path: Path, statement: str) -> None:
    files = {**SYNTHETIC, "runs/files.py": SYNTHETIC["runs/files.py"] + statement}
    graph = import_graph(_tree(tmp_path, files), "rstpm")
    found = upward_imports(graph)
    assert len(found) == 1 and found[0].startswith("rstpm.runs.files (line")
    assert "rstpm.inference" in found[0]
    assert import_cycles(graph) == [["rstpm.inference.detector", "rstpm.runs.files"]]


def test_a_module_outside_every_layer_is_found(tmp_path: Path) -> None:
    graph = import_graph(_tree(tmp_path, {**SYNTHETIC, "helpers.py": ""}), "rstpm")
    assert [m for m in graph if layer_of(m) is None] == ["rstpm.helpers"]

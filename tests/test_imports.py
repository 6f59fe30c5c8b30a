"""Imports point down the layers, and no modules import each other in a cycle.

The package's layers, bottom to top, are written once, in ``LAYERS`` below. A module may import
modules of its own layer or of a lower one, never of a higher one. Every import counts, at module
level or inside a function (a function-level import still ties the two modules together); imports
under ``if TYPE_CHECKING:`` (never executed) and ``from __future__`` do not. The graph is read with
``ast`` from the source files, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = "orion_mllm"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Bottom to top. A name covers that module or package and everything under it (the longest listed
# name wins); the root package (``orion_mllm/__init__.py``: the version) is the bottom.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("orion_mllm", "orion_mllm.config", "orion_mllm.images"),
    # kernels serve losses only; chat_template renders for sequence.
    ("orion_mllm.losses", "orion_mllm.kernels", "orion_mllm.sequence", "orion_mllm.chat_template"),
    ("orion_mllm.model", "orion_mllm.data"),
    ("orion_mllm.train", "orion_mllm.decoder"),
    ("orion_mllm.inference",),
    ("orion_mllm.eval", "orion_mllm.serve"),
    ("orion_mllm.workflow", "orion_mllm.demo"),
    ("orion_mllm.cli",),  # the package and its command-group modules: the top
)


def layer_of(module: str) -> int | None:
    """The layer index of a module, or None when no entry of ``LAYERS`` covers it."""
    best: tuple[int, int] | None = None  # (length of the matching name, layer)
    for index, names in enumerate(LAYERS):
        for name in names:
            # The root package matches itself only; any other name also covers its submodules.
            covers = module == name or (name != PACKAGE and module.startswith(name + "."))
            if covers and (best is None or len(name) > best[0]):
                best = (len(name), index)
    return None if best is None else best[1]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under the package directory ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, int]]:
    """Every import statement of a module (any depth) except those under ``if TYPE_CHECKING:``."""
    found: list[tuple[ast.Import | ast.ImportFrom, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append((node, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of the first such import}, for the package at ``root``."""
    modules = module_names(root)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node, line in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.module == "__future__":
                    continue
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
                subs = [f"{prefix}.{a.name}" for a in node.names]
                targets = [sub if sub in modules else prefix for sub in subs]
            for target in targets:
                # `import a.b.c` binds a name from the deepest module that exists in the package.
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    edges.setdefault(target, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def problems(graph: dict[str, dict[str, int]]) -> list[str]:
    """One line per module without a layer, per import that points up, and per import cycle."""
    out = []
    for module in sorted(graph):
        if layer_of(module) is None:
            out.append(f"{module}: in no layer; add it to LAYERS in tests/test_imports.py")
    for module, edges in sorted(graph.items()):
        src = layer_of(module)
        for target, line in sorted(edges.items()):
            dst = layer_of(target)
            if src is not None and dst is not None and dst > src:
                out.append(f"{module}:{line} imports {target}, a higher layer ({dst} > {src})")
    for component in cycles(graph):
        out.append(f"import cycle: {' <-> '.join(component)}")
    return out


# ------------------------------------------------------------------ the package


def test_imports_point_down_and_have_no_cycles():
    found = problems(import_graph(SRC))
    assert not found, "\n".join(found)


# ------------------------------------------------------------------ the checker itself


def test_checker_reports_an_upward_import_and_a_cycle_in_a_synthetic_graph():
    graph = {
        "orion_mllm.model.orion": {"orion_mllm.train.trainer": 3},
        "orion_mllm.train.trainer": {"orion_mllm.model.orion": 1},
        "orion_mllm.eval.a": {"orion_mllm.serve.b": 5},
        "orion_mllm.serve.b": {"orion_mllm.eval.a": 7},
        "orion_mllm.cli.train": {"orion_mllm.workflow.quickstart": 2},
        "orion_mllm.workflow.quickstart": {},
        "orion_mllm.newthing": {},
    }
    found = problems(graph)
    assert "orion_mllm.model.orion:3 imports orion_mllm.train.trainer, a higher layer (3 > 2)" in found
    assert "import cycle: orion_mllm.eval.a <-> orion_mllm.serve.b" in found  # same layer, still a cycle
    assert "import cycle: orion_mllm.model.orion <-> orion_mllm.train.trainer" in found
    assert any(p.startswith("orion_mllm.newthing: in no layer") for p in found)
    assert not any("orion_mllm.cli.train:" in p for p in found)  # cli.* is the top: imports anything
    assert len(found) == 4, found


def test_layers_cover_names_by_longest_prefix():
    assert layer_of("orion_mllm") == 0 and layer_of("orion_mllm.images") == 0
    assert layer_of("orion_mllm.cli") == layer_of("orion_mllm.cli.train") == len(LAYERS) - 1
    assert layer_of("orion_mllm.train.decoder_trainer") == layer_of("orion_mllm.decoder.flow")
    assert layer_of("orion_mllm.imagesx") is None  # a name covers submodules, not longer names
    assert layer_of("orion_mllm.unknown") is None  # the root package does not cover everything


def test_checker_finds_a_planted_function_level_upward_import(tmp_path):
    """A copy of the package with one upward import hidden inside a function, one relative upward
    import, and one under ``if TYPE_CHECKING:`` (allowed): exactly the first two are reported (with
    the cycles they close, since the layers above import the ones below)."""
    root = tmp_path / PACKAGE
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__"))
    heads = root / "model" / "heads.py"
    planted = "from orion_mllm.workflow.quickstart import Quickstart\n\n    return Quickstart"
    heads.write_text(heads.read_text() + f"\n\ndef _planted():\n    {planted}\n")
    world = root / "data" / "shapes" / "world.py"
    world.write_text(
        world.read_text()
        + "\n\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from orion_mllm.cli import main\n"
        + "\n\ndef _planted():\n    from ...eval import drift\n\n    return drift\n"
    )
    found = problems(import_graph(root))
    upward = [p for p in found if "a higher layer" in p]
    assert len(upward) == 2, found
    assert upward[0].startswith("orion_mllm.data.shapes.world:")
    assert "imports orion_mllm.eval.drift, a higher layer" in upward[0]
    assert upward[1].startswith("orion_mllm.model.heads:")
    assert "imports orion_mllm.workflow.quickstart, a higher layer" in upward[1]
    assert all(p.startswith("import cycle:") for p in found if p not in upward)
    assert not any("orion_mllm.cli" in p for p in found)  # the TYPE_CHECKING import is not an edge

"""The package's shape: no import cycle, and a technique is one record (a toy one runs end to end)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import torch
from torch import fx

import tost_surgery as tost
from tost_surgery import _techniques
from tost_surgery._fx._context import TAG, schedule_coefficient

from .conftest import TinyNet, bernoulli_mask, masked_reference

PACKAGE = Path(tost.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _runtime_imports(tree: ast.AST):
    """Every import statement that runs (module level or in a function), not those under TYPE_CHECKING."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _runtime_imports_of(child))
            continue
        yield from _runtime_imports_of(node)


def _runtime_imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    elif not (isinstance(node, ast.If) and _is_type_checking(node)):
        yield from _runtime_imports(node)


def _targets(module: str, is_package: bool, node: ast.AST, modules: set[str]) -> list[str]:
    """The package modules an import statement loads (a submodule loads its packages' ``__init__`` too).

    ``from . import sub`` of a submodule ``sub`` loads ``sub`` only: the package it is in is
    already being imported, and no name is read from it.
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        subs = [f"{prefix}.{alias.name}" for alias in node.names]
        names = subs if all(sub in modules for sub in subs) else [prefix, *subs]
    home = module if is_package else module.rpartition(".")[0]
    loaded = []
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # the root package is the facade: every module is under it
            prefix = ".".join(parts[:i])
            # A package a module is inside of is already being imported: only its submodule loads.
            if i == len(parts) or not (home == prefix or home.startswith(prefix + ".")):
                loaded.append(prefix)
    return [n for n in loaded if n.startswith("tost_surgery.")]


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            edges.update(t for t in _targets(module, is_package, node, set(files)) if t in files and t != module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_the_package() -> None:
    graph = import_graph()
    assert "tost_surgery._surgery" in graph and graph["tost_surgery._surgery"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# --- a toy technique: one record, nothing else -------------------------------------------------------------


def _insert_toy(graph: fx.Graph, context) -> None:  # noqa: ANN001
    """Scale the output by ``1 + c``, ``c`` annealed 1 -> 0."""
    output = next(n for n in graph.nodes if n.op == "output")
    scale = schedule_coefficient(graph, "toy")
    (value,) = output.args
    with graph.inserting_before(output):
        boosted = graph.call_function(torch.addcmul, (value, scale, value))
    boosted.meta[TAG] = "toy"
    boosted.meta["tost_site"] = "output"
    output.args = (boosted,)


TOY = _techniques.Technique(
    name="toy",
    label="toy boost",
    switch="ghost_neurons",  # rides on an existing switch: a real technique adds its own Recipe field
    off={"ghost_neurons": False},
    is_annealed=lambda recipe: recipe.ghost_neurons,
    coefficient=lambda progress: 1.0 - progress,
    insert=_insert_toy,
)


def test_a_technique_registered_as_one_record_runs_anneals_retires_and_shows(monkeypatch, request, images) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    mask = bernoulli_mask(model)
    reference = masked_reference(model, mask)
    without = copy.deepcopy(model)
    recipe = tost.Recipe.tost(total_steps=4, warmup=0.5, ghost_skips=False, rescale_init=False)
    tost.prepare(without, mask, recipe)  # prepared before the toy exists: it never gets one
    monkeypatch.setattr(_techniques, "TECHNIQUES", _techniques.TECHNIQUES)  # restored after the test...
    _techniques.TECHNIQUES.append(TOY)  # ...and grown in place: every module reads this one list
    request.addfinalizer(lambda: _techniques.TECHNIQUES.remove(TOY))
    tost.prepare(model, mask, recipe)
    for net in (model, without, reference):
        net.eval()
    status = tost.status(model)
    assert status.techniques["toy"].state == "active" and status.techniques["toy"].value == 1.0
    assert tost.plan(copy.deepcopy(reference), mask, recipe).sites["toy"] == ("output",)
    with torch.no_grad():
        torch.testing.assert_close(model(images), 2 * without(images), rtol=0, atol=0)
        for net in (model, without):
            tost.step(net, 1)
        assert tost.status(model).techniques["toy"].value == 0.5
        torch.testing.assert_close(model(images), 1.5 * without(images), rtol=1e-6, atol=0)
        for net in (model, without):
            tost.step(net, 1)
    status = tost.status(model)
    assert status.techniques["toy"].state == "retired" and status.retired
    assert not any(n.meta.get(TAG) == "toy" for n in tost.graph(model).graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=1e-6)
    assert "toy" in {t.name for t in tost.Recipe.techniques()}
    tost.finalize(model)

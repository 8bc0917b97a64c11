"""Trace a model with torch.fx over its own modules, once per train/eval mode.

torch.fx bakes ``self.training`` into the graph (timm's ``F.dropout(x, p,
training=self.training)`` traced in train mode keeps dropout on in eval), so the model is
traced in both modes, as torchvision's feature extraction does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from .._errors import TraceError, warn
from ._context import CONSTANTS
from ._layout import CallSignature, Layout

LeafSpec = Iterable["type[nn.Module] | str"]

_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


class _Tracer(fx.Tracer):
    """A tracer that treats the given module types and qualified names as leaves."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str], autowrap: tuple) -> None:
        super().__init__(autowrap_functions=autowrap)
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if isinstance(m, nn.Conv2d):  # timm's StdConv2d etc.: one node, one ghost-skip site
            return True
        return super().is_leaf_module(m, module_qualified_name)


def ecosystem_leaves() -> tuple[tuple[type, ...], tuple]:
    """Module types and functions that timm registers as not traceable (empty without timm)."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


def _split_leaves(model: nn.Module, leaf_modules: LeafSpec) -> tuple[tuple[type, ...], frozenset[str]]:
    types, names = [], set()
    module_names = dict(model.named_modules())
    if isinstance(leaf_modules, (str, type)):
        what = f"the str {leaf_modules!r}" if isinstance(leaf_modules, str) else f"the class {leaf_modules.__name__}"
        example = repr(leaf_modules) if isinstance(leaf_modules, str) else leaf_modules.__name__
        raise TraceError(
            f"leaf_modules takes a list of module classes or qualified names, found {what}.\n"
            f"Hint: leaf_modules=[{example}]"
        )
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            if leaf not in module_names:
                from .._errors import did_you_mean

                raise TraceError(
                    f"leaf_modules names {leaf!r}, which is no submodule of {type(model).__name__}."
                    + did_you_mean(leaf, [n for n in module_names if n])
                )
            names.add(leaf)
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        else:
            raise TraceError(
                f"leaf_modules takes nn.Module subclasses or qualified names, found {leaf!r}."
            )
    return tuple(types), frozenset(names)


@dataclass
class Tracing:
    """How to trace a model's methods, call layout by call layout; shared by every trace of one model.

    ``leaf_names`` grows when a submodule turns out to be untraceable, so later traces keep it whole
    too. ``hidden`` names the methods prepare has set on the instance: traces see the class's own.
    """

    leaf_types: tuple[type, ...]
    leaf_names: set[str]
    autowrap: tuple
    strict: bool = False
    hidden: frozenset[str] = frozenset()

    @classmethod
    def of(cls, model: nn.Module, leaf_modules: LeafSpec = (), *, strict: bool = False) -> Tracing:
        leaf_types, leaf_names = _split_leaves(model, leaf_modules)
        timm_types, timm_functions = ecosystem_leaves()
        return cls(leaf_types + timm_types, set(leaf_names), timm_functions, strict)


def trace_call(
    model: nn.Module, tracing: Tracing, method: str, signature: CallSignature, layout: Layout, prefix: str = ""
) -> tuple[dict[bool, fx.Graph] | None, list[str], dict[str, torch.Tensor]]:
    """Return ``({True: train_graph, False: eval_graph}, notes, constants)`` for calls of ``method`` with ``layout``.

    The graphs take the layout's inputs as placeholders, in order; the layout's constants are
    traced in. One graph serves both modes when they agree. Tensors that the method creates
    (``torch.tensor(...)`` in timm's swin, beit, eva) are stored by torch.fx as new attributes of
    the traced root; they are returned as ``constants``, to be registered under
    ``tost.constants`` where the graphs now read them.

    A submodule that torch.fx cannot trace is called whole instead (a leaf), with a warning and a
    note naming it. When the method itself cannot be traced the graphs are None. ``strict`` turns
    both into a :class:`TraceError`. The model's training flags and the Python state of its
    modules are as before afterwards.
    """
    function = getattr(type(model), method)
    root_function = signature.root_function(function, layout, getattr(function, "__globals__", {}))
    flags = [(m, m.training) for m in model.modules()]
    snapshot = _snapshot_python_state(model)
    graphs: dict[bool, fx.Graph] = {}
    sources: dict[bool, str] = {}
    constants: dict[bool, dict[str, torch.Tensor]] = {}
    notes: list[str] = []
    owner = f"{type(model).__name__}.{method}"
    try:
        mode = True
        while len(graphs) < 2:
            model.train(mode)
            root = _stand_in(model, root_function, tracing.hidden)
            tracer = _Tracer(tracing.leaf_types, frozenset(tracing.leaf_names), tracing.autowrap)
            try:
                graphs[mode] = tracer.trace(root)
                sources[mode] = graphs[mode].python_code("self").src
                constants[mode] = _lift_constants(root, graphs[mode], prefix + ("train" if mode else "eval"))
                mode = False
            except TraceError:
                raise
            except Exception as error:  # noqa: BLE001 - any tracing failure is reported the same way
                failure = _trace_error(model, owner, tracer, error)
                where = failure.where
                if tracing.strict or where in tracing.leaf_names or len(notes) >= _MAX_AUTO_LEAVES:
                    raise failure from error
                if not where:
                    notes.append(f"{owner} not traceable: {failure.reason}")
                    return None, notes, {}
                tracing.leaf_names.add(where)
                notes.append(f"{where} ({type(model.get_submodule(where)).__name__}) called whole: {failure.reason}")
                warn(
                    f"submodule {where!r} ({type(model.get_submodule(where)).__name__}) cannot be traced "
                    f"({failure.reason}); it is called whole and gets no scaffolding inside. "
                    "Pass strict=True to make this an error."
                )
                graphs.clear()
                mode = True
            finally:
                _restore_python_state(snapshot)
    finally:
        for module, flag in flags:
            module.training = flag
    if sources[True] == sources[False]:
        graphs[False] = graphs[True]
        constants[False] = {}
    return graphs, notes, {**constants[True], **constants[False]}


def _stand_in(model: nn.Module, root_function: Callable, hidden: frozenset[str]) -> nn.Module:
    """An object that is ``model`` to torch.fx, except that its class's forward is ``root_function``.

    It shares the model's modules, parameters and buffers (and so every module path), and has a
    copy of the model's own attributes: tracing writes its tensor constants there, not on the model.
    """
    cls = type(model)
    stand_in_class = type(cls)(cls.__name__, (cls,), {"forward": root_function, "__module__": cls.__module__})
    stand_in = object.__new__(stand_in_class)
    stand_in.__dict__.update({k: v for k, v in model.__dict__.items() if k not in hidden})
    return stand_in


def _lift_constants(root: nn.Module, graph: fx.Graph, prefix: str) -> dict[str, torch.Tensor]:
    """Point ``get_attr`` nodes that read attributes tracing added to ``root`` at ``tost.constants``."""
    existing = set(root._modules) | set(root._parameters) | set(root._buffers)
    lifted: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        first, _, rest = str(node.target).partition(".")
        if first in existing:
            continue
        name = f"{prefix}_{first}"
        lifted[name] = getattr(root, first)
        node.target = f"{CONSTANTS}.{name}" + (f".{rest}" if rest else "")
    return lifted


_MAX_AUTO_LEAVES = 200
FALLBACK = (
    "it runs eagerly: masks and rescaling apply, its nn.ReLU modules become ghost neurons, "
    "and there are no ghost skips. Pass strict=True to make this an error."
)


def _trace_error(model: nn.Module, owner: str, tracer: _Tracer, error: Exception) -> TraceError:
    stack = list(getattr(tracer, "module_stack", {}).items())
    where = next((name for name, _ in reversed(stack) if name), "")
    module_type = type(model.get_submodule(where)).__name__ if where else ""
    place = f"in submodule {where!r} ({module_type})" if where else f"in {owner}"
    owner = owner.removesuffix(".forward")
    hint = (
        f"Hint: pass leaf_modules=[{where!r}] (or its class {module_type}) to keep it whole"
        if where
        else "Hint: pass leaf_modules=[...] naming the submodule with data-dependent code"
    )
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    failure = TraceError(
        f"torch.fx could not trace {owner} {place}: {reason}\n{hint}; "
        "the rewritten graph then calls it as one opaque module."
    )
    failure.where, failure.reason = where, reason
    return failure


def _snapshot_python_state(model: nn.Module) -> list[tuple[nn.Module, dict, dict]]:
    """Module ``__dict__`` entries, and copies of plain dict caches, before tracing.

    Tracing can leave proxies in a model's own caches (levit caches attention biases in a
    dict when not training); they are put back as they were.
    """
    snapshot = []
    for module in model.modules():
        state = {k: v for k, v in module.__dict__.items() if k not in _MODULE_INTERNALS}
        dict_contents = {k: copy.copy(v) for k, v in state.items() if type(v) is dict}
        snapshot.append((module, state, dict_contents))
    return snapshot


def _restore_python_state(snapshot: Sequence[tuple[nn.Module, dict, dict]]) -> None:
    for module, state, dict_contents in snapshot:
        for key in [k for k in module.__dict__ if k not in _MODULE_INTERNALS and k not in state]:
            del module.__dict__[key]
        for key, value in state.items():
            if module.__dict__.get(key, _MISSING) is not value:
                module.__dict__[key] = value
        for key, contents in dict_contents.items():
            live = module.__dict__[key]
            if live.keys() != contents.keys() or any(live[k] is not contents[k] for k in contents):
                live.clear()
                live.update(contents)


_MISSING = object()

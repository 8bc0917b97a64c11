"""In the training loop: advance the schedule, read the label smoothing, inspect the graph."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from ._checks import is_positive_int
from ._errors import StateError, TostSurgeryError, TostSurgeryWarning
from ._surgery import surgery_of


def step(model: nn.Module, n: int = 1) -> None:
    """Advance the schedule of a prepared model by ``n`` optimizer steps.

    Scaffolding whose annealing ends here retires: the graph is rebuilt without it.

    Example:
        >>> optimizer.step(); tost_surgery.step(model)
    """
    surgery = surgery_of(model, "step")
    if not is_positive_int(n):
        raise TostSurgeryError(f"step takes a positive number of optimizer steps, found n={n!r}.")
    if not surgery.gradinit_checked:  # once, at the first step: no per-step read of a device flag
        surgery.gradinit_checked = True
        if surgery.gradinit_pending():
            _warn_gradinit_pending(model, surgery)
    surgery.schedule.advance(n)
    if surgery.runner.active:
        surgery.sync()


def _warn_gradinit_pending(model: nn.Module, surgery) -> None:
    warnings.warn(
        f"{type(model).__name__} was prepared with rescale_rule='gradinit', but training started before "
        f"tost_surgery.init.gradinit applied its scales to {len(surgery.decided.gradinit_layers)} layer(s).\n"
        "Hint: call tost_surgery.init.gradinit(model, batches) after prepare and before the first step.",
        TostSurgeryWarning,
        stacklevel=3,
    )


class BindHandle:
    """Returned by :func:`bind`; ``remove()`` stops the optimizer from stepping the schedule."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._bindings = surgery_of(model, "bind").bindings
        self._key = id(optimizer)
        self._hook = optimizer.register_step_post_hook(lambda *_: step(model))
        self._bindings[self._key] = self

    def remove(self) -> None:
        self._hook.remove()
        if self._bindings.get(self._key) is self:
            del self._bindings[self._key]


def bind(model: nn.Module, optimizer: torch.optim.Optimizer) -> BindHandle:
    """Make every ``optimizer.step()`` also advance the schedule of ``model`` by one.

    With gradient accumulation this counts optimizer steps, not batches; a step that
    GradScaler skips (inf gradients) is not counted. ``finalize`` removes the binding.

    Example:
        >>> handle = tost_surgery.bind(model, optimizer)   # handle.remove() to undo
    """
    surgery = surgery_of(model, "bind")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TostSurgeryError(f"bind takes a torch.optim.Optimizer, found {type(optimizer).__name__}.")
    if id(optimizer) in surgery.bindings:
        raise StateError(
            f"This {type(optimizer).__name__} is already bound to {type(model).__name__}: "
            "each step would count twice.\nHint: keep the first handle, or call handle.remove() first."
        )
    return BindHandle(model, optimizer)


def label_smoothing(model: nn.Module) -> float:
    """The recipe's current label smoothing, for ``F.cross_entropy(..., label_smoothing=...)``.

    Example:
        >>> loss = F.cross_entropy(out, y, label_smoothing=tost_surgery.label_smoothing(model))
    """
    return surgery_of(model, "label_smoothing").schedule.label_smoothing()


def graph(model: nn.Module, *, training: bool | None = None) -> fx.GraphModule:
    """The rewritten graph of a prepared model, as a GraphModule to inspect.

    ``training`` picks the mode's graph (default: the model's current mode). The
    GraphModule shares the model's modules; printing it or its ``.graph`` shows every
    inserted node (tagged in ``node.meta["tost"]``).

    Example:
        >>> print(tost_surgery.graph(model).code)
    """
    surgery = surgery_of(model, "graph")
    variant = surgery.runner.default_variant
    name = surgery.decided.model_name
    if variant is None:
        raise StateError(
            f"graph: {name} runs eagerly: torch.fx could not trace it ({'; '.join(surgery.runner.notes)})."
        )
    mode = model.training if training is None else bool(training)
    return fx.GraphModule(model, copy.deepcopy(variant.graphs[mode]), class_name=f"{name}Tost")

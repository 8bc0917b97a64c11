"""Fold each eval-mode BatchNorm into the conv that feeds it: ``conv -> bn`` becomes ``conv'``.

Before::                               After::

    x -> conv(W, b) -> bn -> ...           x -> conv(W * s, (b - mean) * s + beta) -> Identity -> ...

with ``s = gamma / sqrt(running_var + eps)`` per output channel: zeros of ``W`` stay zeros, and
the sparse kernels then see the folded conv. A pair is folded only where the traced graph
shows the conv's output is read by that BatchNorm alone, and each module is called once.
The model keeps its own class and forward: the BatchNorm module becomes an ``nn.Identity``
(timm's ``BatchNormAct2d`` becomes its own dropout and activation, in that order).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
from torch import fx, nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Folded:
    """Which BatchNorms were folded into which convs, and why none were (when tracing failed)."""

    pairs: tuple[tuple[str, str], ...]
    note: str = ""


def fold_batchnorms(model: nn.Module) -> Folded:
    """Fold, in place, every BatchNorm of an eval-mode ``model`` that directly follows a conv.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> fold_batchnorms(net).pairs
        (('0', '1'),)
    """
    try:
        pairs = _foldable_pairs(model)
    except Exception as error:  # any failure of tracing leaves the model unfolded, not broken
        return Folded((), f"BatchNorm not folded: torch.fx could not trace the model ({type(error).__name__})")
    for conv_name, norm_name in pairs:
        norm = model.get_submodule(norm_name)
        _fold(model.get_submodule(conv_name), norm)
        _replace(model, norm_name, nn.Sequential(norm.drop, norm.act) if _is_norm_act(norm) else nn.Identity())
    return Folded(tuple(pairs))


class _LeafTracer(fx.Tracer):
    """Convs and norms are single nodes (timm's no-trace modules too, when timm is installed)."""

    def __init__(self) -> None:
        leaves, functions = _timm_leaves()
        super().__init__(autowrap_functions=functions)
        self.leaves = (*_CONVS, *_NORMS, *leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def _timm_leaves() -> tuple[tuple[type, ...], tuple]:
    if "timm" not in sys.modules:  # a timm model has imported it; importing it here would cost seconds
        return (), ()
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


def _foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    # Trace a throwaway copy: tracing can leave proxies in a model's own caches (levit).
    graph = _LeafTracer().trace(copy.deepcopy(model))
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[node.target] == 1 and calls[source.target] == 1 and _fits(model, source.target, node.target):
            pairs.append((source.target, node.target))
    return pairs


def _fits(model: nn.Module, conv_name: str, norm_name: str) -> bool:
    conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
    if not (type(norm) in _NORMS or _is_norm_act(norm)) or norm.running_mean is None or norm.training:
        return False
    if type(conv) not in _CONVS or conv.out_channels != norm.num_features:
        return False
    return conv.weight.is_floating_point() and conv.weight.dtype == norm.running_mean.dtype


def _is_norm_act(norm: nn.Module) -> bool:
    """timm's BatchNormAct2d: a BatchNorm2d, then its ``drop`` and ``act`` modules."""
    cls = type(norm)
    return cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.") and isinstance(norm, nn.BatchNorm2d)


@torch.no_grad()
def _fold(conv: nn.Module, norm: nn.Module) -> None:
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight = nn.Parameter(conv.weight * scale.view(shape), requires_grad=False)
    conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)

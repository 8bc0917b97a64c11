"""``accelerate``: an inference copy whose convs and Linears run sparse kernels where that is faster.

model (exact zeros) -> copy, eval -> fold BatchNorms -> record each layer's inputs on the example
  -> per conv/Linear: build candidates, check each against dense, time them paired and
     interleaved, keep dense unless one wins by min_speedup -> swap the winners in
  -> check the copy against the model on the example and random probes, else refuse
  -> time both end to end -> the copy, with its report
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._errors import StateError, TostSurgeryError, TostSurgeryWarning
from . import kernels
from ._decide import choose
from ._fold import fold_batchnorms
from ._report import DeployReport, LayerDecision, attach
from ._timing import PairedTimer, Timer, Timing
from ._verify import check

MAX_DENSITY = 0.5
"""Above this density sparse kernels are not timed (measured, one thread: dense won every conv
shape tried from 30%, and every Linear but one at batch 8, 1.2-1.3x up to 50%)."""


@dataclass(frozen=True)
class Call:
    """One call of a layer on the example: its positional inputs, and its output positions per channel."""

    args: tuple
    positions: int


_FIX_HINT = (
    "this is a bug of tost_surgery.deploy; meanwhile accelerate(..., fold_batchnorm=False) or "
    "min_speedup=float('inf') (every layer dense) shows which step breaks it."
)


def accelerate(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    min_speedup: float = 1.1,
    threads: int | None = None,
    fold_batchnorm: bool = True,
    native: bool = False,
    probes: int = 2,
    timer: Timer | None = None,
) -> nn.Module:
    """An inference copy of ``model`` whose layers run sparse kernels where they measured faster.

    Every conv/Linear runs a sparse kernel where paired, interleaved timing on the example's
    shapes, at ``threads`` (default: the count in use), found it at least ``min_speedup``
    times faster than dense; dense elsewhere. BatchNorms that follow a conv are folded into it
    (``fold_batchnorm``). The copy is checked against ``model`` on the example and ``probes``
    random inputs (within 1e-5 x max|output|, same argmax); ``accelerate`` raises rather than
    return a copy that does not match. ``model`` itself is left as it was.

    Args:
        native: also try the compiled conv kernel (built with torch's C++ extension tooling on
            first use, minutes; cached after). Without a compiler: a warning, and the torch-only
            kernels.
        timer: how candidates are timed (default :class:`PairedTimer`); tests inject timings here.

    Raises:
        TostSurgeryError: bad arguments, a prepared (not finalized) model, or a mismatch.

    Example:
        >>> fast = tost_surgery.deploy.accelerate(model, torch.randn(1, 3, 224, 224))
        >>> print(tost_surgery.deploy.report(fast))
    """
    inputs = _as_inputs(example_inputs)
    _check_arguments(model, min_speedup, threads, native, probes)
    timer = timer or PairedTimer()
    with _threads(threads) as count, torch.no_grad():
        reference = copy.deepcopy(model).eval()
        work = copy.deepcopy(model).eval()
        checks = [inputs, *_probes(inputs, probes)]
        expected = [reference(*x) for x in checks]
        folded = fold_batchnorms(work) if fold_batchnorm else None
        norm_of = {conv: norm for conv, norm in (folded.pairs if folded else ())}
        recorded = _record_calls(work, inputs)
        rows, notes = [], [folded.note] if folded and folded.note else []
        if not kernels.has_sparse_matmul():
            notes.append(_warn_no_mkl())
        if native:
            native, why = kernels.native_available()
            if not native:
                notes.append(_warn_no_native(why))
        for name, layer in list(_layers(work)):
            row = _decide_layer(work, name, layer, recorded.get(name, []), timer, min_speedup, native)
            rows.append(_with_fold(row, norm_of.get(name, "")))
        for i, (x, want) in enumerate(zip(checks, expected)):
            what = "the example" if i == 0 else f"random probe {i}"
            check(want, work(*x), f"The accelerated model, on {what},", _FIX_HINT)
        overall = timer("model", {"dense": lambda: reference(*inputs), "accelerated": lambda: work(*inputs)})
    attach(work, _report(rows, overall, count, min_speedup, notes))
    return work


def _decide_layer(
    model: nn.Module, name: str, layer: nn.Module, calls: list[Call], timer: Timer, min_speedup: float, native: bool
) -> LayerDecision:
    weight = getattr(layer, "weight", None)
    density = float((weight != 0).sum()) / weight.numel() if weight is not None else None
    kind = _describe(layer)
    macs = sum(call.positions for call in calls) * weight.numel() if weight is not None else 0
    builders, why = kernels.candidates(layer, native)
    if density is not None and density > MAX_DENSITY and any(map(kernels.is_sparse, builders)):
        builders = {k: b for k, b in builders.items() if not kernels.is_sparse(k)}
        why = f"density > {MAX_DENSITY:.0%}: no sparse timing"
    if not calls:
        builders, why = {}, "not called on the example"
    if not builders:
        return LayerDecision(name, kind, density, macs, "dense", why)
    built = {kernel: build(layer) for kernel, build in builders.items()}
    runners = {"dense": _Runner(layer, calls), **{k: _Runner(m, calls) for k, m in built.items()}}
    timing = timer(name, runners)
    for kernel in built:  # the outputs of the last timed call: no extra call to check them
        what = f"Kernel {kernel!r} for layer {name!r} ({kind})"
        check(runners["dense"].last(), runners[kernel].last(), what, _FIX_HINT, argmax=False)
    choice = choose(timing, min_speedup)
    best = max(timing.speedup, key=timing.speedup.__getitem__)
    if choice.kernel != "dense":
        _replace(model, layer, built[choice.kernel])
    return LayerDecision(
        name, kind, density, macs, choice.kernel, "; ".join(filter(None, (why, choice.reason))),
        dense_ms=1e3 * timing.seconds["dense"], sparse_ms=1e3 * timing.seconds[best], speedup=timing.speedup[best],
        candidate=best,
    )  # fmt: skip


class _Runner:
    """Runs a layer on its recorded calls; keeps the outputs of the last run for the check."""

    def __init__(self, module: nn.Module, calls: list[Call]) -> None:
        self.module, self.calls, self.outputs = module, calls, None

    def __call__(self) -> None:
        self.outputs = [self.module(*call.args) for call in self.calls]

    def last(self) -> list:
        if self.outputs is None:  # a timer that did not run it
            self()
        return self.outputs


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, *kernels.POOLS)):
            yield name, module


def _record_calls(model: nn.Module, inputs: tuple) -> dict[str, list[Call]]:
    """The positional inputs and output size of every conv/Linear call, on one run of the example."""
    recorded: dict[str, list[Call]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            weight = getattr(module, "weight", None)  # pooling layers have none
            positions = output.numel() // weight.shape[0] if weight is not None else 0
            recorded.setdefault(name, []).append(Call(tuple(a.detach() for a in args), positions))

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in _layers(model)]
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (a shared layer may sit under several names)."""
    for parent in [m for m in model.modules() if m is not new]:  # a wrapper keeps the layer it wraps
        for attr, child in list(parent._modules.items()):
            if child is old:
                parent._modules[attr] = new


def _with_fold(row: LayerDecision, norm: str) -> LayerDecision:
    return row if not norm else LayerDecision(**{**row.__dict__, "folded": norm})


def _describe(layer: nn.Module) -> str:
    kind = type(layer).__name__
    if isinstance(layer, nn.Linear):
        return f"{kind} {layer.in_features}->{layer.out_features}"
    size = layer.kernel_size if isinstance(layer.kernel_size, tuple) else (layer.kernel_size,) * 2
    stride = layer.stride if isinstance(layer.stride, tuple) else (layer.stride,) * 2
    text = f"{kind} {'x'.join(map(str, size))}"
    if any(s != 1 for s in stride):
        text += f"/{stride[0] if len(set(stride)) == 1 else stride}"
    if getattr(layer, "groups", 1) != 1:
        text += " dw" if layer.groups == layer.in_channels == layer.out_channels else f" g{layer.groups}"
    return text


def _mac_ratio(rows: list[LayerDecision]) -> float:
    """Dense / nonzero multiply-adds of the convs and Linears on the example."""
    nonzero = sum(row.macs * row.density for row in rows if row.density is not None)
    return sum(row.macs for row in rows) / nonzero if nonzero else math.inf


def _report(
    rows: list[LayerDecision], overall: Timing, threads: int, min_speedup: float, notes: list[str]
) -> DeployReport:
    return DeployReport(
        rows=rows,
        dense_ms=1e3 * overall.seconds["dense"],
        accelerated_ms=1e3 * overall.seconds["accelerated"],
        speedup=overall.speedup["accelerated"],
        mac_ratio=_mac_ratio(rows),
        threads=threads,
        min_speedup=min_speedup,
        notes=tuple(notes),
    )


def _warn_no_mkl() -> str:
    note = "torch has no MKL sparse support (CSR x dense) in this build: every layer stays dense"
    warnings.warn(f"deploy.accelerate: {note}; the copy is dense.", TostSurgeryWarning, stacklevel=3)
    return note


def _warn_no_native(why: str) -> str:
    note = f"the native kernel could not be built ({why}): the torch-only kernels ran"
    warnings.warn(f"deploy.accelerate: {note}.", TostSurgeryWarning, stacklevel=3)
    return note


def _probes(inputs: tuple, count: int) -> list[tuple]:
    """Random inputs shaped like the example, with its mean and spread (integer inputs kept)."""
    generator = torch.Generator().manual_seed(0)
    probes = []
    for _ in range(count):
        probe = []
        for x in inputs:
            if x.is_floating_point():
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                probe.append(noise * x.std().nan_to_num(1.0) + x.mean())
            else:
                probe.append(x)
        probes.append(tuple(probe))
    return probes


def _as_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TostSurgeryError(
            "accelerate takes example_inputs as a tensor or a tuple of tensors (the model's positional inputs),\n"
            f"found {type(example_inputs).__name__}.\nHint: accelerate(model, torch.randn(1, 3, 224, 224))"
        )
    if any(x.device.type != "cpu" for x in inputs):
        raise TostSurgeryError(
            "accelerate makes a CPU inference copy; expected example inputs on the CPU,\n"
            f"found devices {sorted({x.device.type for x in inputs})}.\nHint: pass model.cpu() and x.cpu()."
        )
    return tuple(inputs)


def _check_arguments(model: object, min_speedup: object, threads: object, native: object, probes: object) -> None:
    if not isinstance(model, nn.Module):
        raise TostSurgeryError(f"accelerate takes an nn.Module, found {type(model).__name__}.")
    if getattr(model, "tost", None) is not None or any(parametrize.is_parametrized(m) for m in model.modules()):
        raise StateError(
            f"{type(model).__name__} is prepared (it has mask parametrizations or scaffolding);\n"
            "expected: a plain model whose weights hold exact zeros\nfound: a prepared model\n"
            "Hint: model = tost_surgery.finalize(model) first."
        )
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or not min_speedup > 0:
        raise TostSurgeryError(f"min_speedup must be a number > 0, found {min_speedup!r}.\nHint: min_speedup=1.1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise TostSurgeryError(f"threads must be None or an int >= 1, found {threads!r}.\nHint: threads=1")
    if not isinstance(native, bool):
        raise TostSurgeryError(f"native must be True or False, found {native!r}.\nHint: native=True")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
        raise TostSurgeryError(f"probes must be an int >= 0, found {probes!r}.\nHint: probes=2")


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

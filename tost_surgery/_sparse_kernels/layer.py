"""A masked Conv/Linear that runs the sparse training kernels where they measured faster.

``prepare(..., sparse_kernels="auto")`` makes one :class:`SparseLayer` per eligible masked
layer, under ``model.tost.kernels``; once no scaffolding is left in the graph, the graph calls
it instead of the layer. It holds no parameter or buffer (``state_dict`` is unchanged) and
reads the layer's own dense weight, so optimizers, checkpoints and data-parallel wrappers see
the same tensors. At the first training forward it decides, once, between the layer's dense
masked path and the sparse kernels: by paired timing of forward + backward on that call's
input (``"auto"``), or sparse outright (``"on"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._masking import MaskParametrization
from .._write_through import cached_by_version
from ..deploy._decide import Choice, choose
from ..deploy._timing import PairedTimer, Timer
from ..deploy.kernels import ConvGeometry, candidates
from .conv import ConvStructure, sparse_conv
from .linear import LinearStructure, sparse_linear

MODES = ("off", "auto", "on")
SPARSE = "sparse"
PENDING = "pending"


@dataclass(frozen=True)
class KernelPolicy:
    """How the layers choose: ``mode`` (``"auto"`` or ``"on"``), the timer, the speedup a sparse kernel needs."""

    mode: str
    timer: Timer
    min_speedup: float = 1.1

    @classmethod
    def of(cls, mode: str, timer: Timer | None) -> KernelPolicy:
        """The policy for ``prepare``'s arguments (the default timer keeps autograd on: it times a backward)."""
        return cls(mode, timer or PairedTimer(inference=False))


def ineligible(layer: nn.Module) -> str:
    """Why a layer with a masked weight cannot run the sparse kernels ("" when it can)."""
    if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return f"{type(layer).__name__}: no sparse training kernel"
    builders, why = candidates(layer)
    return "" if "csr" in builders else why or f"{type(layer).__name__}: no CSR kernel"


class SparseLayer(nn.Module):
    """Runs ``layer`` (a parametrized Conv1d/Conv2d/Linear) on the sparse kernels once chosen, else as is.

    ``choice`` is None until decided. Not registered as a submodule of it: the layer stays where
    it is in the model (and in ``state_dict``).

    Example:
        >>> tost.status(model).sparse_kernels["layer4.0.conv1"]
        'sparse (2.54x)'
    """

    def __init__(self, name: str, layer: nn.Module, policy: KernelPolicy) -> None:
        super().__init__()
        self.name = name
        self.__dict__["layer"] = layer  # a plain reference: not a submodule, not in state_dict
        self.policy = policy
        self.choice: Choice | None = None
        self.speedup: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not self._can_run(x):
            return layer(x)
        if self.choice is None:
            if not (self.training and torch.is_grad_enabled()):
                return layer(x)  # decided on a training call, on its shapes
            self.choice = self._decide(x)
        return self.sparse(x) if self.choice.kernel == SPARSE else layer(x)

    def sparse(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's map on the sparse kernels (its dense weight read at the mask's nonzeros)."""
        layer = self.layer
        weight = layer.parametrizations.weight.original
        mask = _mask_of(layer)
        structure = cached_by_version(self, "_structure", mask, self._structure_of)
        if isinstance(layer, nn.Linear):
            return sparse_linear(x, weight, layer.bias, structure)
        return sparse_conv(x, weight, layer.bias, structure)

    def describe(self) -> str:
        """``pending``, ``sparse (2.54x)`` (or ``sparse`` when not timed), or ``dense: why``, for status."""
        if self.choice is None:
            return PENDING
        if self.choice.kernel == SPARSE:
            return SPARSE if self.speedup is None else f"{SPARSE} ({self.speedup:.2f}x)"
        return f"dense: {self.choice.reason}"

    def _structure_of(self, mask: torch.Tensor) -> LinearStructure | ConvStructure:
        kept = mask != 0
        if isinstance(self.layer, nn.Linear):
            return LinearStructure.of(kept)
        return ConvStructure.of(kept, ConvGeometry.of(self.layer))

    def _can_run(self, x: torch.Tensor) -> bool:
        """CPU, the weight's dtype, no autocast, not under torch.compile (which keeps the dense path)."""
        weight = self.layer.parametrizations.weight.original
        return (
            x.device.type == "cpu"
            and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        )

    def _decide(self, x: torch.Tensor) -> Choice:
        if self.policy.mode == "on":
            return Choice(SPARSE)
        timing = self.policy.timer(self.name, _step_candidates(self, x))
        self.speedup = timing.speedup.get(SPARSE)
        return choose(timing, self.policy.min_speedup)


def _mask_of(layer: nn.Module) -> torch.Tensor:
    return next(p.mask for p in layer.parametrizations.weight if isinstance(p, MaskParametrization))


def _step_candidates(kernel: SparseLayer, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Forward + backward of the dense masked path and of the sparse kernels on ``x``'s shapes."""
    layer = kernel.layer
    probe = x.detach().requires_grad_(x.requires_grad)
    weight = layer.parametrizations.weight.original
    inputs = [t for t in (probe, weight, layer.bias) if t is not None and t.requires_grad]
    with torch.no_grad():
        grad = torch.randn_like(layer(probe))

    def step(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(forward(probe), inputs, grad) if inputs else forward(probe)

    return {"dense": step(layer), SPARSE: step(kernel.sparse)}

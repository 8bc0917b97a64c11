"""A masked Conv/Linear that runs the sparse training kernels where they measured faster.

``prepare(..., sparse_kernels="auto")`` makes one :class:`SparseLayer` per eligible masked
layer, under ``model.tost.kernels``; once no scaffolding is left in the graph, the graph calls
it instead of the layer. It holds no parameter or buffer (``state_dict`` is unchanged) and
reads the layer's own dense weight, so optimizers, checkpoints and data-parallel wrappers see
the same tensors. At the first training forward it decides, once, between the layer's dense
masked path and the sparse kernels: by paired timing of forward + backward on that call's
input (``"auto"``), or sparse outright (``"on"``). With ``native`` (``prepare(...,
native_kernels=True)``) a float32 conv that is not pointwise has a third candidate, the
compiled fused kernels (``native``), and ``"on"`` picks them.
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
from .native import NativeStructure, native_sparse_conv

MODES = ("off", "auto", "on")
SPARSE = "sparse"
NATIVE = "native"
PENDING = "pending"


@dataclass(frozen=True)
class KernelPolicy:
    """How the layers choose: ``mode`` (``"auto"`` or ``"on"``), the timer, the speedup a sparse kernel needs,
    and whether the compiled kernels (built) are candidates."""

    mode: str
    timer: Timer
    min_speedup: float = 1.1
    native: bool = False

    @classmethod
    def of(cls, mode: str, timer: Timer | None, native: bool = False) -> KernelPolicy:
        """The policy for ``prepare``'s arguments (the default timer keeps autograd on: it times a backward)."""
        return cls(mode, timer or PairedTimer(inference=False), native=native)


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
        if self.choice.kernel == SPARSE:
            return self.sparse(x)
        return self.native(x) if self.choice.kernel == NATIVE else layer(x)

    def sparse(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's map on the sparse kernels (its dense weight read at the mask's nonzeros)."""
        layer = self.layer
        weight = layer.parametrizations.weight.original
        mask = _mask_of(layer)
        structure = cached_by_version(self, "_structure", mask, self._structure_of)
        if isinstance(layer, nn.Linear):
            return sparse_linear(x, weight, layer.bias, structure)
        return sparse_conv(x, weight, layer.bias, structure)

    def native(self, x: torch.Tensor) -> torch.Tensor:
        """The conv on the compiled fused kernels (:mod:`.native`), its dense weight read at the mask's nonzeros."""
        layer = self.layer
        mask = _mask_of(layer)
        geometry = ConvGeometry.of(layer)
        structure = cached_by_version(self, "_native", mask, lambda m: NativeStructure.of(m != 0, geometry))
        return native_sparse_conv(x, layer.parametrizations.weight.original, layer.bias, structure)

    def describe(self) -> str:
        """``pending``, ``sparse (2.54x)`` / ``native (<speedup>x)`` (no figure when not timed), or ``dense: why``."""
        if self.choice is None:
            return PENDING
        if self.choice.kernel in (SPARSE, NATIVE):
            kernel = self.choice.kernel
            return kernel if self.speedup is None else f"{kernel} ({self.speedup:.2f}x)"
        return f"dense: {self.choice.reason}"

    def native_fits(self) -> bool:
        """Whether the compiled kernels are a candidate: asked for, a float32 conv, not pointwise."""
        layer = self.layer
        return (
            self.policy.native
            and isinstance(layer, (nn.Conv1d, nn.Conv2d))
            and layer.parametrizations.weight.original.dtype == torch.float32
            and not ConvGeometry.of(layer).is_pointwise
        )

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
            return Choice(NATIVE if self.native_fits() else SPARSE)
        timing = self.policy.timer(self.name, _step_candidates(self, x))
        choice = choose(timing, self.policy.min_speedup)
        self.speedup = timing.speedup.get(choice.kernel)
        return choice


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

    steps = {"dense": step(layer), SPARSE: step(kernel.sparse)}
    if kernel.native_fits():
        steps[NATIVE] = step(kernel.native)
    return steps

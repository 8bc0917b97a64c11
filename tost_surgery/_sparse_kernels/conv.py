"""Conv1d / Conv2d for a masked weight: per-tap CSR forward, per-tap CSR of W^T for the input
gradient, the weight gradient at the mask's nonzeros only.

As the deploy kernel (``deploy.kernels.csr_conv``) does, every kernel tap is one CSR matrix
times a shifted view of a zero-padded, channel-major copy of the input (its tap matrices and
geometry are used as they are). The copy is laid out image-major, ``(C, N, rows, cols)``,
where the deploy kernel puts the batch innermost: a tap's view over the whole batch is then a
contiguous matrix, and the output comes back to ``(N, O, H, W)`` by a copy of whole rows
(64 channels, 32x32, batch 32, one thread: 2.6-2.8 ms against 11-16 ms from batch-innermost;
the price is computing on the padded grid, 13% more columns at 32x32 with a 3x3 kernel).
Backward reads the same layout:

- the output gradient is laid out ``(O, N, rows, cols)`` with zeros past the output's edge,
  a row-major ``(O, L)`` matrix ``G``;
- input gradient: every tap adds ``W_tap^T @ G`` into the same shifted view of a zero buffer
  shaped like the padded input, and the part that holds input is read back;
- weight gradient: every tap's ``G @ view_tap^T``, computed only at its kept positions
  (``torch.sparse.sampled_addmm``; its CPU kernel reads a contiguous view in place, and a view
  with a longer row stride cost it 17x more in one measurement, so the views stay whole).

A 1x1 conv without padding multiplies the (subsampled) images directly. Padding modes other
than zeros pad first (differentiably, ``F.pad``) and run the rest as an unpadded conv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..deploy.kernels.csr_conv import ConvGeometry, _first, _tap_matrices, _taps, conv2d
from ._index import csr_positions, position_matrix, positions_of
from .linear import LinearStructure


@dataclass(frozen=True)
class TapStructure:
    """One kernel tap that holds a kept weight: where it reads, and its ``(out, in)`` CSR for ``W`` and ``W^T``."""

    phase: int
    row_shift: int
    col_shift: int
    csr: LinearStructure


@dataclass(frozen=True)
class ConvStructure:
    """The kept positions of a conv weight, per kernel tap, for a zero-padded geometry.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1)
        >>> len(ConvStructure.of(torch.ones_like(conv.weight, dtype=torch.bool), ConvGeometry.of(conv)).taps)
        9
    """

    geometry: ConvGeometry
    """The geometry the taps run under (padding modes other than zeros: already padded, so none)."""
    padding: ConvGeometry
    """The layer's own geometry (for its padding mode and pads)."""
    out_channels: int
    in_channels: int
    taps: tuple[TapStructure, ...]
    crow: torch.Tensor
    """The taps' row pointers stacked, and their columns and positions concatenated, as the deploy kernel keeps them."""
    col: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor, geometry: ConvGeometry) -> ConvStructure:
        """The structure of a conv's boolean (or 0/1) mask, shaped like its weight."""
        inner = _zero_padded(geometry)
        out_channels, group_in = mask.shape[:2]
        positions = position_matrix(mask).reshape(out_channels, group_in, *geometry.kernel)
        taps = tuple(_tap_structure(tap) for tap in _taps(positions, inner))
        in_channels = group_in * geometry.groups
        crow = torch.stack([t.csr.crow for t in taps]) if taps else torch.zeros(0, out_channels + 1, dtype=torch.int32)
        col = torch.cat([t.csr.col for t in taps]) if taps else torch.zeros(0, dtype=torch.int32)
        flat = torch.cat([t.csr.positions for t in taps]) if taps else torch.zeros(0, dtype=torch.int64)
        return cls(inner, geometry, out_channels, in_channels, taps, crow, col, flat)

    def matrices(self, weight: torch.Tensor) -> list:
        """The deploy kernel's tap matrices, their values read from ``weight`` now."""
        layout = [(t.phase, t.row_shift, t.col_shift) for t in self.taps]
        return _tap_matrices(self.crow, self.col, weight.reshape(-1)[self.positions], layout, self.in_channels)


def _tap_structure(tap) -> TapStructure:  # noqa: ANN001 - the deploy kernel's Tap, its values are positions
    matrix = tap.matrix
    csr = LinearStructure(
        tuple(matrix.shape), matrix.crow_indices(), matrix.col_indices(), positions_of(matrix.values()),
        *csr_positions(matrix.to_dense().T),
    )  # fmt: skip
    return TapStructure(tap.phase, tap.row_shift, tap.col_shift, csr)


def _zero_padded(geometry: ConvGeometry) -> ConvGeometry:
    if geometry.padding_mode == "zeros":
        return geometry
    return replace(geometry, pads=(0, 0, 0, 0), padding_mode="zeros")


CHUNK = 2048
"""Output columns per product: across the taps the output block stays in cache (the forward's
nine taps at 64 channels, 32x32, batch 32, 2% density, one thread on a loaded machine: 22.4 ms
unchunked, 11.8 ms at 2048 columns, 12.4 ms at 1024, 13.8 ms at 4096)."""


@dataclass(frozen=True)
class Planes:
    """The zero-padded input laid out ``(phases, C, N, rows, cols)`` in one flat buffer, with a zero tail.

    A tap's shifted view over every image at once is a contiguous ``(C, N * rows * cols)`` matrix
    at an offset: outputs are computed on the padded grid (the rows and columns past the output's
    edge are dropped), and the tail keeps the last view inside the buffer.
    """

    buffer: torch.Tensor
    shape: tuple[int, int, int, int, int]

    @classmethod
    def of(cls, x: torch.Tensor, geometry: ConvGeometry, phases: frozenset[int]) -> Planes:
        batch, channels, height, width = x.shape
        (sh, sw), (left, right, top, bottom) = geometry.stride, geometry.pads
        rows, cols = -(-(height + top + bottom) // sh), -(-(width + left + right) // sw)
        shape = (sh * sw, channels, batch, rows, cols)
        planes = cls(x.new_zeros(sh * sw * channels * batch * rows * cols + rows * cols), shape)
        grid = planes.grid()
        for a, b, first_row, first_col, source in _phase_slices(x, geometry):
            if a * sw + b in phases:
                target = grid[a * sw + b, :, :, first_row : first_row + source.shape[2]]
                target[..., first_col : first_col + source.shape[3]].copy_(source.transpose(0, 1))
        return planes

    @property
    def plane(self) -> int:
        """Elements of one channel of one phase: ``N * rows * cols``."""
        return self.shape[2] * self.shape[3] * self.shape[4]

    def grid(self) -> torch.Tensor:
        """The buffer without its tail, as ``(phases, C, N, rows, cols)``."""
        return self.buffer[: self.plane * self.shape[0] * self.shape[1]].view(self.shape)

    def rows(self, tap: TapStructure, start: int, length: int) -> torch.Tensor:
        """Columns ``start : start + length`` of the tap's shifted ``(C, N * rows * cols)`` view."""
        offset = (tap.phase * self.shape[1]) * self.plane + tap.row_shift * self.shape[4] + tap.col_shift
        return self.buffer.as_strided((self.shape[1], length), (self.plane, 1), offset + start)


def _phase_slices(x: torch.Tensor, geometry: ConvGeometry):  # noqa: ANN202
    """Per stride phase ``(a, b)`` that holds input: its first plane row and column, and its input slice."""
    height, width = x.shape[2:]
    (sh, sw), (left, _, top, _) = geometry.stride, geometry.pads
    for a in range(sh):
        first_row, row_start = _first(a, top, sh)
        for b in range(sw):
            first_col, col_start = _first(b, left, sw)
            if row_start < height and col_start < width:
                yield a, b, first_row, first_col, x[:, :, row_start::sh, col_start::sw]


class SparseConvFunction(torch.autograd.Function):
    """``conv2d(x, weight * mask, bias)`` (zero padding) on the mask's nonzeros, forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, structure):  # noqa: ANN001, ANN205 - autograd's protocol
        ctx.structure = structure
        ctx.has_bias = bias is not None
        ctx.input_shape = x.shape
        if structure.geometry.is_pointwise:
            ctx.save_for_backward(x, weight)
            return conv2d(x, structure.matrices(weight), structure.geometry, bias, structure.out_channels)
        planes = Planes.of(x, structure.geometry, frozenset(t.phase for t in structure.taps))
        ctx.planes_shape = planes.shape
        ctx.save_for_backward(planes.buffer, weight)
        return _tap_forward(planes, x.shape, weight, bias, structure)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        saved, weight = ctx.saved_tensors
        structure: ConvStructure = ctx.structure
        grad_out = grad_out.contiguous()
        if structure.geometry.is_pointwise:
            grad_x, tap_grads = _pointwise_backward(saved, weight, grad_out, structure, ctx.needs_input_grad)
        else:
            planes = Planes(saved, ctx.planes_shape)
            grad_x, tap_grads = _tap_backward(
                planes, ctx.input_shape, weight, grad_out, structure, ctx.needs_input_grad
            )
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = weight.new_zeros(weight.numel())
            if tap_grads:
                grad_weight[structure.positions] = torch.cat(tap_grads)
            grad_weight = grad_weight.view(weight.shape)
        grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def _tap_forward(
    planes: Planes, shape: torch.Size, weight: torch.Tensor, bias: torch.Tensor | None, structure: ConvStructure
) -> torch.Tensor:
    """Every tap's CSR matrix times its shifted view, in blocks of ``CHUNK`` columns."""
    out_h, out_w = structure.geometry.output_size(shape[2], shape[3])
    out = planes.buffer.new_empty(structure.out_channels, planes.plane)
    matrices = [tap.matrix for tap in structure.matrices(weight)]
    for start in range(0, planes.plane, CHUNK):
        length = min(CHUNK, planes.plane - start)
        block, beta = out[:, start : start + length], 0.0  # beta 0: the first product overwrites
        for tap, matrix in zip(structure.taps, matrices):
            block.addmm_(matrix, planes.rows(tap, start, length), beta=beta)
            beta = 1.0
    if not structure.taps:
        out.zero_()
    return _output(out, planes, (out_h, out_w), bias, structure.out_channels)


def _output(
    out: torch.Tensor, planes: Planes, size: tuple[int, int], bias: torch.Tensor | None, out_channels: int
) -> torch.Tensor:
    """``(O, N * rows * cols)`` on the padded grid to ``(N, O, out_h, out_w)``, plus the bias."""
    (out_h, out_w), (_, _, batch, rows, cols) = size, planes.shape
    grid = out.view(-1, batch, rows, cols)[:, :, :out_h, :out_w].transpose(0, 1)
    result = out.new_empty(batch, out_channels, out_h, out_w)
    if bias is None:
        return result.copy_(grid)
    return torch.add(grid, bias.view(1, -1, 1, 1), out=result)


def _tap_backward(planes, shape, weight, grad_out, structure, needs):  # noqa: ANN001, ANN202
    """Input gradient and per-tap weight gradient values through the shifted views (module docstring)."""
    out_channels = structure.out_channels
    grad_rows = _grad_rows(grad_out, planes, out_channels, front=0).view(out_channels, planes.plane)
    grad_planes = Planes(torch.zeros_like(planes.buffer), planes.shape) if needs[0] else None
    if grad_planes is not None:
        transposed = [t.csr.transposed(weight) for t in structure.taps]
        for start in range(0, planes.plane, CHUNK):
            length = min(CHUNK, planes.plane - start)
            for tap, matrix in zip(structure.taps, transposed):
                grad_planes.rows(tap, start, length).addmm_(matrix, grad_rows[:, start : start + length])
    tap_grads = []
    if needs[1]:
        for tap in structure.taps:
            view = planes.rows(tap, 0, planes.plane)
            tap_grads.append(_sampled(tap, grad_rows, view))
    grad_x = None if grad_planes is None else _unpad(grad_planes, structure.geometry, shape)
    return grad_x, tap_grads


def _grad_rows(grad_out: torch.Tensor, planes: Planes, out_channels: int, front: int) -> torch.Tensor:
    """The output gradient on the padded grid, zeros past the output's edge: ``O * N * rows * cols`` values.

    They follow ``front`` zeros in the flat buffer returned (the fused input gradient reads before row 0).
    """
    _, _, batch, rows, cols = planes.shape
    out_h, out_w = grad_out.shape[2:]
    buffer = grad_out.new_zeros(front + out_channels * planes.plane)
    grid = buffer[front:].view(out_channels, batch, rows, cols)
    grid[:, :, :out_h, :out_w].copy_(grad_out.transpose(0, 1))
    return buffer


def _sampled(tap: TapStructure, grad_rows: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """``grad_rows @ view^T`` at the tap's kept positions, in its CSR order."""
    pattern = tap.csr.pattern(grad_rows.dtype)
    return torch.sparse.sampled_addmm(pattern, grad_rows, view.T, beta=0.0).values()


def _unpad(grad_planes: Planes, geometry: ConvGeometry, shape: torch.Size) -> torch.Tensor:
    """The gradient of :meth:`Planes.of`: the buffer's entries that hold input, as ``(N, C, H, W)``."""
    grad_x = grad_planes.buffer.new_zeros(shape)
    grid, sw = grad_planes.grid(), geometry.stride[1]
    for a, b, first_row, first_col, target in _phase_slices(grad_x, geometry):
        source = grid[a * sw + b, :, :, first_row : first_row + target.shape[2]]
        target.copy_(source[..., first_col : first_col + target.shape[3]].transpose(0, 1))
    return grad_x


def _pointwise_backward(x, weight, grad_out, structure, needs):  # noqa: ANN001, ANN202
    """A 1x1 conv without padding: the (subsampled) images are the matrices."""
    sh, sw = structure.geometry.stride
    sampled = x[:, :, ::sh, ::sw]
    batch, channels = sampled.shape[:2]
    out_channels = structure.out_channels
    grad_rows = grad_out.permute(1, 0, 2, 3).reshape(out_channels, -1)  # (O, N * HW)
    grad_x, tap_grads = None, []
    if not structure.taps:
        return (torch.zeros_like(x) if needs[0] else None), tap_grads
    tap = structure.taps[0]
    if needs[0]:
        transposed = tap.csr.transposed(weight)
        grad_sampled = torch.zeros(channels, grad_rows.shape[1], dtype=x.dtype).addmm_(transposed, grad_rows)
        grad_x = torch.zeros_like(x)
        grad_x[:, :, ::sh, ::sw] = grad_sampled.view(channels, batch, *sampled.shape[2:]).transpose(0, 1)
    if needs[1]:
        images = sampled.permute(1, 0, 2, 3).reshape(channels, -1)
        tap_grads.append(_sampled(tap, grad_rows, images))
    return grad_x, tap_grads


def sparse_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, structure: ConvStructure
) -> torch.Tensor:
    """``conv.forward(x)`` with ``weight`` read (and differentiated) only at ``structure``'s positions.

    Takes a Conv1d's or Conv2d's input, weight and bias (any padding mode).

    Example:
        >>> conv = nn.Conv2d(8, 16, 3, padding=1)
        >>> structure = ConvStructure.of(torch.rand(conv.weight.shape) < 0.1, ConvGeometry.of(conv))
        >>> sparse_conv(torch.randn(2, 8, 9, 9), conv.weight, conv.bias, structure).shape
        torch.Size([2, 16, 9, 9])
    """
    return through_2d(x, structure.padding, lambda x2d: SparseConvFunction.apply(x2d, weight, bias, structure))


def through_2d(x: torch.Tensor, padding: ConvGeometry, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run`` on ``x`` as a zero-padded-geometry 2-D input: a Conv1d's gains a height of 1, other
    padding modes pad first (differentiably); the output comes back in ``x``'s dimensions."""
    is_1d = padding.spatial_dims == 1
    x2d = x.unsqueeze(2) if is_1d else x
    if padding.padding_mode != "zeros":
        x2d = F.pad(x2d, padding.pads, mode=padding.padding_mode)
    out = run(x2d)
    return out.squeeze(2) if is_1d else out

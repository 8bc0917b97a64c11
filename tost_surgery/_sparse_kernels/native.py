"""Optional compiled training conv: forward, input gradient and weight gradient with the tap loop fused.

The torch-only conv (``conv``) makes one MKL call per kernel tap, and each call streams the
activations again. These kernels read the same image-major padded input (:class:`conv.Planes`)
and the same zero-extended output gradient, but every kept weight of a row, all taps together,
is applied in one pass over a block of ``CHUNK`` columns that stays in cache:

- ``gather_rows`` (forward, and the input gradient): ``out[r, m] = sum_k w[k] * src[offset[k] + m]``,
  64 columns held in vector registers while the row's nonzeros add their shifted rows. The input
  gradient is the same map with the output gradient as source and ``W^T``'s rows, shifts negated:
  every padded-input position gathers what its taps scattered, written once.
- ``sampled_rows`` (weight gradient): ``out[k] = sum_m grad[row_k, m] * src[offset[k] + m]``, the
  output-gradient row staying in L1 while each of its nonzeros streams its shifted input row.

Compiled with torch's C++ extension tooling on first use (``prepare(..., native_kernels=True)``);
without a compiler the torch-only kernels run, with a warning saying why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..deploy.kernels._build import availability, build_extension
from .conv import ConvStructure, Planes, _grad_rows, _output, _unpad, sparse_conv, through_2d

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>

constexpr int64_t LANES = 16;
constexpr int64_t TILE = 4 * LANES;
constexpr int64_t CHUNK = 2048;  // columns per block: a multiple of TILE
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));  // GCC/Clang vectors

static inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));  // an unaligned vector load
  return v;
}

static inline float total(vec v) {
  float s = 0.0f;
  for (int64_t j = 0; j < LANES; ++j) s += v[j];
  return s;
}

// out (rows, length): out[r, m] = sum over k in [row_ptr[r], row_ptr[r + 1]) of
// values[k] * src[offsets[k] + m]. Every src[offsets[k] + m], m < length, must be inside src.
torch::Tensor gather_rows(torch::Tensor src, torch::Tensor row_ptr, torch::Tensor offsets,
                          torch::Tensor values, int64_t length) {
  const int64_t rows = row_ptr.size(0) - 1;
  auto out = torch::empty({rows, length}, src.options());
  const float* s = src.data_ptr<float>();
  const int32_t* ptr = row_ptr.data_ptr<int32_t>();
  const int64_t* offs = offsets.data_ptr<int64_t>();
  const float* vals = values.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t chunks = (length + CHUNK - 1) / CHUNK;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * CHUNK, stop = std::min(start + CHUNK, length);
      for (int64_t r = 0; r < rows; ++r) {
        float* d = dst + r * length;
        int64_t m = start;
        for (; m + TILE <= stop; m += TILE) {
          vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
          for (int32_t k = ptr[r]; k < ptr[r + 1]; ++k) {
            const float* p = s + offs[k] + m;
            const vec w = vals[k] - (vec){0};  // broadcast
            a0 += w * load(p);
            a1 += w * load(p + LANES);
            a2 += w * load(p + 2 * LANES);
            a3 += w * load(p + 3 * LANES);
          }
          std::memcpy(d + m, &a0, sizeof(vec));
          std::memcpy(d + m + LANES, &a1, sizeof(vec));
          std::memcpy(d + m + 2 * LANES, &a2, sizeof(vec));
          std::memcpy(d + m + 3 * LANES, &a3, sizeof(vec));
        }
        for (; m < stop; ++m) {
          float a = 0.0f;
          for (int32_t k = ptr[r]; k < ptr[r + 1]; ++k) a += vals[k] * s[offs[k] + m];
          d[m] = a;
        }
      }
    }
  });
  return out;
}

// out (nnz): out[k] = sum over m < length of grad[r * length + m] * src[offsets[k] + m], r the
// row that k belongs to (by row_ptr).
torch::Tensor sampled_rows(torch::Tensor src, torch::Tensor grad, torch::Tensor row_ptr,
                           torch::Tensor offsets, int64_t length) {
  const int64_t rows = row_ptr.size(0) - 1;
  auto out = torch::zeros({offsets.size(0)}, src.options());
  const float* s = src.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const int32_t* ptr = row_ptr.data_ptr<int32_t>();
  const int64_t* offs = offsets.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t start = 0; start < length; start += CHUNK) {
      const int64_t stop = std::min(start + CHUNK, length);
      for (int64_t r = begin; r < end; ++r) {
        const float* gr = g + r * length;
        for (int32_t k = ptr[r]; k < ptr[r + 1]; ++k) {
          const float* p = s + offs[k];
          vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
          int64_t m = start;
          for (; m + TILE <= stop; m += TILE) {
            a0 += load(gr + m) * load(p + m);
            a1 += load(gr + m + LANES) * load(p + m + LANES);
            a2 += load(gr + m + 2 * LANES) * load(p + m + 2 * LANES);
            a3 += load(gr + m + 3 * LANES) * load(p + m + 3 * LANES);
          }
          float a = total((a0 + a1) + (a2 + a3));
          for (; m < stop; ++m) a += gr[m] * p[m];
          dst[k] += a;
        }
      }
    }
  });
  return out;
}
"""


def training_extension() -> object:
    """The compiled training kernels, or the exception that stopped the build (built once per process).

    Example:
        >>> isinstance(training_extension(), Exception)  # False where a C++ compiler is installed
        False
    """
    return build_extension("tost_surgery_train_native_v1", _SOURCE, ("gather_rows", "sampled_rows"))


def training_native_available() -> tuple[bool, str]:
    """``(True, "")`` once the training extension is built, else ``(False, why not)``; builds it on first call."""
    return availability(training_extension())


@dataclass(frozen=True)
class FusedEntries:
    """Every kept weight of a conv, all taps together: its output row, input plane row, shift and position.

    Sorted two ways: by output channel (forward, weight gradient) and by input plane row
    ``phase * C + channel`` (input gradient). Offsets depend on the plane size, so they are
    made per input shape by :meth:`offsets`.
    """

    forward_ptr: torch.Tensor
    forward_order: torch.Tensor
    backward_ptr: torch.Tensor
    backward_order: torch.Tensor
    out_index: torch.Tensor
    plane_row: torch.Tensor
    row_shift: torch.Tensor
    col_shift: torch.Tensor
    positions: torch.Tensor
    forward_positions: torch.Tensor
    backward_positions: torch.Tensor

    @classmethod
    def of(cls, taps: tuple, out_channels: int, in_channels: int, phases: int) -> FusedEntries:
        """The entries of a :class:`conv.ConvStructure`'s taps (stride phases: ``sh * sw``)."""
        parts = [_tap_entries(tap) for tap in taps]
        columns = [torch.cat(column) for column in zip(*parts)] if parts else [torch.zeros(0, dtype=torch.int64)] * 6
        out_index, in_index, phase, row_shift, col_shift, positions = columns
        plane_row = phase * in_channels + in_index
        in_rows = phases * in_channels
        forward_order = torch.sort(out_index, stable=True).indices
        backward_order = torch.sort(plane_row, stable=True).indices
        return cls(
            _row_ptr(out_index, out_channels), forward_order, _row_ptr(plane_row, in_rows), backward_order,
            out_index, plane_row, row_shift, col_shift, positions, positions[forward_order], positions[backward_order],
        )  # fmt: skip

    def offsets(self, plane: int, cols: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward offsets into the planes buffer, and input-gradient offsets into the front-padded gradient."""
        shift = self.row_shift * cols + self.col_shift
        forward = self.plane_row * plane + shift
        backward = pad + self.out_index * plane - shift
        return forward[self.forward_order].contiguous(), backward[self.backward_order].contiguous()


def _tap_entries(tap) -> tuple[torch.Tensor, ...]:  # noqa: ANN001 - a conv.TapStructure
    counts = tap.csr.crow[1:] - tap.csr.crow[:-1]
    out_index = torch.repeat_interleave(torch.arange(counts.numel()), counts.long())
    like = torch.ones_like(out_index)
    csr = tap.csr
    return out_index, csr.col.long(), like * tap.phase, like * tap.row_shift, like * tap.col_shift, csr.positions


def _row_ptr(index: torch.Tensor, rows: int) -> torch.Tensor:
    ptr = torch.zeros(rows + 1, dtype=torch.int32)
    ptr[1:] = torch.bincount(index, minlength=rows).cumsum(0)
    return ptr


@dataclass(frozen=True)
class NativeStructure:
    """A :class:`ConvStructure` with its fused entries, and their offsets per input plane size.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1)
        >>> structure = NativeStructure.of(torch.ones_like(conv.weight, dtype=torch.bool), ConvGeometry.of(conv))
        >>> structure.fused.positions.numel()
        576
    """

    conv: ConvStructure
    fused: FusedEntries
    _offsets: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, mask: torch.Tensor, geometry) -> NativeStructure:  # noqa: ANN001 - a ConvGeometry
        """The structure of a conv's boolean mask, shaped like its weight."""
        conv = ConvStructure.of(mask, geometry)
        phases = conv.geometry.stride[0] * conv.geometry.stride[1]
        return cls(conv, FusedEntries.of(conv.taps, conv.out_channels, conv.in_channels, phases))

    def offsets(self, planes: Planes) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Forward and input-gradient offsets for ``planes``' size, and the gradient's front padding."""
        _, _, _, rows, cols = planes.shape
        key = (planes.plane, cols)
        if key not in self._offsets:
            front = rows * cols  # more than any tap's shift
            self._offsets[key] = (*self.fused.offsets(planes.plane, cols, front), front)
        return self._offsets[key]


class NativeConvFunction(torch.autograd.Function):
    """``conv2d(x, weight * mask, bias)`` (zero padding, not pointwise) on the compiled fused kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, structure):  # noqa: ANN001, ANN205 - autograd's protocol
        conv, fused = structure.conv, structure.fused
        ctx.structure, ctx.has_bias, ctx.input_shape = structure, bias is not None, x.shape
        planes = Planes.of(x, conv.geometry, frozenset(t.phase for t in conv.taps))
        ctx.planes_shape = planes.shape
        ctx.save_for_backward(planes.buffer, weight)
        forward_offsets, _, _ = structure.offsets(planes)
        values = weight.reshape(-1)[fused.forward_positions]
        out = training_extension().gather_rows(planes.buffer, fused.forward_ptr, forward_offsets, values, planes.plane)
        return _output(out, planes, conv.geometry.output_size(x.shape[2], x.shape[3]), bias, conv.out_channels)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        buffer, weight = ctx.saved_tensors
        structure: NativeStructure = ctx.structure
        conv, fused, extension = structure.conv, structure.fused, training_extension()
        planes = Planes(buffer, ctx.planes_shape)
        forward_offsets, backward_offsets, front = structure.offsets(planes)
        padded = _grad_rows(grad_out.contiguous(), planes, conv.out_channels, front)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            values = weight.reshape(-1)[fused.backward_positions]
            rows = extension.gather_rows(padded, fused.backward_ptr, backward_offsets, values, planes.plane)
            grad_x = _unpad(Planes(rows.view(-1), planes.shape), conv.geometry, ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = weight.new_zeros(weight.numel())
            values = extension.sampled_rows(buffer, padded[front:], fused.forward_ptr, forward_offsets, planes.plane)
            grad_weight[fused.forward_positions] = values
            grad_weight = grad_weight.view(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


def native_sparse_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, structure: NativeStructure
) -> torch.Tensor:
    """:func:`conv.sparse_conv` on the compiled kernels (float32, not pointwise; else the torch-only kernels).

    Example:
        >>> conv = nn.Conv2d(8, 16, 3, padding=1)
        >>> structure = NativeStructure.of(torch.rand(conv.weight.shape) < 0.1, ConvGeometry.of(conv))
        >>> native_sparse_conv(torch.randn(2, 8, 9, 9), conv.weight, conv.bias, structure).shape
        torch.Size([2, 16, 9, 9])
    """
    conv = structure.conv
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or conv.geometry.is_pointwise:
        return sparse_conv(x, weight, bias, conv)
    return through_2d(x, conv.padding, lambda x2d: NativeConvFunction.apply(x2d, weight, bias, structure))

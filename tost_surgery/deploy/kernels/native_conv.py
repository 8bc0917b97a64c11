"""Optional compiled kernel: a sparse conv with the tap loop fused, blocked over output pixels.

The torch-only ``csr_conv`` makes one MKL call per kernel tap, each reading and writing the
whole output. This kernel makes one pass: for each output channel, a tile of 64 output
positions stays in vector registers while every nonzero weight of that channel (all taps, all
input channels) adds its shifted input row, then the tile is written once, cropped, with the
bias. It reads the same padded, phase-split input as ``csr_conv`` (so every stride, dilation,
padding mode and group count is handled), one image at a time.

It is compiled with ``torch.utils.cpp_extension.load_inline`` on first use (a C++ compiler and
ninja are needed; torch caches the build) and only when asked: ``accelerate(..., native=True)``.
Without a compiler the torch-only kernels run, with a warning saying why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..._errors import TostSurgeryError
from ._build import availability, build_extension
from .csr_conv import ConvGeometry, CsrConv
from .csr_linear import check_inference

TILE = 64
"""Output positions per register tile (4 AVX-512 or 8 AVX2 vectors of float32)."""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>

constexpr int64_t LANES = 16;
constexpr int64_t TILE = 4 * LANES;
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));  // GCC/Clang vectors: AVX-512 or 2x AVX2

static inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));  // an unaligned vector load
  return v;
}

// planes: (N, image) float32, each image the padded, phase-split input (P, C, R, Q) flattened.
// row_ptr (O + 1), offsets and values (nnz): the nonzeros of each output channel, as element
// offsets into one image and weights. The output grid of a channel is out_h rows of Q columns,
// of which the first out_w are kept.
torch::Tensor sparse_conv(torch::Tensor planes, torch::Tensor row_ptr, torch::Tensor offsets,
                          torch::Tensor values, torch::Tensor bias, int64_t cols, int64_t out_h,
                          int64_t out_w) {
  const int64_t batch = planes.size(0), image = planes.size(1), outs = row_ptr.size(0) - 1;
  auto out = torch::empty({batch, outs, out_h, out_w}, planes.options());
  const float* src = planes.data_ptr<float>();
  const int32_t* rows = row_ptr.data_ptr<int32_t>();
  const int32_t* offs = offsets.data_ptr<int32_t>();
  const float* vals = values.data_ptr<float>();
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* dst = out.data_ptr<float>();
  const int64_t length = out_h * cols;
  const int64_t padded = (length + TILE - 1) / TILE * TILE;
  at::parallel_for(0, batch * outs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> grid(padded);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / outs, o = task % outs;
      const float* img = src + n * image;
      for (int64_t t = 0; t < padded; t += TILE) {
        vec acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};  // 64 outputs in four vector registers
        for (int32_t k = rows[o]; k < rows[o + 1]; ++k) {
          const float* s = img + offs[k] + t;
          const vec w = vals[k] - (vec){0};  // broadcast
          acc0 += w * load(s);
          acc1 += w * load(s + LANES);
          acc2 += w * load(s + 2 * LANES);
          acc3 += w * load(s + 3 * LANES);
        }
        float* g = grid.data() + t;
        std::memcpy(g, &acc0, sizeof(vec));
        std::memcpy(g + LANES, &acc1, sizeof(vec));
        std::memcpy(g + 2 * LANES, &acc2, sizeof(vec));
        std::memcpy(g + 3 * LANES, &acc3, sizeof(vec));
      }
      const float bias_o = b ? b[o] : 0.0f;
      float* d = dst + task * out_h * out_w;
      for (int64_t h = 0; h < out_h; ++h)
        for (int64_t j = 0; j < out_w; ++j) d[h * out_w + j] = grid[h * cols + j] + bias_o;
    }
  });
  return out;
}
"""


def native_extension() -> object:
    """The compiled extension, or the exception that stopped the build (built once per process).

    Example:
        >>> isinstance(native_extension(), Exception)  # False where a C++ compiler is installed
        False
    """
    return build_extension("tost_surgery_deploy_native_v2", _SOURCE, ("sparse_conv",))


def native_available() -> tuple[bool, str]:
    """``(True, "")`` once the extension is built, else ``(False, why not)``; builds it on first call."""
    return availability(native_extension())


class NativeConv(nn.Module):
    """Inference-only float32 Conv1d/Conv2d on the compiled fused kernel (see the module docstring).

    Its nonzeros are buffers; under ``torch.export`` / ``torch.compile`` the layer is one custom
    op, ``torch.ops.tost_surgery_deploy.native_conv`` (which needs the built extension to run).

    Example:
        >>> NativeConv.from_conv(nn.Conv2d(64, 64, 3, padding=1))(torch.randn(1, 64, 56, 56)).shape
        torch.Size([1, 64, 56, 56])
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry) -> None:
        super().__init__()
        self.geometry = geometry
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * geometry.groups
        taps = CsrConv(weight, None, geometry).taps  # the same tap matrices, flattened into one CSR
        self.phases = tuple(sorted({tap.phase for tap in taps}))
        for name, tensor in zip(
            ("row_ptr", "plane_index", "row_shift", "col_shift", "values"), _entries(taps, self.out_channels)
        ):
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._offsets: dict[tuple[int, int], torch.Tensor] = {}  # per input plane size

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d) -> NativeConv:
        """The same map as ``conv`` (its current weight, bias and geometry)."""
        return cls(conv.weight.detach(), conv.bias, ConvGeometry.of(conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_inference(x, self)
        x2d = x.unsqueeze(2) if self.geometry.spatial_dims == 1 else x
        g = self.geometry
        args = (
            x2d, self.row_ptr, self.plane_index, self.row_shift, self.col_shift, self.values, self.bias,
            list(self.phases), list(g.kernel), list(g.stride), list(g.dilation), list(g.pads), g.padding_mode, g.groups,
        )  # fmt: skip
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            out = torch.ops.tost_surgery_deploy.native_conv(*args)
        else:
            out = native_conv2d(*args, offsets_cache=self._offsets)
        return out.squeeze(2) if self.geometry.spatial_dims == 1 else out

    def extra_repr(self) -> str:
        g, nnz = self.geometry, self.values.numel()
        return f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel}, stride={g.stride}, nnz={nnz}"


def native_conv2d(
    x: torch.Tensor, row_ptr: torch.Tensor, plane_index: torch.Tensor, row_shift: torch.Tensor,
    col_shift: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, phases: list[int],
    kernel: list[int], stride: list[int], dilation: list[int], pads: list[int], padding_mode: str, groups: int,
    offsets_cache: dict[tuple[int, int], torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """The conv of a 4-D float32 input on the compiled kernel."""
    if x.dtype != torch.float32 or values.dtype != torch.float32:
        raise TostSurgeryError(
            "The native deploy kernel computes in float32;\nexpected: a float32 input and layer\n"
            f"found: input {x.dtype}, weights {values.dtype}\nHint: accelerate the model in the dtype it will run in."
        )
    geometry = ConvGeometry(tuple(kernel), tuple(stride), tuple(dilation), tuple(pads), padding_mode, groups, 2)
    if padding_mode != "zeros":
        x = F.pad(x, geometry.pads, mode=padding_mode)
        geometry = ConvGeometry(geometry.kernel, geometry.stride, geometry.dilation, (0, 0, 0, 0), "zeros", groups, 2)
    out_h, out_w = geometry.output_size(x.shape[2], x.shape[3])
    planes = _image_planes(x, geometry, frozenset(phases), out_h)  # (N, P, C, R, Q)
    rows, cols = planes.shape[3], planes.shape[4]
    offsets = None if offsets_cache is None else offsets_cache.get((rows, cols))
    if offsets is None:
        offsets = ((plane_index * rows + row_shift) * cols + col_shift).to(torch.int32)
        if offsets_cache is not None:
            offsets_cache[(rows, cols)] = offsets
    bias = bias if bias is not None else values.new_empty(0)
    return native_extension().sparse_conv(
        planes.view(x.shape[0], -1), row_ptr, offsets, values, bias, cols, out_h, out_w
    )


@torch.library.custom_op("tost_surgery_deploy::native_conv", mutates_args=())
def _native_conv_op(
    x: torch.Tensor, row_ptr: torch.Tensor, plane_index: torch.Tensor, row_shift: torch.Tensor,
    col_shift: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, phases: list[int],
    kernel: list[int], stride: list[int], dilation: list[int], pads: list[int], padding_mode: str, groups: int,
) -> torch.Tensor:  # fmt: skip
    """``NativeConv`` as one op, so that ``torch.export`` and ``torch.compile`` keep it whole."""
    return native_conv2d(
        x, row_ptr, plane_index, row_shift, col_shift, values, bias, phases, kernel, stride, dilation, pads,
        padding_mode, groups,
    )  # fmt: skip


@_native_conv_op.register_fake
def _(
    x, row_ptr, plane_index, row_shift, col_shift, values, bias, phases, kernel, stride, dilation, pads, mode, groups
):
    geometry = ConvGeometry(tuple(kernel), tuple(stride), tuple(dilation), tuple(pads), mode, groups, 2)
    return x.new_empty(x.shape[0], row_ptr.numel() - 1, *geometry.output_size(x.shape[2], x.shape[3]))


def _entries(taps: list, out_channels: int) -> tuple[torch.Tensor, ...]:
    """Row pointers and, per nonzero (sorted by output channel): plane index, shifts, value."""
    outs, planes, row_shifts, col_shifts, values = [], [], [], [], []
    for tap in taps:
        coo = tap.matrix.to_sparse_coo().coalesce()
        out_index, in_index = coo.indices()
        channels = tap.matrix.shape[1]
        outs.append(out_index)
        planes.append(tap.phase * channels + in_index)
        row_shifts.append(torch.full_like(out_index, tap.row_shift))
        col_shifts.append(torch.full_like(out_index, tap.col_shift))
        values.append(coo.values())
    if not outs:
        empty = torch.zeros(0, dtype=torch.int64)
        return torch.zeros(out_channels + 1, dtype=torch.int32), empty, empty, empty, torch.zeros(0)
    out_index = torch.cat(outs)
    order = torch.sort(out_index, stable=True).indices
    counts = torch.bincount(out_index, minlength=out_channels)
    row_ptr = torch.zeros(out_channels + 1, dtype=torch.int32)
    row_ptr[1:] = counts.cumsum(0)
    values = torch.cat(values)[order].float().contiguous()
    return row_ptr, torch.cat(planes)[order], torch.cat(row_shifts)[order], torch.cat(col_shifts)[order], values


def _image_planes(x: torch.Tensor, geometry: ConvGeometry, phases: frozenset[int], out_h: int) -> torch.Tensor:
    """The zero-padded input as ``(N, sh * sw, C, rows, cols)``, with spare zero rows at the bottom.

    The kernel reads whole tiles of ``TILE`` positions from every shifted start, so the buffer
    holds enough zero rows past the last one for the last tile of the last shift.
    """
    batch, channels, height, width = x.shape
    (sh, sw), (left, right, top, bottom) = geometry.stride, geometry.pads
    rows, cols = -(-(height + top + bottom) // sh), -(-(width + left + right) // sw)
    spare = -(-TILE // cols) + 2
    if (sh, sw) == (1, 1):
        padded = F.pad(x, (left, right, top, bottom + spare))
        return padded.view(batch, 1, channels, rows + spare, cols)
    planes = x.new_zeros(batch, sh * sw, channels, rows + spare, cols)
    for a in range(sh):
        first_row = max(0, -(-(top - a) // sh))
        row_start = a + sh * first_row - top
        for b in range(sw):
            first_col = max(0, -(-(left - b) // sw))
            col_start = b + sw * first_col - left
            if a * sw + b not in phases or row_start >= height or col_start >= width:
                continue
            source = x[:, :, row_start::sh, col_start::sw]
            target = planes[:, a * sw + b, :, first_row : first_row + source.shape[2]]
            target[..., first_col : first_col + source.shape[3]].copy_(source)
    return planes

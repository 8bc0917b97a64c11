"""Optional compiled training conv: forward, input gradient and weight gradient with the tap loop fused.

The torch-only conv (``conv``) makes one MKL call per kernel tap, and each call streams the
activations again. These kernels lay the input out image-major on a zero-padded grid, as it
does (``(phases, C, N, rows, cols)``, one flat row per input channel and stride phase), but
apply every kept weight of a row, all taps together, in one pass over a block of columns:

- ``pack``: the input (or the output gradient) onto the grid in one pass, zeros where no input
  is; at stride 1 neighbouring images and rows share their pads (:func:`grid_size`).
- ``gather_rows`` (forward, and the input gradient): ``out[r, m] = sum_k w[k] * src[offset[k] + m]``,
  64 columns held in vector registers while the row's nonzeros add their shifted rows. The
  nonzeros come in blocks of 32 source rows: all rows' partial sums over ``GATHER_CHUNK``
  columns pass over one block while it stays in L1 (at 512 channels the whole source is L2's
  size, and a row's nonzeros read it all). The sums are written straight into the ``(N, C, H, W)``
  output or input gradient, the bias added on the way. The input gradient is the same map with
  the output gradient as source and ``W^T``'s rows, shifts negated: every grid position gathers
  what its taps scattered, written once.
- ``sampled_rows`` (weight gradient): ``out[k] = sum_m grad[row_k, m] * src[offset[k] + m]``, four
  nonzeros of a row at a time sharing each load of its output-gradient row.

Compiled with torch's C++ extension tooling on first use (``prepare(..., native_kernels=True)``);
without a compiler the torch-only kernels run, with a warning saying why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..deploy.kernels._build import availability, build_extension
from ..deploy.kernels.csr_conv import _first
from .conv import ConvStructure, sparse_conv, through_2d

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

constexpr int64_t LANES = 16;
constexpr int64_t TILE = 4 * LANES;
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));  // GCC/Clang vectors

static inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));  // an unaligned vector load
  return v;
}

static inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

typedef float half __attribute__((vector_size(LANES / 2 * sizeof(float))));
typedef float quarter __attribute__((vector_size(LANES / 4 * sizeof(float))));

static inline float total(vec v) {  // pairwise, halving the vector
  const half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[1]) + (q[2] + q[3]);
}

// A padded grid (batch, rows, cols) per plane row, and a strided tensor it meets: grid position
// (n, i, j) of plane row r, i0 <= i < i0 + h and j0 <= j < j0 + w, is the tensor's element
// base + n * nstride + (i - i0) * hs + (j - j0) * ws, where (base, i0, j0, h, w) is row r's box.
// Each plane row is `length` columns, a multiple of TILE: the grid, then zeros.
struct Layout {
  int64_t batch, rows, cols, nstride, hs, ws, length;
  explicit Layout(const torch::Tensor& t) {
    const int64_t* p = t.data_ptr<int64_t>();
    batch = p[0], rows = p[1], cols = p[2], nstride = p[3], hs = p[4], ws = p[5], length = p[6];
  }
  int64_t grid() const { return batch * rows * cols; }
};

// f(m, count, at) for each run of grid columns [m, m + count) inside [start, stop) and inside the
// box; the run's elements are at, at + ws, ... in the tensor.
template <typename F>
static inline void runs(const Layout& g, const int64_t* box, int64_t start, int64_t stop, F f) {
  const int64_t base = box[0], i0 = box[1], j0 = box[2], h = box[3], w = box[4];
  if (h <= 0 || w <= 0) return;
  const int64_t image = g.rows * g.cols;
  stop = std::min(stop, g.grid());
  int64_t n = start / image, i = (start % image) / g.cols;
  for (int64_t m = start - start % g.cols; m < stop; m += g.cols) {  // m: the grid row's first column
    if (i >= i0 && i < i0 + h) {
      const int64_t lo = std::max(m + j0, start), hi = std::min(m + j0 + w, stop);
      if (lo < hi) f(lo, hi - lo, base + n * g.nstride + (i - i0) * g.hs + (lo - m - j0) * g.ws);
    }
    if (++i == g.rows) i = 0, ++n;
  }
}

// The grid of every box row, zeros where no box reaches, after `front` and before `tail` zeros.
torch::Tensor pack(torch::Tensor src, torch::Tensor box, torch::Tensor layout, int64_t front, int64_t tail) {
  const Layout g(layout);
  const int64_t rows = box.size(0), plane = g.length;
  auto out = torch::empty({front + rows * plane + tail}, src.options());
  const float* s = src.data_ptr<float>();
  const int64_t* b = box.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  std::fill(o, o + front, 0.0f);
  std::fill(o + front + rows * plane, o + front + rows * plane + tail, 0.0f);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* d = o + front + r * plane;
      int64_t done = 0;
      runs(g, b + 5 * r, 0, plane, [&](int64_t m, int64_t count, int64_t at) {
        std::fill(d + done, d + m, 0.0f);
        const float* p = s + at;
        if (g.ws == 1) std::memcpy(d + m, p, count * sizeof(float));
        else for (int64_t q = 0; q < count; ++q) d[m + q] = p[q * g.ws];
        done = m + count;
      });
      std::fill(d + done, d + plane, 0.0f);
    }
  });
  return out;
}

// Row r of sum over k of values[k] * src[offsets[k] + m], m the grid columns, written where row r's
// box meets dst (plus bias[r] when bias has one value per row). The entries come in blocks of the
// source rows they read: those of block b and row r are k in [ptr[b * rows + r], ptr[b * rows + r + 1]).
// Per `chunk` columns (a multiple of TILE), every row's partial sums pass over one block of source
// rows while it stays in L1, then over the next. Every src[offsets[k] + m], m < length, must be in src.
void gather_rows(torch::Tensor src, torch::Tensor block_ptr, torch::Tensor offsets, torch::Tensor values,
                 torch::Tensor dst, torch::Tensor box, torch::Tensor layout, torch::Tensor bias, int64_t chunk) {
  const Layout g(layout);
  const int64_t rows = box.size(0), blocks = (block_ptr.size(0) - 1) / std::max<int64_t>(rows, 1);
  const int64_t length = g.length;
  const float* s = src.data_ptr<float>();
  const int32_t* ptr = block_ptr.data_ptr<int32_t>();
  const int64_t* offs = offsets.data_ptr<int64_t>();
  const float* vals = values.data_ptr<float>();
  const int64_t* b = box.data_ptr<int64_t>();
  const float* add = bias.numel() == rows ? bias.data_ptr<float>() : nullptr;
  float* d = dst.data_ptr<float>();
  const int64_t chunks = (length + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> partial(rows * chunk);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * chunk, stop = std::min(start + chunk, length);
      for (int64_t block = 0; block < std::max<int64_t>(blocks, 1); ++block) {
        const int32_t* bp = ptr + block * rows;
        for (int64_t r = 0; r < rows; ++r) {
          if (block > 0 && bp[r] == bp[r + 1]) continue;  // nothing to add
          float* q = partial.data() + r * chunk - start;
          for (int64_t m = start; m < stop; m += TILE) {
            vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            if (block > 0) {  // add to the sums of the blocks before
              a0 = load(q + m), a1 = load(q + m + LANES), a2 = load(q + m + 2 * LANES), a3 = load(q + m + 3 * LANES);
            }
            for (int32_t k = bp[r]; k < bp[r + 1]; ++k) {
              const float* p = s + offs[k] + m;
              const vec w = vals[k] - (vec){0};  // broadcast
              a0 += w * load(p);
              a1 += w * load(p + LANES);
              a2 += w * load(p + 2 * LANES);
              a3 += w * load(p + 3 * LANES);
            }
            store(q + m, a0), store(q + m + LANES, a1), store(q + m + 2 * LANES, a2), store(q + m + 3 * LANES, a3);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float extra = add ? add[r] : 0.0f;
        const float* q = partial.data() + r * chunk - start;
        runs(g, b + 5 * r, start, stop, [&](int64_t m, int64_t count, int64_t at) {
          float* o = d + at;
          for (int64_t t = 0; t < count; ++t) o[t * g.ws] = q[m + t] + extra;
        });
      }
    }
  });
}

// out (nnz): out[k] = sum over m < length of grad[r * length + m] * src[offsets[k] + m], r the
// row that k belongs to (by block_ptr, as in gather_rows, `rows` rows), length a multiple of TILE;
// `chunk` columns at a time.
torch::Tensor sampled_rows(torch::Tensor src, torch::Tensor grad, torch::Tensor block_ptr, int64_t rows,
                           torch::Tensor offsets, int64_t length, int64_t chunk) {
  const int64_t blocks = (block_ptr.size(0) - 1) / std::max<int64_t>(rows, 1);
  auto out = torch::zeros({offsets.size(0)}, src.options());
  const float* s = src.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const int32_t* ptr = block_ptr.data_ptr<int32_t>();
  const int64_t* offs = offsets.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t start = 0; start < length; start += chunk) {
      const int64_t stop = std::min(start + chunk, length);
      for (int64_t i = 0; i < blocks * (end - begin); ++i) {
        const int64_t block = i / (end - begin), r = begin + i % (end - begin);
        const float* gr = g + r * length;
        const int32_t first = ptr[block * rows + r], last = ptr[block * rows + r + 1];
        for (int32_t k = first; k < last; k += 4) {  // four weights share each gradient load
          const int32_t count = std::min<int32_t>(4, last - k);
          const float* p0 = s + offs[k];
          const float* p1 = s + offs[k + std::min(1, count - 1)];
          const float* p2 = s + offs[k + std::min(2, count - 1)];
          const float* p3 = s + offs[k + std::min(3, count - 1)];
          vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
          for (int64_t m = start; m < stop; m += 2 * LANES) {
            const vec g0 = load(gr + m), g1 = load(gr + m + LANES);
            a0 += g0 * load(p0 + m), b0 += g1 * load(p0 + m + LANES);
            a1 += g0 * load(p1 + m), b1 += g1 * load(p1 + m + LANES);
            a2 += g0 * load(p2 + m), b2 += g1 * load(p2 + m + LANES);
            a3 += g0 * load(p3 + m), b3 += g1 * load(p3 + m + LANES);
          }
          const float sums[4] = {total(a0 + b0), total(a1 + b1), total(a2 + b2), total(a3 + b3)};
          for (int32_t j = 0; j < count; ++j) dst[k + j] += sums[j];
        }
      }
    }
  });
  return out;
}
"""


_NAME = "tost_surgery_train_native_" + hashlib.sha1(_SOURCE.encode()).hexdigest()[:10]
"""Named by its source: torch's build cache is per user, and a process still holding another
version's library never sees it rebuilt in place."""


def training_extension() -> object:
    """The compiled training kernels, or the exception that stopped the build (built once per process).

    Example:
        >>> isinstance(training_extension(), Exception)  # False where a C++ compiler is installed
        False
    """
    return build_extension(_NAME, _SOURCE, ("pack", "gather_rows", "sampled_rows"))


def training_native_available() -> tuple[bool, str]:
    """``(True, "")`` once the training extension is built, else ``(False, why not)``; builds it on first call."""
    return availability(training_extension())


@dataclass(frozen=True)
class FusedEntries:
    """Every kept weight of a conv, all taps together: its output row, input plane row, shift and position.

    Plane rows are ``phase * C + channel`` (stride phases ``sh * sw``). Where each entry reads
    depends on the grid, so a :class:`Grid` puts them in order per input shape (:class:`Pass`).
    """

    out_index: torch.Tensor
    plane_row: torch.Tensor
    row_shift: torch.Tensor
    col_shift: torch.Tensor
    positions: torch.Tensor
    out_channels: int
    in_rows: int

    @classmethod
    def of(cls, taps: tuple, out_channels: int, in_channels: int, phases: int) -> FusedEntries:
        """The entries of a :class:`conv.ConvStructure`'s taps."""
        parts = [_tap_entries(tap) for tap in taps]
        columns = [torch.cat(column) for column in zip(*parts)] if parts else [torch.zeros(0, dtype=torch.int64)] * 6
        out_index, in_index, phase, row_shift, col_shift, positions = columns
        plane_row = phase * in_channels + in_index
        return cls(out_index, plane_row, row_shift, col_shift, positions, out_channels, phases * in_channels)

    def passes(self, plane: int, cols: int, pad: int, block: int) -> tuple[Pass, Pass]:
        """The forward (and weight-gradient) pass over the input grid, and the input-gradient pass over
        the front-padded output gradient, in blocks of ``block`` source rows."""
        shift = self.row_shift * cols + self.col_shift
        forward = _pass(self.out_index, self.out_channels, self.plane_row, self.in_rows, block,
                        self.plane_row * plane + shift, self.positions)  # fmt: skip
        backward = _pass(self.plane_row, self.in_rows, self.out_index, self.out_channels, block,
                         pad + self.out_index * plane - shift, self.positions)  # fmt: skip
        return forward, backward


@dataclass(frozen=True)
class Pass:
    """One kernel's entries in order: by block of source rows, then by the row they add to.

    ``ptr`` (``blocks * rows + 1``) bounds the entries of each (block, row); ``offsets`` say where
    each reads in its source buffer, ``positions`` which weight it is.
    """

    ptr: torch.Tensor
    rows: int
    offsets: torch.Tensor
    positions: torch.Tensor


def _pass(row, rows: int, source, sources: int, block: int, offsets, positions) -> Pass:  # noqa: ANN001
    blocks = max(1, -(-sources // block))
    key = (source // block) * rows + row
    order = torch.sort(key, stable=True).indices
    return Pass(_row_ptr(key, blocks * rows), rows, offsets[order].contiguous(), positions[order].contiguous())


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


TILE = 64
"""Columns one pass of the kernels holds in vector registers (``TILE`` in the C++ source)."""
GATHER_CHUNK = 128
"""Columns per block of the forward and the input gradient: every row's partial sums over these
columns pass over one block of source rows, then the next."""
SAMPLED_CHUNK = 256
"""Columns per block of the weight gradient (each kept weight sums a block's products at once)."""
L1_BYTES = 32 * 1024
"""What one block of source rows may take: ``GATHER_CHUNK`` columns of each and a tap's reach beyond."""
BLOCK_ROWS = (8, 32)
"""Fewest and most source rows per block (at 64-512 channels, batch 32, one thread: 32 rows
against all of them at once, forward 1.1-1.7x faster; 16 and 8 rows slower than 32)."""


def block_rows(reach: int) -> int:
    """Source rows per block: ``GATHER_CHUNK + reach`` columns of each fit ``L1_BYTES`` together."""
    fewest, most = BLOCK_ROWS
    return max(fewest, min(most, L1_BYTES // (4 * (GATHER_CHUNK + reach))))


@dataclass(frozen=True)
class Grid:
    """The padded grid the fused kernels compute on for one input shape, and where tensors meet it.

    The input sits on ``(phases, C, N, rows, cols)`` (stride phases ``sh * sw``), the output and
    its gradient on ``(O, N, rows, cols)``, each a flat buffer. A box row says where a tensor's
    plane meets the grid (the C++ ``Layout``): ``(base, first row, first column, rows, columns)``,
    with ``(N, rows, cols, image stride, row stride, column stride)`` shared. ``pad`` zeros
    follow the input and precede the output gradient, past any tap's shift.
    """

    shape: tuple[int, int, int, int, int]
    output_size: tuple[int, int]
    plane: int
    """Columns of one plane row: ``N * rows * cols`` rounded up to a multiple of ``TILE`` (zeros past the grid)."""
    input_box: torch.Tensor
    input_layout: torch.Tensor
    output_box: torch.Tensor
    output_layout: torch.Tensor
    pad: int
    forward: Pass
    backward: Pass

    @classmethod
    def of(cls, structure: ConvStructure, fused: FusedEntries, shape: torch.Size) -> Grid:
        """The grid of ``structure``'s convolution on an input shaped ``(N, C, H, W)``."""
        geometry, (batch, channels, height, width) = structure.geometry, shape
        rows, cols = grid_size(geometry, height, width)
        (sh, sw), out_channels = geometry.stride, structure.out_channels
        out_h, out_w = geometry.output_size(height, width)
        shift = fused.row_shift * cols + fused.col_shift
        reach = int(shift.max()) if shift.numel() else 0
        pad = (reach // 16 + 1) * 16  # whole vectors: the gradient's rows stay aligned after it
        plane = -(-(batch * rows * cols) // TILE) * TILE
        forward, backward = fused.passes(plane, cols, pad, block_rows(pad))
        common = (batch, rows, cols)
        input_layout = _layout(*common, channels * height * width, sh * width, sw, plane)
        output_layout = _layout(*common, out_channels * out_h * out_w, out_w, 1, plane)
        return cls(
            (sh * sw, channels, batch, rows, cols), (out_h, out_w), plane,
            _input_box(geometry, channels, height, width), input_layout,
            _output_box(out_channels, out_h, out_w), output_layout, pad, forward, backward,
        )  # fmt: skip


def grid_size(geometry, height: int, width: int) -> tuple[int, int]:  # noqa: ANN001 - a ConvGeometry
    """Rows and columns of one image's grid.

    At stride 1 neighbouring images (and rows) share their pads, ``H + max(top, bottom)`` rows:
    a tap reading past an image's last row reads the next image's top pad, and so on. Where a
    pad is longer than the kernel's reach this does not hold and each image is padded whole, as
    at any other stride (``ceil((H + top + bottom) / sh)`` rows per phase).
    """
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.stride, geometry.dilation
    left, right, top, bottom = geometry.pads
    if (sh, sw) == (1, 1) and min(top, bottom) <= (kh - 1) * dh and min(left, right) <= (kw - 1) * dw:
        return height + max(top, bottom), width + max(left, right)
    return -(-(height + top + bottom) // sh), -(-(width + left + right) // sw)


def _input_box(geometry, channels: int, height: int, width: int) -> torch.Tensor:  # noqa: ANN001
    """Per plane row ``phase * C + c``: where channel ``c``'s input positions of that stride phase sit."""
    (sh, sw), (left, _, top, _) = geometry.stride, geometry.pads
    boxes = []
    for a in range(sh):
        first_row, row_start = _first(a, top, sh)
        for b in range(sw):
            first_col, col_start = _first(b, left, sw)
            count_h, count_w = max(0, -(-(height - row_start) // sh)), max(0, -(-(width - col_start) // sw))
            start = row_start * width + col_start if count_h and count_w else 0
            boxes += [(c * height * width + start, first_row, first_col, count_h, count_w) for c in range(channels)]
    return torch.tensor(boxes, dtype=torch.int64).view(-1, 5)


def _output_box(out_channels: int, out_h: int, out_w: int) -> torch.Tensor:
    """Per output channel: its ``(N, O, out_h, out_w)`` plane, from the grid's first row and column."""
    box = torch.tensor([0, 0, 0, out_h, out_w], dtype=torch.int64).repeat(out_channels, 1)
    box[:, 0] = torch.arange(out_channels) * (out_h * out_w)
    return box


def _layout(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


@dataclass(frozen=True)
class NativeStructure:
    """A :class:`ConvStructure` with its fused entries, and a :class:`Grid` per input shape.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1)
        >>> structure = NativeStructure.of(torch.ones_like(conv.weight, dtype=torch.bool), ConvGeometry.of(conv))
        >>> structure.fused.positions.numel()
        576
    """

    conv: ConvStructure
    fused: FusedEntries
    _grids: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, mask: torch.Tensor, geometry) -> NativeStructure:  # noqa: ANN001 - a ConvGeometry
        """The structure of a conv's boolean mask, shaped like its weight."""
        conv = ConvStructure.of(mask, geometry)
        phases = conv.geometry.stride[0] * conv.geometry.stride[1]
        return cls(conv, FusedEntries.of(conv.taps, conv.out_channels, conv.in_channels, phases))

    def grid(self, shape: torch.Size) -> Grid:
        """The grid for an input of ``shape`` (made once per shape)."""
        key = tuple(shape)
        if key not in self._grids:
            self._grids[key] = Grid.of(self.conv, self.fused, shape)
        return self._grids[key]


_NO_BIAS = torch.zeros(0)


class NativeConvFunction(torch.autograd.Function):
    """``conv2d(x, weight * mask, bias)`` (zero padding, not pointwise) on the compiled fused kernels.

    The kernels read ``x`` and the output gradient once, onto the grid, and write the output and
    the input gradient straight into their ``(N, C, H, W)`` tensors (the bias added on the way).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, structure):  # noqa: ANN001, ANN205 - autograd's protocol
        extension, grid = training_extension(), structure.grid(x.shape)
        buffer = extension.pack(x.contiguous(), grid.input_box, grid.input_layout, 0, grid.pad)
        ctx.grid, ctx.has_bias, ctx.input_shape = grid, bias is not None, x.shape
        ctx.save_for_backward(buffer, weight)
        out = x.new_empty(x.shape[0], structure.conv.out_channels, *grid.output_size)
        entries = grid.forward
        extension.gather_rows(
            buffer, entries.ptr, entries.offsets, weight.reshape(-1)[entries.positions], out, grid.output_box,
            grid.output_layout, _NO_BIAS if bias is None else bias.contiguous(), GATHER_CHUNK,
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        buffer, weight = ctx.saved_tensors
        grid: Grid = ctx.grid
        extension = training_extension()
        grad = extension.pack(grad_out.contiguous(), grid.output_box, grid.output_layout, grid.pad, 0)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.new_empty(ctx.input_shape)
            entries = grid.backward
            extension.gather_rows(
                grad, entries.ptr, entries.offsets, weight.reshape(-1)[entries.positions], grad_x, grid.input_box,
                grid.input_layout, _NO_BIAS, GATHER_CHUNK,
            )  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_weight = weight.new_zeros(weight.numel())
            entries = grid.forward
            grad_weight[entries.positions] = extension.sampled_rows(
                buffer, grad[grid.pad :], entries.ptr, entries.rows, entries.offsets, grid.plane, SAMPLED_CHUNK
            )
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

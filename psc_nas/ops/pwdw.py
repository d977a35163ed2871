"""ip-CSN's pair in one pass: a 1x1x1 conv, then a depthwise 3x3x3 conv of its output, on channels_last_3d CPU tensors.

    x (C_in) ─ conv 1x1x1 ─ z (C) ─ depthwise 3x3x3, stride 1, 'same' ─► y (C)

Run one after the other (oneDNN's 1x1 conv, then its depthwise conv), the two convs each pass a whole activation
through memory, x → z → y. The C++ kernel below never writes z: it computes z a band of rows at a time into three
plane buffers (a ring: planes d - 1, d, d + 1, zero borders, 16-channel blocks) that stay in L2, and the depthwise
conv reads them there. Per task (a sample and a band of rows, walking the D planes in order), each output plane
takes its rows GROUP at a time: first the 1x1x1 conv of the next plane's rows they will need (P positions x up to
four blocks of 16 channels in registers, one broadcast of x per input channel and position, x prefetched two
groups of positions ahead), then their depthwise conv (per kernel row, M + 2 loads of z feed 3M multiply-adds).
Any C_in and C (buffers padded to whole blocks of 16 channels), float32, stride 1. Written with GCC's vector
extensions (16 floats a vector: one AVX-512 register, two AVX2 ones), so it builds wherever ``native`` builds.

Forward only. A training step keeps the unfused pair: a fused forward that also wrote z for the backward, with the
unfused backward, ran 0.91-1.13x the unfused step (docs/benchmarks/ops.md), since the backward is most of it; so
``fast.py`` runs ``pointwise_depthwise`` (a ``torch.library`` custom op with a FLOP formula) only where no backward
follows: inference, validation and the search's latency objective, outside tracing and export.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from psc_nas import native
from psc_nas.ops.graph import INPUT, ConvGraph

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float vec __attribute__((vector_size(64)));                 // 16 floats
typedef float uvec __attribute__((vector_size(64), aligned(4)));    // the same at any float address
constexpr int64_t L = 16;

inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }

// Zeroed floats at a 64-byte boundary: every vector of a 16-channel block then sits within one cache line (a
// std::vector's floats start 16 bytes past one, and each load of a block then touched two lines).
struct Floats {
  float* data;
  explicit Floats(int64_t count) {
    const std::size_t bytes = (static_cast<std::size_t>(count) * sizeof(float) + 63) / 64 * 64;
    data = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(data != nullptr, "pwdw: out of memory for ", bytes, " bytes of buffers");
    std::memset(data, 0, bytes);
  }
  ~Floats() { std::free(data); }
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;
};

inline vec splat(float v) { return vec{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}; }

// The first ``width`` (1 to 16) floats of v to p.
inline void store_part(float* p, vec v, int64_t width) {
  if (width == L) return store(p, v);
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << width) - 1u), reinterpret_cast<__m512>(v));
#else
  float tmp[L];
  store(tmp, v);
  std::memcpy(p, tmp, width * sizeof(float));
#endif
}

// Output rows whose 1x1x1 conv of the next plane runs ahead of them at a time (see forward), and groups of P
// positions of x the 1x1x1 conv prefetches ahead (1.1-1.2x at 64³, where x streams from beyond L2; no change at 32³).
constexpr int64_t GROUP = 4, PREFETCH = 2;

// C channels in J blocks of 16. A buffer plane holds z for the band's rows and one halo row on either side, zero
// outside the volume, per block of 16 channels: (J, band + 2, W + 2, 16), columns 0 and W + 1 zero. In blocks, a
// column's 16 channels sit 64 bytes after the previous column's, so the loops below address a row's columns at
// constant offsets from one pointer (with channels_last rows, C floats apart, the compiler kept every address of a
// 3 x 10 window in a register it had to spill: 0.6-0.8x the unfused convs).
struct Shape {
  int64_t N, Cin, C, J, D, H, W, band;
  int64_t row() const { return (W + 2) * L; }
  int64_t block() const { return (band + 2) * row(); }
  int64_t plane() const { return J * block(); }
};

// The 1x1x1 conv of ``count`` consecutive positions of x (C_in floats each, the band's rows of one plane) into the
// buffer rows from ``out`` on, blocks [j0, j0 + G): P positions x G blocks of accumulators, each input channel's G
// weight vectors loaded once for the P positions. wp: (J, C_in, 16).
template <int G, int P>
void pointwise_positions(const float* x, const float* wp, float* out, int64_t count, const Shape& s, int64_t j0) {
  const int64_t Cin = s.Cin, W = s.W;
  const float* wj[G];
#pragma GCC unroll 4
  for (int j = 0; j < G; ++j) wj[j] = wp + (j0 + j) * Cin * L;
  int64_t row = 0, col = 0;  // of position q
  auto step = [&]() __attribute__((always_inline)) {
    if (++col == W) col = 0, ++row;
  };
  auto destination = [&]() __attribute__((always_inline)) {
    return out + j0 * s.block() + row * s.row() + (col + 1) * L;
  };
  int64_t q = 0;
  for (; q + P <= count; q += P) {
    vec acc[P][G];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) acc[p][j] = vec{};
    const float* xp[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) xp[p] = x + (q + p) * Cin;
    if (q + (PREFETCH + 1) * P <= count) {
      const char* ahead = reinterpret_cast<const char*>(x + (q + PREFETCH * P) * Cin);
      for (int64_t byte = 0; byte < P * Cin * 4; byte += 64) __builtin_prefetch(ahead + byte, 0, 3);
    }
    for (int64_t ci = 0; ci < Cin; ++ci) {
      vec w[G];
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) w[j] = load(wj[j] + ci * L);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const vec b = splat(xp[p][ci]);
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) acc[p][j] += b * w[j];
      }
    }
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      float* o = destination();
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) store(o + j * s.block(), acc[p][j]);
      step();
    }
  }
  for (; q < count; ++q) {  // the last positions, one at a time: four chains of input channels hide the latency
    vec acc[4][G];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) acc[k][j] = vec{};
    const float* xq = x + q * Cin;
    int64_t ci = 0;
    for (; ci + 4 <= Cin; ci += 4)
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const vec b = splat(xq[ci + k]);
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) acc[k][j] += b * load(wj[j] + (ci + k) * L);
      }
    for (; ci < Cin; ++ci) {
      const vec b = splat(xq[ci]);
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) acc[0][j] += b * load(wj[j] + ci * L);
    }
    float* o = destination();
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j) store(o + j * s.block(), (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]));
    step();
  }
}

void pointwise(const float* x, const float* wp, float* out, int64_t count, const Shape& s) {
  for (int64_t j0 = 0; j0 < s.J; j0 += 4) {
    switch (std::min<int64_t>(4, s.J - j0)) {
      case 1: pointwise_positions<1, 8>(x, wp, out, count, s, j0); break;
      case 2: pointwise_positions<2, 8>(x, wp, out, count, s, j0); break;
      case 3: pointwise_positions<3, 8>(x, wp, out, count, s, j0); break;
      default: pointwise_positions<4, 4>(x, wp, out, count, s, j0); break;
    }
  }
}

// M output columns from ``ow`` of one output row and block: planes[a] is buffer plane d - 1 + a, the row's three
// input rows that plane's buffer rows ``row`` to ``row`` + 2. Per kernel row, M + 2 loads of z and 3 of the weights
// (wd: (J, 27, 16)) feed 3M multiply-adds.
template <int M>
inline void depthwise_columns(const float* const* planes, int64_t row, const float* wd, float* y, int64_t ow, int64_t j,
                              const Shape& s) {
  vec acc[M];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) acc[i] = vec{};
  const int64_t offset = j * s.block() + row * s.row() + ow * L;  // buffer column ow: input column ow - 1
#pragma GCC unroll 3
  for (int a = 0; a < 3; ++a)
#pragma GCC unroll 3
    for (int b = 0; b < 3; ++b) {
      const float* zr = planes[a] + offset + b * s.row();
      const float* wr = wd + (j * 27 + a * 9 + b * 3) * L;
      const vec w0 = load(wr), w1 = load(wr + L), w2 = load(wr + 2 * L);
      vec zc[M + 2];
#pragma GCC unroll 10
      for (int i = 0; i < M + 2; ++i) zc[i] = load(zr + i * L);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        acc[i] += zc[i] * w0;
        acc[i] += zc[i + 1] * w1;
        acc[i] += zc[i + 2] * w2;
      }
    }
  const int64_t c0 = j * L, width = std::min<int64_t>(L, s.C - c0);
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) store_part(y + (ow + i) * s.C + c0, acc[i], width);
}

// Output rows [hA, hB) of plane d (buffer rows from hA - h0 on), y at that plane's first row.
inline void depthwise_rows(const float* const* planes, int64_t hA, int64_t hB, int64_t h0, const float* wd, float* y,
                           const Shape& s) {
  for (int64_t j = 0; j < s.J; ++j)
    for (int64_t h = hA; h < hB; ++h) {
      float* yrow = y + h * s.W * s.C;
      int64_t ow = 0;
      for (; ow + 8 <= s.W; ow += 8) depthwise_columns<8>(planes, h - h0, wd, yrow, ow, j, s);
      for (; ow < s.W; ++ow) depthwise_columns<1>(planes, h - h0, wd, yrow, ow, j, s);
    }
}

// Rows of output a task computes: at most what keeps its three buffer planes within 1 MiB (L2), and few enough
// that the samples times bands give every thread a task; as even as the band count allows.
int64_t band_rows(int64_t N, int64_t J, int64_t H, int64_t W, int64_t threads) {
  const int64_t row_bytes = J * (W + 2) * L * static_cast<int64_t>(sizeof(float));
  const int64_t fits = std::max<int64_t>(1, (1 << 20) / (3 * row_bytes) - 2);
  const int64_t bands_wanted = (threads + N - 1) / N;
  const int64_t band = std::min({H, fits, (H + bands_wanted - 1) / bands_wanted});
  const int64_t bands = (H + band - 1) / band;
  return (H + bands - 1) / bands;
}

void forward(const float* x, const float* wp, const float* wd, float* y, const Shape& s) {
  const int64_t bands = (s.H + s.band - 1) / s.band, plane = s.plane();
  const Floats zeros(plane);  // the planes before the first and after the last
  at::parallel_for(0, s.N * bands, 1, [&](int64_t begin, int64_t end) {
    Floats ring(3 * plane);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, h0 = task % bands * s.band, h1 = std::min(s.H, h0 + s.band);
      const int64_t lo = std::max<int64_t>(0, h0 - 1), hi = std::min(s.H, h1 + 1);  // rows of z this band reads
      std::fill(ring.data, ring.data + 3 * plane, 0.0f);  // borders, and halo rows outside the volume, stay zero
      // Image rows [r0, r1) of plane dd into its buffer (buffer row r holds image row h0 - 1 + r).
      auto compute = [&](int64_t dd, float* buffer, int64_t r0, int64_t r1) {
        if (r0 >= r1) return;
        const float* xs = x + ((n * s.D + dd) * s.H + r0) * s.W * s.Cin;
        pointwise(xs, wp, buffer + (r0 - h0 + 1) * s.row(), (r1 - r0) * s.W, s);
      };
      float* slot[3] = {ring.data, ring.data + plane, ring.data + 2 * plane};
      compute(0, slot[1], lo, hi);
      // Output plane d reads planes d - 1 and d, computed before, and d + 1, computed here GROUP rows at a time
      // ahead of the output rows that first need them: the reading of x spreads over the whole step.
      for (int64_t d = 0; d < s.D; ++d) {
        const bool next = d + 1 < s.D;
        const float* planes[3] = {d > 0 ? slot[0] : zeros.data, slot[1], next ? slot[2] : zeros.data};
        int64_t done = lo;  // rows of plane d + 1 in the buffer so far
        for (int64_t hA = h0; hA < h1; hA += GROUP) {
          const int64_t hB = std::min(h1, hA + GROUP);
          if (next) {
            compute(d + 1, slot[2], done, std::min(hi, hB + 1));
            done = std::min(hi, hB + 1);
          }
          depthwise_rows(planes, hA, hB, h0, wd, y + (n * s.D + d) * s.H * s.W * s.C, s);
        }
        std::rotate(slot, slot + 1, slot + 3);  // planes d, d + 1 move down; the oldest buffer takes d + 2
      }
    }
  });
}

}  // namespace

// x: (N, C_in, D, H, W) channels_last_3d float32; wp: (J, C_in, 16) and wd: (J, 27, 16) contiguous, J blocks of
// 16 channels (zeros past C). Returns y, (N, C, D, H, W) channels_last_3d.
at::Tensor pwdw_forward(at::Tensor x, at::Tensor wp, at::Tensor wd, int64_t channels) {
  TORCH_CHECK(x.dim() == 5 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast3d),
              "x: a 5-D float32 channels_last_3d tensor");
  const int64_t N = x.size(0), Cin = x.size(1), J = (channels + L - 1) / L, D = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK(wp.is_contiguous() && wp.dim() == 3 && wp.size(0) == J && wp.size(1) == Cin && wp.size(2) == L,
              "wp: (J, C_in, 16)");
  TORCH_CHECK(wd.is_contiguous() && wd.dim() == 3 && wd.size(0) == J && wd.size(1) == 27 && wd.size(2) == L,
              "wd: (J, 27, 16)");
  at::Tensor y = at::empty({N, channels, D, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  if (y.numel() == 0) return y;
  const Shape s{N, Cin, channels, J, D, H, W, band_rows(N, J, H, W, at::get_num_threads())};
  forward(x.data_ptr<float>(), wp.data_ptr<float>(), wd.data_ptr<float>(), y.data_ptr<float>(), s);
  return y;
}
"""
FUNCTIONS = ["pwdw_forward"]
KERNEL = native.Extension("pwdw", 3, SOURCE, FUNCTIONS, "the fused 1x1x1 + depthwise C++ kernel")


# The most channels the fused pair runs: up to four blocks of 16 the 1x1x1 conv reads x once; wider, once per four
# blocks, and at 128-512 channels (ResNet3D's stages, 2³-16³, batch 8) it ran 0.80-1.07x the unfused pair, at 64
# 0.94-1.23x (docs/benchmarks/ops.md, twelfth session).
WIDEST = 64


def fuses(graph: ConvGraph) -> bool:
    """Whether the kernel runs ``graph``: exactly ip-CSN's pair at stride 1, a 1x1x1 conv of the input (one group, no
    bias), then a depthwise 3x3x3 conv of its output (no ReLU between, no bias) which alone is the op's output, of
    at most ``WIDEST`` channels."""
    if len(graph.nodes) != 2 or graph.outputs != (1,):
        return False
    first, second = graph.nodes
    pointwise, depthwise_conv = first.conv, second.conv
    return (
        pointwise.out_channels <= WIDEST
        and first.source == INPUT
        and pointwise.kernel == (1, 1, 1)
        and pointwise.stride == (1, 1, 1)
        and pointwise.groups == 1
        and not pointwise.bias
        and second.source == 0
        and not second.relu
        and depthwise_conv.kernel == (3, 3, 3)
        and depthwise_conv.stride == (1, 1, 1)
        and depthwise_conv.groups == depthwise_conv.in_channels == depthwise_conv.out_channels
        and not depthwise_conv.bias
    )


def supports(x: torch.Tensor, pointwise: nn.Conv3d, depthwise_conv: nn.Conv3d) -> bool:
    """Whether the kernel computes the pair of modules built from a graph that ``fuses`` on this ``x`` (before asking
    ``KERNEL.available()``): what the graph fixed at build (kernels, strides, groups, no bias) holds for its modules,
    so only what a call can change is checked: a 5-D float32 ``x`` on the CPU and float32 weights."""
    return (
        x.device.type == "cpu"
        and x.dim() == 5
        and x.dtype == pointwise.weight.dtype == depthwise_conv.weight.dtype == torch.float32
    )


def blocked(matrix: torch.Tensor) -> torch.Tensor:
    """(C, K) -> (J, K, 16): channels in blocks of 16, zeros past C."""
    channels, k = matrix.shape
    blocks = -(-channels // 16)
    full = matrix.new_zeros(blocks * 16, k)
    full[:channels] = matrix
    return full.reshape(blocks, 16, k).transpose(1, 2).contiguous()


@torch.library.custom_op("psc_nas::pointwise_depthwise", mutates_args=(), device_types="cpu")
def pointwise_depthwise(x: torch.Tensor, w_pointwise: torch.Tensor, w_depthwise: torch.Tensor) -> torch.Tensor:
    """y = depthwise 3x3x3 conv ('same', stride 1) of the 1x1x1 conv of ``x`` (N, C_in, D, H, W) by ``w_pointwise``
    (C, C_in, 1, 1, 1) and ``w_depthwise`` (C, 1, 3, 3, 3); float32, CPU; channels_last_3d out. Forward only (no
    autograd formula): ``fast.py`` calls it where no backward follows."""
    module = KERNEL.module()
    if module is None:
        raise RuntimeError(f"the fused 1x1x1 + depthwise C++ kernel is unavailable: {KERNEL.unavailable_reason()}")
    if not x.dtype == w_pointwise.dtype == w_depthwise.dtype == torch.float32:
        raise RuntimeError(f"float32 only, got x {x.dtype}, weights {w_pointwise.dtype} and {w_depthwise.dtype}")
    channels = w_pointwise.shape[0]
    wp = blocked(w_pointwise.reshape(channels, -1))
    wd = blocked(w_depthwise.reshape(channels, -1))
    return module.pwdw_forward(x.contiguous(memory_format=torch.channels_last_3d), wp, wd, channels)


@pointwise_depthwise.register_fake
def _(x: torch.Tensor, w_pointwise: torch.Tensor, w_depthwise: torch.Tensor) -> torch.Tensor:
    shape = (x.shape[0], w_pointwise.shape[0], *x.shape[2:])
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last_3d)


@register_flop_formula(torch.ops.psc_nas.pointwise_depthwise)
def _flops(x_shape: Sequence[int], w_pointwise_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    batch, in_channels, *space = x_shape
    return 2 * batch * prod(space) * w_pointwise_shape[0] * (in_channels + 27)  # a MAC per input channel and per tap

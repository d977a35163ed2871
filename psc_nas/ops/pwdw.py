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

The backward is one pass too (since 2026-12-06, thirteenth session), and saves only x and the weights, never z.
Per task and plane d it keeps dy's planes d - 1, d, d + 1 in a ring like z's (copied into blocks), recomputes z's
plane d from x (the forward's 1x1x1 conv), and from them, band by band in L2: dz = the depthwise conv of dy by the
flipped kernel, the depthwise weights' gradient (z against dy's 27 shifts, 3 taps of a kernel row per column
window), then, RUN positions at a time so that their rows of x and dx stay in L1, dx = dz · W (P positions x up to
four blocks of input channels) and the 1x1x1 weights' gradient dzᵀ · x (a vector of 16 output channels by K input
channels); each thread sums the weight gradients of its tasks, and the threads' sums are added at the end. Unfused,
the same step passes z, dz and dy through memory twice each (oneDNN's depthwise forward and flipped-kernel input
gradient, psc-nas's depthwise weight gradient, oneDNN's 1x1 backward): the fused step ran 1.03-2.34x faster
(docs/benchmarks/ops.md). ``fast.py`` runs ``pointwise_depthwise`` (a ``torch.library`` custom op with this
backward and a FLOP formula) in training and inference alike, outside tracing and export.
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
#include <vector>
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

// The depthwise conv of M columns from ``ow`` of one output row and block into acc: planes[a] is buffer plane
// d - 1 + a, the row's three input rows that plane's buffer rows ``row`` to ``row`` + 2. Per kernel row, M + 2 loads
// of z and 3 of the weights (wd: (J, 27, 16)) feed 3M multiply-adds.
template <int M>
inline void depthwise_accumulate(const float* const* planes, int64_t row, const float* wd, int64_t ow, int64_t j,
                                 const Shape& s, vec* acc) {
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
}

// ``depthwise_accumulate``'s M columns to y (channels_last, C floats a position).
template <int M>
inline void depthwise_columns(const float* const* planes, int64_t row, const float* wd, float* y, int64_t ow, int64_t j,
                              const Shape& s) {
  vec acc[M];
  depthwise_accumulate<M>(planes, row, wd, ow, j, s, acc);
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
// The backward keeps five buffer planes and reads and writes rows of x and dx (``image_row_bytes``) as well.
int64_t band_rows(int64_t N, int64_t J, int64_t H, int64_t W, int64_t threads, int64_t buffers = 3,
                  int64_t image_row_bytes = 0) {
  const int64_t row_bytes = J * (W + 2) * L * static_cast<int64_t>(sizeof(float));
  const int64_t per_row = buffers * row_bytes + image_row_bytes;
  const int64_t fits = std::max<int64_t>(1, ((1 << 20) - 2 * buffers * row_bytes) / per_row);
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

// ---- backward ----

// ``depthwise_accumulate``'s M columns to a buffer row (blocked, from column ow + 1 on): dz in the backward.
template <int M>
inline void depthwise_columns_to_buffer(const float* const* planes, int64_t row, const float* wd, float* out,
                                        int64_t ow, int64_t j, const Shape& s) {
  vec acc[M];
  depthwise_accumulate<M>(planes, row, wd, ow, j, s, acc);
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) store(out + (ow + 1 + i) * L, acc[i]);
}

// The depthwise weight gradient of M columns from ``w`` of one row and block: for the kernel row (a, b),
// part[a][b][c] += z[w + i] * dy[plane 2 - a][row + 1 - b][w + i + 1 - c] (buffer columns: z at w + i + 1, dy at
// w + i + 2 - c).
template <int M>
inline void depthwise_grad_columns(const float* zrow, const float* const* dyplanes, int64_t dyrow, float* part,
                                   int64_t w, int64_t j, const Shape& s) {
  vec zc[M];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) zc[i] = load(zrow + (w + 1 + i) * L);
#pragma GCC unroll 3
  for (int a = 0; a < 3; ++a)
#pragma GCC unroll 3
    for (int b = 0; b < 3; ++b) {
      const float* dr = dyplanes[2 - a] + j * s.block() + (dyrow + 1 - b) * s.row() + w * L;  // buffer column w
      vec dc[M + 2];
#pragma GCC unroll 10
      for (int i = 0; i < M + 2; ++i) dc[i] = load(dr + i * L);
      vec a0 = vec{}, a1 = vec{}, a2 = vec{};
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        a0 += zc[i] * dc[i + 2];
        a1 += zc[i] * dc[i + 1];
        a2 += zc[i] * dc[i];
      }
      float* p = part + (j * 27 + a * 9 + b * 3) * L;
      store(p, load(p) + a0);
      store(p + L, load(p + L) + a1);
      store(p + 2 * L, load(p + 2 * L) + a2);
    }
}

// dx of ``count`` consecutive positions (the band's rows of one plane, from buffer row 1) = dz · W: P positions x
// G blocks of 16 input channels of accumulators; wt: (J_in, C, 16) = W's transpose in blocks.
template <int G, int P>
void pointwise_back_positions(const float* dz, const float* wt, float* dx, int64_t first, int64_t count,
                              const Shape& s, int64_t g0) {
  const int64_t C = s.C, Cin = s.Cin, W = s.W;
  const float* wg[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) wg[g] = wt + (g0 + g) * C * L;
  int64_t width[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) width[g] = std::min<int64_t>(L, Cin - (g0 + g) * L);
  int64_t row = first / W, col = first % W;
  auto source = [&]() __attribute__((always_inline)) { return dz + row * s.row() + (col + 1) * L; };
  auto step = [&]() __attribute__((always_inline)) {
    if (++col == W) col = 0, ++row;
  };
  dx += first * Cin;
  int64_t q = 0;
  for (; q + P <= count; q += P) {
    vec acc[P][G];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[p][g] = vec{};
    const float* dp[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) dp[p] = source(), step();
    for (int64_t j = 0; j < s.J; ++j) {
      const int64_t lanes = std::min<int64_t>(L, C - j * L);
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t c = j * L + l, at = j * s.block() + l;
        vec w[G];
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) w[g] = load(wg[g] + c * L);
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) {
          const vec b = splat(dp[p][at]);
#pragma GCC unroll 4
          for (int g = 0; g < G; ++g) acc[p][g] += b * w[g];
        }
      }
    }
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) store_part(dx + (q + p) * Cin + (g0 + g) * L, acc[p][g], width[g]);
  }
  for (; q < count; ++q) {
    vec acc[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc[g] = vec{};
    const float* d = source();
    step();
    for (int64_t c = 0; c < C; ++c) {
      const vec b = splat(d[(c / L) * s.block() + c % L]);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[g] += b * load(wg[g] + c * L);
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) store_part(dx + q * Cin + (g0 + g) * L, acc[g], width[g]);
  }
}

// Positions the 1x1x1 conv's gradients take at a time, every block of channels over them before the next: the rows
// of x and dx they touch stay in L1 between blocks (at 124 input channels, 32³, walking the band once per block
// ran 2.5x slower than at 16³ per position).
constexpr int64_t RUN = 64;

void pointwise_back(const float* dz, const float* wt, float* dx, int64_t count, const Shape& s) {
  const int64_t Jin = (s.Cin + L - 1) / L;
  for (int64_t first = 0; first < count; first += RUN) {
    const int64_t n = std::min(RUN, count - first);
    for (int64_t g0 = 0; g0 < Jin; g0 += 4) {
      switch (std::min<int64_t>(4, Jin - g0)) {
        case 1: pointwise_back_positions<1, 8>(dz, wt, dx, first, n, s, g0); break;
        case 2: pointwise_back_positions<2, 8>(dz, wt, dx, first, n, s, g0); break;
        case 3: pointwise_back_positions<3, 8>(dz, wt, dx, first, n, s, g0); break;
        default: pointwise_back_positions<4, 4>(dz, wt, dx, first, n, s, g0); break;
      }
    }
  }
}

// The 1x1x1 conv's weight gradient over ``count`` consecutive positions: part[j][ci] (16 output channels a vector)
// += dz[q][block j] * x[q][ci], for blocks [j0, j0 + G) and input channels [ci0, ci0 + K).
template <int G, int K>
void pointwise_grad_chunk(const float* x, const float* dz, float* part, int64_t first, int64_t count, const Shape& s,
                          int64_t j0, int64_t ci0) {
  const int64_t Cin = s.Cin, W = s.W;
  vec acc[K][G];
#pragma GCC unroll 24
  for (int k = 0; k < K; ++k)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc[k][g] = vec{};
  int64_t row = first / W, col = first % W;
  x += first * Cin;
  for (int64_t q = 0; q < count; ++q) {
    const float* d = dz + j0 * s.block() + row * s.row() + (col + 1) * L;
    if (++col == W) col = 0, ++row;
    vec dv[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) dv[g] = load(d + g * s.block());
    const float* xq = x + q * Cin + ci0;
#pragma GCC unroll 24
    for (int k = 0; k < K; ++k) {
      const vec b = splat(xq[k]);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[k][g] += b * dv[g];
    }
  }
#pragma GCC unroll 24
  for (int k = 0; k < K; ++k)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      float* p = part + ((j0 + g) * Cin + ci0 + k) * L;
      store(p, load(p) + acc[k][g]);
    }
}

template <int G, int K>
void pointwise_grad_blocks(const float* x, const float* dz, float* part, int64_t first, int64_t count, const Shape& s,
                           int64_t j0) {
  int64_t ci = 0;
  for (; ci + K <= s.Cin; ci += K) pointwise_grad_chunk<G, K>(x, dz, part, first, count, s, j0, ci);
  for (; ci + 4 <= s.Cin; ci += 4) pointwise_grad_chunk<G, 4>(x, dz, part, first, count, s, j0, ci);
  for (; ci < s.Cin; ++ci) pointwise_grad_chunk<G, 1>(x, dz, part, first, count, s, j0, ci);
}

void pointwise_grad(const float* x, const float* dz, float* part, int64_t count, const Shape& s) {
  for (int64_t first = 0; first < count; first += RUN) {
    const int64_t n = std::min(RUN, count - first);
    for (int64_t j0 = 0; j0 < s.J; j0 += 4) {
      switch (std::min<int64_t>(4, s.J - j0)) {
        case 1: pointwise_grad_blocks<1, 16>(x, dz, part, first, n, s, j0); break;
        case 2: pointwise_grad_blocks<2, 8>(x, dz, part, first, n, s, j0); break;
        case 3: pointwise_grad_blocks<3, 6>(x, dz, part, first, n, s, j0); break;
        default: pointwise_grad_blocks<4, 5>(x, dz, part, first, n, s, j0); break;
      }
    }
  }
}

// dy's rows [r0, r1) of plane dd copied into a ring buffer (blocked; the lanes past C stay zero).
void copy_rows(const float* dy, float* buffer, int64_t n, int64_t dd, int64_t r0, int64_t r1, int64_t h0,
               const Shape& s) {
  const int64_t C = s.C;
  for (int64_t r = r0; r < r1; ++r) {
    const float* src = dy + ((n * s.D + dd) * s.H + r) * s.W * C;
    for (int64_t j = 0; j < s.J; ++j) {
      const int64_t width = std::min<int64_t>(L, C - j * L);
      float* out = buffer + j * s.block() + (r - h0 + 1) * s.row() + L;
      if (width == L)
        for (int64_t w = 0; w < s.W; ++w) store(out + w * L, load(src + w * C + j * L));
      else
        for (int64_t w = 0; w < s.W; ++w) std::memcpy(out + w * L, src + w * C + j * L, width * sizeof(float));
    }
  }
}

void backward(const float* x, const float* dy, const float* wp, const float* wdf, const float* wt, float* dx,
              float* grad_wp, float* grad_wd, const Shape& s) {
  const int64_t bands = (s.H + s.band - 1) / s.band, plane = s.plane();
  const int64_t threads = at::get_num_threads();
  const int64_t wp_size = s.J * s.Cin * L, wd_size = s.J * 27 * L;
  const Floats zeros(plane), parts(threads * (wp_size + wd_size));
  at::parallel_for(0, s.N * bands, 1, [&](int64_t begin, int64_t end) {
    float* part_wp = parts.data + at::get_thread_num() * (wp_size + wd_size);
    float* part_wd = part_wp + wp_size;
    Floats ring(5 * plane);  // dy planes d - 1, d, d + 1; z and dz of plane d
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, h0 = task % bands * s.band, h1 = std::min(s.H, h0 + s.band);
      const int64_t lo = std::max<int64_t>(0, h0 - 1), hi = std::min(s.H, h1 + 1);
      std::fill(ring.data, ring.data + 5 * plane, 0.0f);
      float* slot[3] = {ring.data, ring.data + plane, ring.data + 2 * plane};
      float* z = ring.data + 3 * plane;
      float* dz = ring.data + 4 * plane;
      const int64_t count = (h1 - h0) * s.W;
      copy_rows(dy, slot[1], n, 0, lo, hi, h0, s);
      if (s.D > 1) copy_rows(dy, slot[2], n, 1, lo, hi, h0, s);
      for (int64_t d = 0; d < s.D; ++d) {
        const float* planes[3] = {d > 0 ? slot[0] : zeros.data, slot[1], d + 1 < s.D ? slot[2] : zeros.data};
        const float* xs = x + ((n * s.D + d) * s.H + h0) * s.W * s.Cin;
        pointwise(xs, wp, z + s.row(), count, s);
        for (int64_t j = 0; j < s.J; ++j)
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t row = h - h0 + 1;
            float* out = dz + j * s.block() + row * s.row();
            const float* zrow = z + j * s.block() + row * s.row();
            int64_t w = 0;
            for (; w + 8 <= s.W; w += 8) {
              depthwise_columns_to_buffer<8>(planes, h - h0, wdf, out, w, j, s);
              depthwise_grad_columns<8>(zrow, planes, row, part_wd, w, j, s);
            }
            for (; w < s.W; ++w) {
              depthwise_columns_to_buffer<1>(planes, h - h0, wdf, out, w, j, s);
              depthwise_grad_columns<1>(zrow, planes, row, part_wd, w, j, s);
            }
          }
        if (dx != nullptr) pointwise_back(dz + s.row(), wt, dx + ((n * s.D + d) * s.H + h0) * s.W * s.Cin, count, s);
        pointwise_grad(xs, dz + s.row(), part_wp, count, s);
        std::rotate(slot, slot + 1, slot + 3);
        if (d + 2 < s.D) copy_rows(dy, slot[2], n, d + 2, lo, hi, h0, s);
      }
    }
  });
  for (int64_t t = 0; t < threads; ++t) {
    const float* p = parts.data + t * (wp_size + wd_size);
    for (int64_t i = 0; i < wp_size; ++i) grad_wp[i] += p[i];
    for (int64_t i = 0; i < wd_size; ++i) grad_wd[i] += p[wp_size + i];
  }
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

// The pair's gradients from dy (N, C, D, H, W) channels_last_3d: wdf the depthwise weights flipped, (J, 27, 16); wt
// W's transpose, (J_in, C, 16). Returns dx (empty without ``input_grad``), the 1x1x1 weights' gradient (J, C_in, 16)
// and the depthwise weights' (J, 27, 16), in blocks of 16 output channels.
std::vector<at::Tensor> pwdw_backward(at::Tensor x, at::Tensor dy, at::Tensor wp, at::Tensor wdf, at::Tensor wt,
                                      int64_t channels, bool input_grad) {
  TORCH_CHECK(x.dim() == 5 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast3d),
              "x: a 5-D float32 channels_last_3d tensor");
  const int64_t N = x.size(0), Cin = x.size(1), J = (channels + L - 1) / L, D = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Jin = (Cin + L - 1) / L;
  TORCH_CHECK(dy.scalar_type() == at::kFloat && dy.is_contiguous(at::MemoryFormat::ChannelsLast3d) &&
                  dy.sizes() == at::IntArrayRef({N, channels, D, H, W}),
              "dy: (N, C, D, H, W) float32 channels_last_3d");
  TORCH_CHECK(wp.is_contiguous() && wp.dim() == 3 && wp.size(0) == J && wp.size(1) == Cin && wp.size(2) == L,
              "wp: (J, C_in, 16)");
  TORCH_CHECK(wdf.is_contiguous() && wdf.dim() == 3 && wdf.size(0) == J && wdf.size(1) == 27 && wdf.size(2) == L,
              "wdf: (J, 27, 16)");
  TORCH_CHECK(wt.is_contiguous() && wt.dim() == 3 && wt.size(0) == Jin && wt.size(1) == channels && wt.size(2) == L,
              "wt: (J_in, C, 16)");
  at::Tensor dx = input_grad ? at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast3d))
                             : at::empty({0}, x.options());
  at::Tensor grad_wp = at::zeros({J, Cin, L}, x.options()), grad_wd = at::zeros({J, 27, L}, x.options());
  if (x.numel() == 0 || channels == 0) {
    if (input_grad) dx.zero_();
    return {dx, grad_wp, grad_wd};
  }
  const Shape s{N, Cin, channels, J, D, H, W, band_rows(N, J, H, W, at::get_num_threads(), 5, 2 * Cin * W * 4)};
  backward(x.data_ptr<float>(), dy.data_ptr<float>(), wp.data_ptr<float>(), wdf.data_ptr<float>(),
           wt.data_ptr<float>(), input_grad ? dx.data_ptr<float>() : nullptr, grad_wp.data_ptr<float>(),
           grad_wd.data_ptr<float>(), s);
  return {dx, grad_wp, grad_wd};
}
"""
FUNCTIONS = ["pwdw_forward", "pwdw_backward"]
KERNEL = native.Extension("pwdw", 5, SOURCE, FUNCTIONS, "the fused 1x1x1 + depthwise C++ kernel")


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


def unblocked(blocks: torch.Tensor, channels: int) -> torch.Tensor:
    """(J, K, 16) -> (C, K), the inverse of ``blocked``."""
    return blocks.transpose(1, 2).reshape(-1, blocks.shape[1])[:channels]


@torch.library.custom_op("psc_nas::pointwise_depthwise", mutates_args=(), device_types="cpu")
def pointwise_depthwise(x: torch.Tensor, w_pointwise: torch.Tensor, w_depthwise: torch.Tensor) -> torch.Tensor:
    """y = depthwise 3x3x3 conv ('same', stride 1) of the 1x1x1 conv of ``x`` (N, C_in, D, H, W) by ``w_pointwise``
    (C, C_in, 1, 1, 1) and ``w_depthwise`` (C, 1, 3, 3, 3); float32, CPU; channels_last_3d out. Its backward
    (``_backward``) is the kernel's fused backward; it saves x and the weights, never z."""
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


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, w_pointwise, w_depthwise = inputs
    ctx.save_for_backward(x, w_pointwise, w_depthwise)


def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    x, w_pointwise, w_depthwise = ctx.saved_tensors
    channels, in_channels = w_pointwise.shape[:2]
    grad_x, grad_pointwise, grad_depthwise = KERNEL.module().pwdw_backward(
        x.contiguous(memory_format=torch.channels_last_3d),
        grad_y.contiguous(memory_format=torch.channels_last_3d),
        blocked(w_pointwise.reshape(channels, in_channels)),
        blocked(w_depthwise.flip(2, 3, 4).reshape(channels, 27)),  # dz: dy's depthwise conv by the flipped kernel
        blocked(w_pointwise.reshape(channels, in_channels).t()),  # dx = dz · W
        channels,
        ctx.needs_input_grad[0],
    )
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        unblocked(grad_pointwise, channels).reshape(w_pointwise.shape),
        unblocked(grad_depthwise, channels).reshape(w_depthwise.shape),
    )


pointwise_depthwise.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.psc_nas.pointwise_depthwise)
def _flops(x_shape: Sequence[int], w_pointwise_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    batch, in_channels, *space = x_shape
    return 2 * batch * prod(space) * w_pointwise_shape[0] * (in_channels + 27)  # a MAC per input channel and per tap

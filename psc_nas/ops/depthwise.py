"""A depthwise 3D conv (groups = channels) on channels_last_3d CPU tensors, with psc-nas's own C++ kernel.

oneDNN's channels_last depthwise 3x3x3 *forward* runs near this machine's roofline, but its
backward takes 30-65x as long (docs/benchmarks/ops.md, roofline.md). ``depthwise_conv3d`` keeps
oneDNN's forward, computes the stride-1 input gradient as that forward on the spatially flipped
kernel, and the weight gradient with the C++ kernel below. In float32, 3x3x3, any C (a last block of C % 16 channels
has masked loads): where the W stride is 1, along input rows, each x vector loaded once for the three taps of its
row and dy's columns kept in registers as a sliding window of three (since 2026-12-06: 1.02-1.89x the previous
kernel's weight gradient, 1.58x at DenseNet3D's C = 28, 32³, batch 4; a training pass 1.02-1.25x; docs/benchmarks/
ops-wgrad-ab-xeon.md), walked in bands of
output rows plane by plane so that the input rows stay in L2; at other strides per output row, 16-channel block and
kernel plane, 9 taps' accumulators in AVX-512 registers while the row's columns stream past (docs/benchmarks/ops.md).
Float64 and other kernels take a generic vectorised loop. The
kernel also has a forward (one register block per pixel over the taps) and a strided input gradient (a gather per
input row, so threads never write the same row), used for strides other than 1 and by the benchmarks.
Odd kernels with 'same' padding (``kernel // 2``), any stride, no bias, float32 or float64.

The kernel is a ``psc_nas.native.Extension``: compiled once per machine and torch installation, loaded by every
later process; ``KERNEL.available()`` builds or loads it and says whether it can run; a machine without a compiler
(or ``PSC_NAS_NO_EXTENSIONS=1``) gets ``False`` and the callers keep oneDNN's path; ``KERNEL.load_seconds()`` reports
a build's time, so compile time never hides inside a timed search or benchmark.

``depthwise_conv3d`` is a ``torch.library`` custom op (``psc_nas::depthwise_conv3d``) with a
registered autograd formula and a FLOP formula, so ``FlopCounterMode`` counts its exact MACs;
``fast.py`` calls it only in a training step, so inference, tracing and export see a plain conv.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from psc_nas import native

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

struct Geometry {
  int64_t N, C, D, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, OD, OH, OW;
};

Geometry geometry(const at::IntArrayRef in_sizes, const at::IntArrayRef kernel, const at::IntArrayRef stride) {
  TORCH_CHECK(in_sizes.size() == 5 && kernel.size() == 3 && stride.size() == 3, "5-D input, 3 kernel and 3 stride");
  Geometry g;
  g.N = in_sizes[0]; g.C = in_sizes[1]; g.D = in_sizes[2]; g.H = in_sizes[3]; g.W = in_sizes[4];
  g.KD = kernel[0]; g.KH = kernel[1]; g.KW = kernel[2];
  g.SD = stride[0]; g.SH = stride[1]; g.SW = stride[2];
  g.PD = g.KD / 2; g.PH = g.KH / 2; g.PW = g.KW / 2;
  g.OD = (g.D + 2 * g.PD - g.KD) / g.SD + 1;
  g.OH = (g.H + 2 * g.PH - g.KH) / g.SH + 1;
  g.OW = (g.W + 2 * g.PW - g.KW) / g.SW + 1;
  return g;
}

// Output columns ow whose input column ow * S - P + k lies in [0, W): [lo, hi).
inline void column_range(int64_t k, const Geometry& g, int64_t& lo, int64_t& hi) {
  const int64_t first = g.PW - k;  // need ow * SW >= first
  lo = first <= 0 ? 0 : (first + g.SW - 1) / g.SW;
  const int64_t last = g.W - 1 + g.PW - k;  // need ow * SW <= last
  hi = last < 0 ? 0 : std::min(g.OW, last / g.SW + 1);
}

// One block of channels: kBlock values fill one 512-bit register, so each output pixel's block is
// a register accumulated over the taps (forward), or each tap's block a register accumulated over
// a row's columns (weight gradient), with no load or store of the accumulator in between.
template <typename T>
constexpr int64_t block() { return 64 / sizeof(T); }

// Output columns ow whose input column ow * SW - PW + k lies in [0, W) for every k: [lo, hi).
inline void interior_columns(const Geometry& g, int64_t& lo, int64_t& hi) {
  lo = (g.PW + g.SW - 1) / g.SW;
  const int64_t last = g.W - 1 + g.PW - (g.KW - 1);
  hi = last < 0 ? 0 : std::max(lo, std::min(g.OW, last / g.SW + 1));
}

template <typename T>
void forward_rows(const T* x, const T* w, T* y, const Geometry& g) {
  constexpr int64_t B = block<T>();
  const int64_t C = g.C, rows = g.N * g.OD * g.OH, full = C / B * B;
  int64_t inner_lo, inner_hi;
  interior_columns(g, inner_lo, inner_hi);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> xrows(g.KD * g.KH);  // the input row each (a, b) reads, or null
    std::vector<const T*> wrows(g.KD * g.KH);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t oh = r % g.OH, od = (r / g.OH) % g.OD, n = r / (g.OH * g.OD);
      int64_t used = 0;
      for (int64_t a = 0; a < g.KD; ++a) {
        const int64_t id = od * g.SD - g.PD + a;
        if (id < 0 || id >= g.D) continue;
        for (int64_t b = 0; b < g.KH; ++b) {
          const int64_t ih = oh * g.SH - g.PH + b;
          if (ih < 0 || ih >= g.H) continue;
          xrows[used] = x + ((n * g.D + id) * g.H + ih) * g.W * C;
          wrows[used] = w + (a * g.KH + b) * g.KW * C;
          ++used;
        }
      }
      T* yrow = y + r * g.OW * C;
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const bool inside = ow >= inner_lo && ow < inner_hi;
        const int64_t base = ow * g.SW - g.PW;
        for (int64_t c0 = 0; c0 < full; c0 += B) {
          T acc[B] = {};
          for (int64_t u = 0; u < used; ++u) {
            for (int64_t k = 0; k < g.KW; ++k) {
              const int64_t iw = base + k;
              if (!inside && (iw < 0 || iw >= g.W)) continue;
              const T* __restrict__ xv = xrows[u] + iw * C + c0;
              const T* __restrict__ wv = wrows[u] + k * C + c0;
#pragma omp simd
              for (int64_t c = 0; c < B; ++c) acc[c] += xv[c] * wv[c];
            }
          }
          std::copy(acc, acc + B, yrow + ow * C + c0);
        }
        if (full < C) {  // the channels past the last full block
          T* yv = yrow + ow * C;
          std::fill(yv + full, yv + C, T(0));
          for (int64_t u = 0; u < used; ++u)
            for (int64_t k = 0; k < g.KW; ++k) {
              const int64_t iw = base + k;
              if (iw < 0 || iw >= g.W) continue;
              for (int64_t c = full; c < C; ++c) yv[c] += xrows[u][iw * C + c] * wrows[u][k * C + c];
            }
        }
      }
    }
  });
}

template <typename T>
void input_grad_rows(const T* gy, const T* w, T* gx, const Geometry& g) {
  const int64_t C = g.C, rows = g.N * g.D * g.H;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ih = r % g.H, id = (r / g.H) % g.D, n = r / (g.H * g.D);
      T* gxrow = gx + r * g.W * C;
      std::fill(gxrow, gxrow + g.W * C, T(0));
      for (int64_t a = 0; a < g.KD; ++a) {
        const int64_t td = id + g.PD - a;  // = od * SD
        if (td < 0 || td % g.SD) continue;
        const int64_t od = td / g.SD;
        if (od >= g.OD) continue;
        for (int64_t b = 0; b < g.KH; ++b) {
          const int64_t th = ih + g.PH - b;
          if (th < 0 || th % g.SH) continue;
          const int64_t oh = th / g.SH;
          if (oh >= g.OH) continue;
          const T* gyrow = gy + ((n * g.OD + od) * g.OH + oh) * g.OW * C;
          for (int64_t k = 0; k < g.KW; ++k) {
            const T* __restrict__ wv = w + ((a * g.KH + b) * g.KW + k) * C;
            int64_t lo, hi;
            column_range(k, g, lo, hi);
            for (int64_t ow = lo; ow < hi; ++ow) {  // this thread owns the whole input row
              const T* __restrict__ gyv = gyrow + ow * C;
              T* __restrict__ gxv = gxrow + (ow * g.SW - g.PW + k) * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) gxv[c] += gyv[c] * wv[c];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void weight_grad_rows(const T* x, const T* gy, T* partial, int64_t chunks, const Geometry& g) {
  // partial: (chunks, taps, C), one accumulator per chunk of output rows, summed by the caller.
  constexpr int64_t B = block<T>();
  const int64_t C = g.C, rows = g.N * g.OD * g.OH, taps = g.KD * g.KH * g.KW, full = C / B * B;
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      T* acc_all = partial + chunk * taps * C;
      const int64_t stop = std::min(rows, (chunk + 1) * per_chunk);
      for (int64_t r = chunk * per_chunk; r < stop; ++r) {
        const int64_t oh = r % g.OH, od = (r / g.OH) % g.OD, n = r / (g.OH * g.OD);
        const T* gyrow = gy + r * g.OW * C;
        for (int64_t a = 0; a < g.KD; ++a) {
          const int64_t id = od * g.SD - g.PD + a;
          if (id < 0 || id >= g.D) continue;
          for (int64_t b = 0; b < g.KH; ++b) {
            const int64_t ih = oh * g.SH - g.PH + b;
            if (ih < 0 || ih >= g.H) continue;
            const T* xrow = x + ((n * g.D + id) * g.H + ih) * g.W * C;
            for (int64_t k = 0; k < g.KW; ++k) {
              T* __restrict__ av = acc_all + ((a * g.KH + b) * g.KW + k) * C;
              int64_t lo, hi;
              column_range(k, g, lo, hi);
              const int64_t shift = k - g.PW;
              for (int64_t c0 = 0; c0 < full; c0 += B) {
                T acc0[B] = {}, acc1[B] = {};  // two chains hide the multiply-add latency
                int64_t ow = lo;
                for (; ow + 1 < hi; ow += 2) {
                  const T* __restrict__ x0 = xrow + (ow * g.SW + shift) * C + c0;
                  const T* __restrict__ x1 = xrow + ((ow + 1) * g.SW + shift) * C + c0;
                  const T* __restrict__ g0 = gyrow + ow * C + c0;
                  const T* __restrict__ g1 = g0 + C;
#pragma omp simd
                  for (int64_t c = 0; c < B; ++c) {
                    acc0[c] += x0[c] * g0[c];
                    acc1[c] += x1[c] * g1[c];
                  }
                }
                if (ow < hi) {
                  const T* __restrict__ x0 = xrow + (ow * g.SW + shift) * C + c0;
                  const T* __restrict__ g0 = gyrow + ow * C + c0;
#pragma omp simd
                  for (int64_t c = 0; c < B; ++c) acc0[c] += x0[c] * g0[c];
                }
#pragma omp simd
                for (int64_t c = 0; c < B; ++c) av[c0 + c] += acc0[c] + acc1[c];
              }
              for (int64_t c = full; c < C; ++c)
                for (int64_t ow = lo; ow < hi; ++ow) av[c] += xrow[(ow * g.SW + shift) * C + c] * gyrow[ow * C + c];
            }
          }
        }
      }
    }
  });
}

#if defined(__AVX512F__)
#include <immintrin.h>
// Tasks of the AVX-512 weight gradients: a band of ``band`` output rows (oh) of one sample, walked plane by plane (od),
// so that the input rows a task reads, 3 planes of band + 2 rows, stay in L2 while the next plane reuses two of the
// three (whole planes row by row, before 2026-12-06, held 3 MB of rows at C = 64, 64³; the bands alone made the column
// kernel 1.07x faster there, and no faster at 32³). ``row(acc, n, od, oh)`` runs for every output row, ``acc`` its
// task's 27 x C partial sums.
int64_t band_count(const Geometry& g, int64_t band) { return (g.OH + band - 1) / band; }

int64_t weight_grad_tasks(const Geometry& g, int64_t band) { return g.N * band_count(g, band); }

int64_t weight_grad_band(const Geometry& g, int64_t threads) {
  const int64_t row_bytes = g.W * g.C * static_cast<int64_t>(sizeof(float));
  const int64_t fits = std::max<int64_t>(1, (1 << 20) / (3 * row_bytes) - 2);  // 3 planes x (band + 2) rows <= 1 MiB
  const int64_t shares = std::max<int64_t>(1, (g.N * g.OH + 4 * threads - 1) / (4 * threads));  // >= 4 tasks a thread
  return std::min({fits, shares, g.OH});
}

template <typename Row>
void band_rows(float* partial, int64_t band, const Geometry& g, const Row& row) {
  const int64_t bands = band_count(g, band);
  at::parallel_for(0, weight_grad_tasks(g, band), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, oh0 = task % bands * band, oh1 = std::min(g.OH, oh0 + band);
      for (int64_t r = 0; r < g.OD * (oh1 - oh0); ++r)
        row(partial + task * 27 * g.C, n, r / (oh1 - oh0), oh0 + r % (oh1 - oh0));
    }
  });
}

// Weight gradient of a 3x3x3 kernel in float32: per output row, block of 16 channels and D offset of
// the kernel, the 9 taps' accumulators stay in registers while the row's columns stream past, so each
// multiply-add needs one load of x (dy is loaded once per column for 9 taps). Missing input rows read
// a zero row; in the first and last columns the taps that fall outside are skipped, in the same vector
// code. Any C: the last block's loads and stores are masked to the channels it has (DenseNet3D's
// growth of 28 channels is one full block and one of 12); the full blocks keep plain loads. Runs where the W
// stride is not 1 (the row-window kernel below takes the rest).
void weight_grad_3x3x3_avx512(const float* x, const float* gy, float* partial, int64_t band, const Geometry& g) {
  const int64_t C = g.C;
  int64_t inner_lo, inner_hi;
  interior_columns(g, inner_lo, inner_hi);
  const std::vector<float> zero_row(g.W * C, 0.0f);
  band_rows(partial, band, g, [&](float* acc_all, int64_t n, int64_t od, int64_t oh) {
    const float* gyrow = gy + ((n * g.OD + od) * g.OH + oh) * g.OW * C;
    const float* xrows[9];
    for (int64_t a = 0; a < 3; ++a)
      for (int64_t b = 0; b < 3; ++b) {
        const int64_t id = od * g.SD - 1 + a, ih = oh * g.SH - 1 + b;
        const bool inside = id >= 0 && id < g.D && ih >= 0 && ih < g.H;
        xrows[a * 3 + b] = inside ? x + ((n * g.D + id) * g.H + ih) * g.W * C : zero_row.data();
      }
    // One plane of taps (a fixed D offset: 3 input rows) at a time, so a column reads 3 rows, not 9: with C = 32
    // or 64 a row is 4 or 8 KiB long and 9 rows at one column map to a single L1 set, more lines than its ways.
    // One block of 16 channels from c0; Masked: the last, partial one (its loads and stores masked to m). The
    // full blocks keep plain loads: masked ones there ran at 0.85-0.91x their speed (docs/benchmarks/ops.md).
    auto channel_block = [&](auto masked, int64_t c0, __mmask16 m) __attribute__((always_inline)) {
      constexpr bool Masked = decltype(masked)::value;
      auto load = [&](const float* p) __attribute__((always_inline)) {
        if constexpr (Masked) return _mm512_maskz_loadu_ps(m, p);
        else return _mm512_loadu_ps(p);
      };
      for (int a = 0; a < 3; ++a) {
        __m512 acc[9];
#pragma GCC unroll 9
        for (int t = 0; t < 9; ++t) acc[t] = _mm512_setzero_ps();
        const float* const* rows3 = xrows + 3 * a;
        // One column: dy once, each tap's x from its row; a tap whose column falls outside is skipped. The
        // checks are false inside [inner_lo, inner_hi), so that loop is the same code without them.
        auto column = [&](int64_t ow, bool edge) __attribute__((always_inline)) {
          const __m512 dy = load(gyrow + ow * C + c0);
          const int64_t iw = ow * g.SW - 1;
          const bool left = edge && iw < 0, right = edge && iw + 2 >= g.W;
          const int64_t base = iw * C + c0;
#pragma GCC unroll 3
          for (int b = 0; b < 3; ++b) {
            const float* xv = rows3[b] + base;
            if (!left) acc[b * 3 + 0] = _mm512_fmadd_ps(load(xv), dy, acc[b * 3 + 0]);
            acc[b * 3 + 1] = _mm512_fmadd_ps(load(xv + C), dy, acc[b * 3 + 1]);
            if (!right) acc[b * 3 + 2] = _mm512_fmadd_ps(load(xv + 2 * C), dy, acc[b * 3 + 2]);
          }
        };
        for (int64_t ow = 0; ow < std::min(inner_lo, g.OW); ++ow) column(ow, true);
        for (int64_t ow = inner_lo; ow < inner_hi; ++ow) column(ow, false);
        for (int64_t ow = std::max(inner_lo, inner_hi); ow < g.OW; ++ow) column(ow, true);
#pragma GCC unroll 9
        for (int t = 0; t < 9; ++t) {
          float* av = acc_all + (a * 9 + t) * C + c0;
          const __m512 sum = _mm512_add_ps(load(av), acc[t]);
          if constexpr (Masked) _mm512_mask_storeu_ps(av, m, sum);
          else _mm512_storeu_ps(av, sum);
        }
      }
    };
    int64_t c0 = 0;
    for (; c0 + 16 <= C; c0 += 16) channel_block(std::false_type{}, c0, __mmask16(0xFFFF));
    if (c0 < C) channel_block(std::true_type{}, c0, __mmask16((1u << (C - c0)) - 1u));
  });
}

// The same gradient where the W stride is 1, along input rows: on an x row of input columns p, tap k of the row's
// three pairs x[p] with dy[p + 1 - k], so each x vector is loaded once for its three taps, and each dy vector once for
// the three x it meets, kept in registers as a window of three columns that slides one column a step; the rows stream
// contiguously through up to four blocks (64 channels) at once. R rows of the plane (R = 3 for up to two blocks, so
// that 9 accumulators a block give the multiply-adds independent chains; 1 for three or four) read one dy row: per
// column and block R + 1 loads for 3R multiply-adds, against 10 for 9 in the kernel above. G blocks of 16 channels
// from c0, the last masked to m; ``acc`` is the first row's 3 taps, a row's taps 3 * C floats after the previous.
template <int G, int R>
inline void window_rows(const float* const* xrows, const float* gyrow, int64_t W, int64_t C, int64_t c0, __mmask16 m,
                        float* acc_row) {
  auto load = [&](const float* p, int blk) __attribute__((always_inline)) {
    return blk == G - 1 ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
  };
  __m512 acc[R][3][G], prev[G], cur[G];
#pragma GCC unroll 4
  for (int j = 0; j < G; ++j) {
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r) acc[r][0][j] = acc[r][1][j] = acc[r][2][j] = _mm512_setzero_ps();
    prev[j] = _mm512_setzero_ps();
    cur[j] = load(gyrow + c0 + 16 * j, j);
  }
  for (int64_t p = 0; p < W; ++p) {
    const bool more = p + 1 < W;
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j) {
      const __m512 next = more ? load(gyrow + (p + 1) * C + c0 + 16 * j, j) : _mm512_setzero_ps();
#pragma GCC unroll 3
      for (int r = 0; r < R; ++r) {
        const __m512 xv = load(xrows[r] + p * C + c0 + 16 * j, j);
        acc[r][0][j] = _mm512_fmadd_ps(xv, next, acc[r][0][j]);
        acc[r][1][j] = _mm512_fmadd_ps(xv, cur[j], acc[r][1][j]);
        acc[r][2][j] = _mm512_fmadd_ps(xv, prev[j], acc[r][2][j]);
      }
      prev[j] = cur[j];
      cur[j] = next;
    }
  }
#pragma GCC unroll 3
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k)
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) {
        float* av = acc_row + (3 * r + k) * C + c0 + 16 * j;
        const __m512 sum = _mm512_add_ps(load(av, j), acc[r][k][j]);
        if (j == G - 1) _mm512_mask_storeu_ps(av, m, sum);
        else _mm512_storeu_ps(av, sum);
      }
}

void weight_grad_3x3x3_window(const float* x, const float* gy, float* partial, int64_t band, const Geometry& g) {
  const int64_t C = g.C;
  const std::vector<float> zero_row(g.W * C, 0.0f);
  band_rows(partial, band, g, [&](float* acc_all, int64_t n, int64_t od, int64_t oh) {
    const float* gyrow = gy + ((n * g.OD + od) * g.OH + oh) * g.OW * C;
    for (int64_t a = 0; a < 3; ++a) {
      const int64_t id = od * g.SD - 1 + a;
      if (id < 0 || id >= g.D) continue;
      const float* xrows[3];
      for (int64_t b = 0; b < 3; ++b) {
        const int64_t ih = oh * g.SH - 1 + b;
        xrows[b] = ih >= 0 && ih < g.H ? x + ((n * g.D + id) * g.H + ih) * g.W * C : zero_row.data();
      }
      float* acc_plane = acc_all + a * 9 * C;
      for (int64_t c0 = 0; c0 < C; c0 += 64) {
        const int64_t left = C - c0, blocks = std::min<int64_t>(4, (left + 15) / 16);
        const int64_t last = left - 16 * (blocks - 1);  // channels of the last block: 1..16
        const __mmask16 m = last >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << last) - 1u);
        switch (blocks) {
          case 1: window_rows<1, 3>(xrows, gyrow, g.W, C, c0, m, acc_plane); break;
          case 2: window_rows<2, 3>(xrows, gyrow, g.W, C, c0, m, acc_plane); break;
          case 3:
            for (int b = 0; b < 3; ++b) window_rows<3, 1>(xrows + b, gyrow, g.W, C, c0, m, acc_plane + b * 3 * C);
            break;
          default:
            for (int b = 0; b < 3; ++b) window_rows<4, 1>(xrows + b, gyrow, g.W, C, c0, m, acc_plane + b * 3 * C);
            break;
        }
      }
    }
  });
}
#endif

// The weight gradient as (KD*KH*KW, C): per task, partial sums the threads write apart, summed over the tasks.
template <typename T>
at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& gy, const Geometry& g) {
  const int64_t threads = at::get_num_threads(), taps = g.KD * g.KH * g.KW;
  auto zeros = [&](int64_t tasks) -> at::Tensor {
    return at::zeros({tasks, taps, g.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  };
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (g.KD == 3 && g.KH == 3 && g.KW == 3) {
      const int64_t band = weight_grad_band(g, threads);
      const at::Tensor partial = zeros(weight_grad_tasks(g, band));
      const auto kernel = g.SW == 1 ? weight_grad_3x3x3_window : weight_grad_3x3x3_avx512;
      kernel(x.data_ptr<float>(), gy.data_ptr<float>(), partial.data_ptr<float>(), band, g);
      return partial.sum(0);
    }
  }
#endif
  const int64_t rows = g.N * g.OD * g.OH;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * threads));
  const at::Tensor partial = zeros(chunks);
  weight_grad_rows<T>(x.data_ptr<T>(), gy.data_ptr<T>(), partial.data_ptr<T>(), chunks, g);
  return partial.sum(0);
}

at::Tensor channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast3d); }

}  // namespace

// x: (N, C, D, H, W); taps_weight: (KD*KH*KW, C) contiguous. Returns y in channels_last_3d.
at::Tensor dw_forward(at::Tensor x, at::Tensor taps_weight, std::vector<int64_t> kernel, std::vector<int64_t> stride) {
  x = channels_last(x);
  const Geometry g = geometry(x.sizes(), kernel, stride);
  auto y = at::empty({g.N, g.C, g.OD, g.OH, g.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw_forward", [&] {
    forward_rows<scalar_t>(x.data_ptr<scalar_t>(), taps_weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g);
  });
  return y;
}

at::Tensor dw_input_grad(at::Tensor grad_y, at::Tensor taps_weight, std::vector<int64_t> in_sizes,
                         std::vector<int64_t> kernel, std::vector<int64_t> stride) {
  grad_y = channels_last(grad_y);
  const Geometry g = geometry(in_sizes, kernel, stride);
  TORCH_CHECK(grad_y.size(2) == g.OD && grad_y.size(3) == g.OH && grad_y.size(4) == g.OW, "grad_y shape");
  auto gx = at::empty(in_sizes, grad_y.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "dw_input_grad", [&] {
    input_grad_rows<scalar_t>(grad_y.data_ptr<scalar_t>(), taps_weight.data_ptr<scalar_t>(),
                              gx.data_ptr<scalar_t>(), g);
  });
  return gx;
}

// Returns the weight gradient as (KD*KH*KW, C).
at::Tensor dw_weight_grad(at::Tensor x, at::Tensor grad_y, std::vector<int64_t> kernel, std::vector<int64_t> stride) {
  x = channels_last(x);
  grad_y = channels_last(grad_y);
  const Geometry g = geometry(x.sizes(), kernel, stride);
  at::Tensor taps;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw_weight_grad", [&] { taps = weight_grad<scalar_t>(x, grad_y, g); });
  return taps;
}
"""
FUNCTIONS = ["dw_forward", "dw_input_grad", "dw_weight_grad"]
KERNEL = native.Extension("depthwise", 14, SOURCE, FUNCTIONS, "the depthwise C++ kernel")


def supports(weight: torch.Tensor, bias: torch.Tensor | None, groups: int, padding: Sequence[int]) -> bool:
    """Whether a conv with these arguments is one the kernel computes (before asking ``KERNEL.available()``)."""
    channels, per_group, *kernel = weight.shape
    return (
        bias is None
        and groups == channels
        and per_group == 1
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.float64)
        and all(k % 2 == 1 for k in kernel)
        and list(padding) == [k // 2 for k in kernel]
    )


def taps_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, KD, KH, KW) -> (KD*KH*KW, C), the kernel's layout: one channel vector per tap."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def flipped_is_gradient(stride: Sequence[int]) -> bool:
    """With stride 1 the input gradient is the same conv of dy by the spatially flipped kernel."""
    return all(s == 1 for s in stride)


@torch.library.custom_op("psc_nas::depthwise_conv3d", mutates_args=(), device_types="cpu")
def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """Depthwise 'same'-padded conv of ``x`` (N, C, D, H, W) by ``weight`` (C, 1, kd, kh, kw); channels_last_3d out.

    Forward: oneDNN's channels_last_3d depthwise conv (its forward is fast; its backward is not).
    Backward: input gradient by the same oneDNN forward on the flipped kernel where the stride is 1,
    else by the C++ kernel; weight gradient always by the C++ kernel (measured in
    docs/benchmarks/roofline.md).
    """
    if KERNEL.module() is None:
        raise RuntimeError(f"the depthwise C++ kernel is unavailable: {KERNEL.unavailable_reason()}")
    if x.dtype != weight.dtype:
        raise RuntimeError(f"x is {x.dtype} but weight is {weight.dtype}")
    x = x.contiguous(memory_format=torch.channels_last_3d)
    padding = [k // 2 for k in weight.shape[2:]]
    return F.conv3d(x, weight, None, list(stride), padding, 1, weight.shape[0]).contiguous(
        memory_format=torch.channels_last_3d
    )


@depthwise_conv3d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    out = [(size + 2 * (k // 2) - k) // s + 1 for size, k, s in zip(x.shape[2:], weight.shape[2:], stride)]
    return x.new_empty((x.shape[0], x.shape[1], *out)).contiguous(memory_format=torch.channels_last_3d)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, stride = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride = list(stride)


def input_grad(
    grad_y: torch.Tensor, weight: torch.Tensor, in_shape: Sequence[int], stride: Sequence[int]
) -> torch.Tensor:
    grad_y = grad_y.contiguous(memory_format=torch.channels_last_3d)
    if flipped_is_gradient(stride):
        padding = [k // 2 for k in weight.shape[2:]]
        flipped = weight.flip(2, 3, 4)
        return F.conv3d(grad_y, flipped, None, 1, padding, 1, weight.shape[0])
    return KERNEL.module().dw_input_grad(
        grad_y, taps_weight(weight), list(in_shape), list(weight.shape[2:]), list(stride)
    )


def weight_grad(
    x: torch.Tensor, grad_y: torch.Tensor, weight_shape: Sequence[int], stride: Sequence[int]
) -> torch.Tensor:
    taps = KERNEL.module().dw_weight_grad(x, grad_y, list(weight_shape[2:]), list(stride))
    return taps.t().reshape(weight_shape)


def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    x, weight = ctx.saved_tensors
    # Once for both gradients: in a DenseNet grad_y is a channel slice of the concatenation's gradient, and each
    # consumer converting it on its own copied it twice (a 15 MB copy each at 28 channels, 32³, batch 4).
    grad_y = grad_y.contiguous(memory_format=torch.channels_last_3d)
    grad_x = input_grad(grad_y, weight, x.shape, ctx.stride) if ctx.needs_input_grad[0] else None
    grad_w = weight_grad(x, grad_y, weight.shape, ctx.stride) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


depthwise_conv3d.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.psc_nas.depthwise_conv3d)
def _flops(
    x_shape: Sequence[int], w_shape: Sequence[int], stride: Any, *args: Any, out_shape: Sequence[int], **kw: Any
) -> int:
    return 2 * prod(out_shape) * prod(w_shape[2:])  # out_shape (N, C, ...): one MAC per tap per output

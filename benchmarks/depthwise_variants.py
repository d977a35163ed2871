"""Depthwise 3x3x3 kernels of our own against oneDNN's: the experiments behind ops.md's sixth-session section.

    python benchmarks/depthwise_variants.py                       # C = 16/28/32/64 at 32³, 16/32/64 at 64³, batch 2
    python benchmarks/depthwise_variants.py --shapes 28x32 --batch 4 --out docs/benchmarks/ops-depthwise-variants.md

csn_ir's depthwise conv is the issue's worst row at C = 64. Three AVX-512 prototypes (float32, stride 1, 'same'
padding, channels_last_3d), none of which psc-nas uses, because none beat what it runs
(``depthwise.depthwise_conv3d``: oneDNN's forward, the flipped-kernel input gradient by oneDNN, the weight gradient
by psc-nas's C++ kernel):

- ``strips``: per output row and block of 16 channels, 8 output columns' accumulators in registers; each (d, h) tap
  row's 10 input vectors are loaded once for 3 taps x 8 outputs; blocks innermost per strip, so a strip's columns
  stay in L1 across the blocks. ``strips+prefetch`` also prefetches the next output row's new input rows.
- ``fused``: the backward in one pass: the strip conv of dy by the flipped kernel (the input gradient) and, on the
  same strip, the 27 taps' weight-gradient sums (dy read once for both).
- ``packed``: each block's input rows copied into an aligned ring of zero-padded rows (no edge checks); tasks are
  (sample, plane, block), so every input row is packed three times.

Every variant is first checked against float64 ``conv3d`` (values and both gradients) on odd shapes, then all are
timed interleaved (every repeat runs each once, on the same tensors, with freed memory kept as psc-search keeps
it), best and median of ``--repeats`` in ms. Needs AVX-512 and a C++ compiler (built once into the torch
extensions folder).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from psc_nas import native  # noqa: E402
from psc_nas.memory import keep_freed_memory  # noqa: E402
from psc_nas.ops import depthwise  # noqa: E402

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <vector>
#include <type_traits>

namespace {
constexpr int WS = 8;  // output columns a strip keeps in registers

struct G { int64_t N, C, D, H, W; };

// Row pointers of the 3x3 neighbourhood (d + a - 1, h + b - 1) of row r, a zero row outside.
inline void neighbours(const float* t, int64_t r, const G& g, const float* zero, const float* rows[9]) {
  const int64_t h = r % g.H, d = (r / g.H) % g.D, n = r / (g.H * g.D);
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 3; ++b) {
      const int64_t id = d + a - 1, ih = h + b - 1;
      const bool inside = id >= 0 && id < g.D && ih >= 0 && ih < g.H;
      rows[a * 3 + b] = inside ? t + ((n * g.D + id) * g.H + ih) * g.W * g.C : zero;
    }
}

template <bool Masked>
struct Block {
  static constexpr bool Masked_ = Masked;
  __mmask16 m;
  __attribute__((always_inline)) inline __m512 ld(const float* p) const {
    if constexpr (Masked) return _mm512_maskz_loadu_ps(m, p); else return _mm512_loadu_ps(p);
  }
  __attribute__((always_inline)) inline void st(float* p, __m512 v) const {
    if constexpr (Masked) _mm512_mask_storeu_ps(p, m, v); else _mm512_storeu_ps(p, v);
  }
};

// out[w0 + i] = sum over (a, b, k) of taps[(a*3+b)*3+k] * rows[a*3+b][w0 + i + k - 1], i < count.
template <bool Masked, bool Edge>
__attribute__((always_inline)) inline void conv_strip(const Block<Masked>& B, const float* const* rows,
                                                      const float* taps, float* out, int64_t w0, int64_t count,
                                                      int64_t W, int64_t C) {
  __m512 acc[WS];
#pragma GCC unroll 8
  for (int i = 0; i < WS; ++i) acc[i] = _mm512_setzero_ps();
#pragma GCC unroll 1
  for (int ab = 0; ab < 9; ++ab) {
    const float* row = rows[ab];
    const __m512 w0v = B.ld(taps + (ab * 3 + 0) * C), w1v = B.ld(taps + (ab * 3 + 1) * C),
                 w2v = B.ld(taps + (ab * 3 + 2) * C);
    __m512 gv[WS + 2];
#pragma GCC unroll 10
    for (int j = 0; j < WS + 2; ++j) {
      const int64_t col = w0 - 1 + j;
      gv[j] = (Edge && (col < 0 || col >= W)) ? _mm512_setzero_ps() : B.ld(row + col * C);
    }
#pragma GCC unroll 8
    for (int i = 0; i < WS; ++i) {
      acc[i] = _mm512_fmadd_ps(w0v, gv[i], acc[i]);
      acc[i] = _mm512_fmadd_ps(w1v, gv[i + 1], acc[i]);
      acc[i] = _mm512_fmadd_ps(w2v, gv[i + 2], acc[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < WS; ++i)
    if (!Edge || i < count) B.st(out + (w0 + i) * C, acc[i]);
}

// partial[(a*3+b)*3+k] += sum over i < count of xrows[a*3+b][w0 + i + k - 1] * dy[w0 + i].
template <bool Masked, bool Edge>
__attribute__((always_inline)) inline void wgrad_strip(const Block<Masked>& B, const float* const* xrows,
                                                       const float* dyrow, float* partial, int64_t w0, int64_t count,
                                                       int64_t W, int64_t C) {
  __m512 dy[WS];
#pragma GCC unroll 8
  for (int i = 0; i < WS; ++i) dy[i] = (Edge && i >= count) ? _mm512_setzero_ps() : B.ld(dyrow + (w0 + i) * C);
#pragma GCC unroll 1
  for (int ab = 0; ab < 9; ++ab) {
    const float* row = xrows[ab];
    float* p = partial + ab * 3 * C;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
#pragma GCC unroll 10
    for (int j = 0; j < WS + 2; ++j) {
      const int64_t col = w0 - 1 + j;
      const __m512 xv = (Edge && (col < 0 || col >= W)) ? _mm512_setzero_ps() : B.ld(row + col * C);
      if (j < WS) a0 = _mm512_fmadd_ps(xv, dy[j], a0);
      if (j >= 1 && j - 1 < WS) a1 = _mm512_fmadd_ps(xv, dy[j - 1], a1);
      if (j >= 2) a2 = _mm512_fmadd_ps(xv, dy[j - 2], a2);
    }
    B.st(p, _mm512_add_ps(B.ld(p), a0));
    B.st(p + C, _mm512_add_ps(B.ld(p + C), a1));
    B.st(p + 2 * C, _mm512_add_ps(B.ld(p + 2 * C), a2));
  }
}

template <typename F>
void for_blocks(int64_t C, F f) {
  int64_t c0 = 0;
  for (; c0 + 16 <= C; c0 += 16) f(Block<false>{__mmask16(0xFFFF)}, c0);
  if (c0 < C) f(Block<true>{__mmask16((1u << (C - c0)) - 1u)}, c0);
}

template <typename F>
__attribute__((always_inline)) inline void for_strips(int64_t W, F f) {
  for (int64_t w0 = 0; w0 < W; w0 += WS) {
    const int64_t count = std::min<int64_t>(WS, W - w0);
    if (w0 >= 1 && w0 + WS < W) f(std::false_type{}, w0, count);
    else f(std::true_type{}, w0, count);
  }
}

G geom(const at::Tensor& t) { return G{t.size(0), t.size(1), t.size(2), t.size(3), t.size(4)}; }
at::Tensor cl(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast3d); }
}  // namespace

// Input and weight gradients in one pass: gx = conv of gy by the flipped taps, gw = sum of x (shifted) * gy.
std::vector<at::Tensor> fused_backward(at::Tensor x, at::Tensor gy, at::Tensor taps) {
  x = cl(x); gy = cl(gy);
  const G g = geom(x);
  auto flipped = taps.flip(0).contiguous();  // tap (a, b, k) -> (2-a, 2-b, 2-k) is index 26 - t
  auto gx = at::empty_like(gy, gy.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  const int64_t rows = g.N * g.D * g.H;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  auto partial = at::zeros({chunks, 27, g.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* xp = x.data_ptr<float>();
  const float* gp = gy.data_ptr<float>();
  const float* fp = flipped.data_ptr<float>();
  float* gxp = gx.data_ptr<float>(); float* pp = partial.data_ptr<float>();
  const std::vector<float> zero(g.W * g.C, 0.f);
  const int64_t per = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    const float* gnb[9]; const float* xnb[9];
    for (int64_t k = k0; k < k1; ++k) {
      float* part = pp + k * 27 * g.C;
      for (int64_t r = k * per; r < std::min(rows, (k + 1) * per); ++r) {
        neighbours(gp, r, g, zero.data(), gnb);
        neighbours(xp, r, g, zero.data(), xnb);
        float* out = gxp + r * g.W * g.C;
        const float* dyrow = gp + r * g.W * g.C;
        for_strips(g.W, [&](auto edge, int64_t w0, int64_t count) {
          constexpr bool E = decltype(edge)::value;
          for_blocks(g.C, [&](auto B, int64_t c0) {
            constexpr bool M = decltype(B)::Masked_;
            const float* g9[9]; const float* x9[9];
            for (int t = 0; t < 9; ++t) { g9[t] = gnb[t] + c0; x9[t] = xnb[t] + c0; }
            conv_strip<M, E>(B, g9, fp + c0, out + c0, w0, count, g.W, g.C);
          });
          for_blocks(g.C, [&](auto B, int64_t c0) {
            constexpr bool M = decltype(B)::Masked_;
            const float* x9[9];
            for (int t = 0; t < 9; ++t) x9[t] = xnb[t] + c0;
            wgrad_strip<M, E>(B, x9, dyrow + c0, part + c0, w0, count, g.W, g.C);
          });
        });
      }
    }
  });
  return {gx, partial.sum(0)};
}

namespace {
constexpr int64_t BLK = 16;
// A packed row: columns -1 .. W (index 0 .. W+1) of one 16-channel block, then WS zero columns of slack.
inline int64_t packed_len(int64_t W) { return (W + 2 + WS) * BLK; }

template <bool Masked>
inline void pack_row(const Block<Masked>& B, const float* src, float* dst, int64_t W, int64_t C) {
  // src: the row's first column at channel c0; dst: packed_len floats whose padding is already zero.
  for (int64_t w = 0; w < W; ++w) _mm512_storeu_ps(dst + (w + 1) * BLK, B.ld(src + w * C));
}

// out[i] (i < WS) = sum over ab of taps[ab*3+k] * rows[ab][(w0 + i + k) * 16]  (packed: no edge checks)
__attribute__((always_inline)) inline void conv_strip_packed(const float* const* rows, const float* taps, int64_t w0,
                                                             __m512* acc) {
#pragma GCC unroll 8
  for (int i = 0; i < WS; ++i) acc[i] = _mm512_setzero_ps();
#pragma GCC unroll 1
  for (int ab = 0; ab < 9; ++ab) {
    const float* row = rows[ab] + w0 * BLK;
    const __m512 w0v = _mm512_loadu_ps(taps + (ab * 3 + 0) * BLK), w1v = _mm512_loadu_ps(taps + (ab * 3 + 1) * BLK),
                 w2v = _mm512_loadu_ps(taps + (ab * 3 + 2) * BLK);
    __m512 gv[WS + 2];
#pragma GCC unroll 10
    for (int j = 0; j < WS + 2; ++j) gv[j] = _mm512_loadu_ps(row + j * BLK);
#pragma GCC unroll 8
    for (int i = 0; i < WS; ++i) {
      acc[i] = _mm512_fmadd_ps(w0v, gv[i], acc[i]);
      acc[i] = _mm512_fmadd_ps(w1v, gv[i + 1], acc[i]);
      acc[i] = _mm512_fmadd_ps(w2v, gv[i + 2], acc[i]);
    }
  }
}

// Per-thread state of a task (n, d, block): three planes' rings of three packed rows.
struct Ring {
  std::vector<float> store;  // 9 slots, 64-byte aligned
  float* base;
  int64_t len;
  explicit Ring(int64_t W) : store(9 * packed_len(W) + 16, 0.f), len(packed_len(W)) {
    base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t(63));
  }
  float* slot(int a, int64_t h) { return base + (a * 3 + ((h % 3) + 3) % 3) * len; }
  void clear() { std::fill(base, base + 9 * len, 0.f); }
};

// taps16: (27, C) taps regrouped per block as (blocks, 27, 16), zero past C.
at::Tensor blocked_taps(const at::Tensor& taps) {
  const int64_t C = taps.size(1), blocks = (C + 15) / 16;
  auto padded = at::zeros({27, blocks * 16}, taps.options());
  padded.narrow(1, 0, C).copy_(taps);
  return padded.view({27, blocks, 16}).permute({1, 0, 2}).contiguous();
}

template <typename Body>
void for_tasks(const G& g, Body body) {
  const int64_t blocks = (g.C + 15) / 16, tasks = g.N * g.D * blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Ring ring(g.W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % blocks, d = (t / blocks) % g.D, n = t / (blocks * g.D);
      const int64_t c0 = blk * 16;
      if (c0 + 16 <= g.C) body(Block<false>{__mmask16(0xFFFF)}, ring, n, d, blk, c0);
      else body(Block<true>{__mmask16((1u << (g.C - c0)) - 1u)}, ring, n, d, blk, c0);
    }
  });
}

// Packs rows h of the three planes around d (zero outside) into the ring.
template <bool Masked>
inline void pack_rows(const Block<Masked>& B, Ring& ring, const float* t, const G& g, int64_t n, int64_t d, int64_t h,
                      int64_t c0) {
  for (int a = 0; a < 3; ++a) {
    float* dst = ring.slot(a, h);
    const int64_t id = d + a - 1;
    if (h < 0 || h >= g.H || id < 0 || id >= g.D) { std::fill(dst, dst + ring.len, 0.f); continue; }
    pack_row(B, t + ((n * g.D + id) * g.H + h) * g.W * g.C + c0, dst, g.W, g.C);
  }
}
}  // namespace

at::Tensor packed_forward(at::Tensor x, at::Tensor taps) {
  x = cl(x);
  const G g = geom(x);
  auto tb = blocked_taps(taps);
  auto y = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  const float* xp = x.data_ptr<float>(); const float* tp = tb.data_ptr<float>(); float* yp = y.data_ptr<float>();
  for_tasks(g, [&](auto B, Ring& ring, int64_t n, int64_t d, int64_t blk, int64_t c0) {
    ring.clear();
    pack_rows(B, ring, xp, g, n, d, -1, c0);
    pack_rows(B, ring, xp, g, n, d, 0, c0);
    const float* taps16 = tp + blk * 27 * 16;
    for (int64_t h = 0; h < g.H; ++h) {
      pack_rows(B, ring, xp, g, n, d, h + 1, c0);
      const float* rows[9];
      for (int a = 0; a < 3; ++a) for (int b = 0; b < 3; ++b) rows[a * 3 + b] = ring.slot(a, h + b - 1);
      float* out = yp + ((n * g.D + d) * g.H + h) * g.W * g.C + c0;
      for (int64_t w0 = 0; w0 < g.W; w0 += WS) {
        __m512 acc[WS];
        conv_strip_packed(rows, taps16, w0, acc);
        const int64_t count = std::min<int64_t>(WS, g.W - w0);
#pragma GCC unroll 8
        for (int i = 0; i < WS; ++i) if (i < count) B.st(out + (w0 + i) * g.C, acc[i]);
      }
    }
  });
  return y;
}

std::vector<at::Tensor> packed_backward(at::Tensor x, at::Tensor gy, at::Tensor taps) {
  x = cl(x); gy = cl(gy);
  const G g = geom(x);
  auto tb = blocked_taps(taps.flip(0).contiguous());
  auto gx = at::empty_like(gy, gy.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  const int64_t blocks = (g.C + 15) / 16, threads = at::get_num_threads();
  auto partial = at::zeros({threads, blocks, 27, 16}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* xp = x.data_ptr<float>(); const float* gp = gy.data_ptr<float>(); const float* tp = tb.data_ptr<float>();
  float* gxp = gx.data_ptr<float>(); float* pp = partial.data_ptr<float>();
  const int64_t blocks_ = blocks;
  at::parallel_for(0, g.N * g.D * blocks, 1, [&](int64_t begin, int64_t end) {
    Ring gring(g.W), xring(g.W);
    float* part_thread = pp + at::get_thread_num() * blocks_ * 27 * 16;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % blocks_, d = (t / blocks_) % g.D, n = t / (blocks_ * g.D);
      const int64_t c0 = blk * 16;
      auto body = [&](auto B) {
        gring.clear();
        xring.clear();
        pack_rows(B, gring, gp, g, n, d, -1, c0); pack_rows(B, gring, gp, g, n, d, 0, c0);
        pack_rows(B, xring, xp, g, n, d, -1, c0); pack_rows(B, xring, xp, g, n, d, 0, c0);
        const float* taps16 = tp + blk * 27 * 16;
        float* part = part_thread + blk * 27 * 16;
        for (int64_t h = 0; h < g.H; ++h) {
          pack_rows(B, gring, gp, g, n, d, h + 1, c0);
          pack_rows(B, xring, xp, g, n, d, h + 1, c0);
          const float* grows[9]; const float* xrows[9];
          for (int a = 0; a < 3; ++a)
            for (int b = 0; b < 3; ++b) {
              grows[a * 3 + b] = gring.slot(a, h + b - 1);
              xrows[a * 3 + b] = xring.slot(a, h + b - 1);
            }
          const float* dyrow = gring.slot(1, h) + BLK;  // column 0 of the packed dy row
          float* out = gxp + ((n * g.D + d) * g.H + h) * g.W * g.C + c0;
          for (int64_t w0 = 0; w0 < g.W; w0 += WS) {
            const int64_t count = std::min<int64_t>(WS, g.W - w0);
            __m512 acc[WS];
            conv_strip_packed(grows, taps16, w0, acc);
#pragma GCC unroll 8
            for (int i = 0; i < WS; ++i) if (i < count) B.st(out + (w0 + i) * g.C, acc[i]);
            // weight gradient: packed dy past W is zero (slack), so the strip needs no count
            __m512 dy[WS];
#pragma GCC unroll 8
            for (int i = 0; i < WS; ++i) dy[i] = _mm512_loadu_ps(dyrow + (w0 + i) * BLK);
#pragma GCC unroll 1
            for (int ab = 0; ab < 9; ++ab) {
              const float* row = xrows[ab] + w0 * BLK;
              float* p = part + ab * 3 * BLK;
              __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
#pragma GCC unroll 10
              for (int j = 0; j < WS + 2; ++j) {
                const __m512 xv = _mm512_loadu_ps(row + j * BLK);
                if (j < WS) a0 = _mm512_fmadd_ps(xv, dy[j], a0);
                if (j >= 1 && j - 1 < WS) a1 = _mm512_fmadd_ps(xv, dy[j - 1], a1);
                if (j >= 2) a2 = _mm512_fmadd_ps(xv, dy[j - 2], a2);
              }
              _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), a0));
              _mm512_storeu_ps(p + BLK, _mm512_add_ps(_mm512_loadu_ps(p + BLK), a1));
              _mm512_storeu_ps(p + 2 * BLK, _mm512_add_ps(_mm512_loadu_ps(p + 2 * BLK), a2));
            }
          }
        }
      };
      if (c0 + 16 <= g.C) body(Block<false>{__mmask16(0xFFFF)});
      else body(Block<true>{__mmask16((1u << (g.C - c0)) - 1u)});
    }
  });
  auto gw = partial.sum(0).permute({1, 0, 2}).reshape({27, blocks * 16}).narrow(1, 0, g.C).contiguous();
  return {gx, gw};
}

// taps: (27, C) float32. y = conv of x (stride 1, padding 1); with dist > 0 the input rows of output row r + dist
// are prefetched while row r computes.
at::Tensor strip_forward_pf(at::Tensor x, at::Tensor taps, int64_t dist) {
  x = cl(x);
  const G g = geom(x);
  auto y = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  const float* xp = x.data_ptr<float>(); const float* tp = taps.data_ptr<float>(); float* yp = y.data_ptr<float>();
  const std::vector<float> zero(g.W * g.C, 0.f);
  const int64_t rows = g.N * g.D * g.H;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    const float* nb[9]; const float* ahead[9];
    for (int64_t r = begin; r < end; ++r) {
      neighbours(xp, r, g, zero.data(), nb);
      const bool pf = dist > 0 && r + dist < end;
      if (pf) neighbours(xp, r + dist, g, zero.data(), ahead);
      float* out = yp + r * g.W * g.C;
      for_strips(g.W, [&](auto edge, int64_t w0, int64_t count) {
        if (pf) {
          for (int a = 0; a < 3; ++a) {
            const char* p = reinterpret_cast<const char*>(ahead[a * 3 + 2] + w0 * g.C);
            const int64_t bytes = count * g.C * 4;
            for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
          }
        }
        for_blocks(g.C, [&](auto B, int64_t c0) {
          const float* rows9[9];
          for (int t = 0; t < 9; ++t) rows9[t] = nb[t] + c0;
          conv_strip<decltype(B)::Masked_, decltype(edge)::value>(B, rows9, tp + c0, out + c0, w0, count, g.W, g.C);
        });
      });
    }
  });
  return y;
}

at::Tensor strip_forward(at::Tensor x, at::Tensor taps) { return strip_forward_pf(x, taps, 0); }
"""
FUNCTIONS = ["strip_forward", "strip_forward_pf", "fused_backward", "packed_forward", "packed_backward"]
CHECK_SHAPES = [
    (1, 5, 5, 7, 9),
    (3, 16, 7, 5, 6),
    (2, 28, 6, 5, 7),
    (2, 33, 4, 3, 17),
    (1, 16, 3, 3, 1),
    (1, 64, 4, 4, 8),
]


def build():
    return cpp_extension.load_inline(
        name="psc_nas_depthwise_variants_v2",
        cpp_sources=SOURCE,
        functions=FUNCTIONS,
        extra_cflags=native.build_flags(),
        extra_ldflags=["-fopenmp"],
    )


def check(module) -> None:
    """Every variant against float64 conv3d: output, input gradient, weight gradient."""
    generator = torch.Generator().manual_seed(0)
    for shape in CHECK_SHAPES:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        weight = torch.randn(shape[1], 1, 3, 3, 3, generator=generator, dtype=torch.float64)
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = F.conv3d(xr, wr, None, 1, 1, 1, shape[1])
        dy = torch.randn(y.shape, generator=generator, dtype=torch.float64)
        y.backward(dy)
        taps = depthwise.taps_weight(weight).float()
        x32, dy32 = x.float(), dy.float()
        got = {
            "strips": (module.strip_forward(x32, taps), None, None),
            "strips+prefetch": (module.strip_forward_pf(x32, taps, 1), None, None),
            "fused": (None, *module.fused_backward(x32, dy32, taps)),
            "packed": (module.packed_forward(x32, taps), *module.packed_backward(x32, dy32, taps)),
        }
        for name, (out, grad_x, grad_taps) in got.items():
            pairs = [(out, y), (grad_x, xr.grad)]
            if grad_taps is not None:
                pairs.append((grad_taps.t().reshape(weight.shape), wr.grad))
            for value, want in pairs:
                if value is not None:
                    torch.testing.assert_close(value.double(), want, rtol=1e-4, atol=1e-4, msg=f"{name} on {shape}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["16x32", "28x32", "32x32", "64x32", "16x64", "32x64", "64x64"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="-", help="markdown path, or - for stdout")
    args = parser.parse_args()
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        sys.exit("depthwise_variants: these prototypes need AVX-512, which this CPU lacks")
    if not depthwise.KERNEL.available():
        sys.exit(
            f"depthwise_variants: psc-nas's depthwise kernel is unavailable: {depthwise.KERNEL.unavailable_reason()}"
        )
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    module = build()
    check(module)
    lines = [
        "# Depthwise 3x3x3: psc-nas's prototypes against oneDNN (see ops.md, sixth session)",
        "",
        f"`python benchmarks/depthwise_variants.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {args.threads} threads, "
        f"batch {args.batch}, best (median) of {args.repeats} interleaved repeats, ms; every variant checked against "
        "float64 conv3d first.",
        "",
        "| C, size | load | forward: oneDNN | strips | strips+prefetch | packed "
        "| backward: oneDNN + kernel (what runs) | fused | packed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in args.shapes:
        channels, size = (int(v) for v in shape.split("x"))
        x = torch.randn(args.batch, channels, size, size, size).contiguous(memory_format=torch.channels_last_3d)
        dy = torch.randn_like(x)
        weight = torch.randn(channels, 1, 3, 3, 3)
        taps = depthwise.taps_weight(weight)
        variants = {
            "onednn": lambda: F.conv3d(x, weight, None, 1, 1, 1, channels),
            "strips": lambda: module.strip_forward(x, taps),
            "strips+prefetch": lambda: module.strip_forward_pf(x, taps, 1),
            "packed": lambda: module.packed_forward(x, taps),
            "now": lambda: (
                depthwise.input_grad(dy, weight, x.shape, [1, 1, 1]),
                depthwise.weight_grad(x, dy, weight.shape, [1, 1, 1]),
            ),
            "fused": lambda: module.fused_backward(x, dy, taps),
            "packed backward": lambda: module.packed_backward(x, dy, taps),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for run in variants.values():
            run()
        for _ in range(args.repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1e3)
        cells = [f"{min(t):.2f} ({statistics.median(t):.2f})" for t in times.values()]
        load = os.getloadavg()[0]
        lines.append(f"| {channels}, {size}³ | {load:.1f} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text, end="")
    else:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""A 3x3x3-support conv whose output channels each use their own subset of the 27 taps, in exactly those MACs.

CAKES gives every output channel a sub-kernel of the 3x3x3 cube (1x1x3 ... 3x3x3). oneDNN runs a conv fast only as
one dense kernel, so the merged paths (``masked``, ``planes`` in cakes.py) execute up to 3x the MACs CAKES costs, and
seven thin convs (4 output channels each in a DenseNet3D slot) run far below the machine's peak. This kernel executes
the analytic MACs and nothing more, vectorised over positions instead of channels:

- the input is packed once into zero-padded, channel-major volumes: (N, C, (D+2)·(H+2)·(W+2) + slack), so every tap
  is a fixed offset ``(a-1)·plane + (b-1)·row + (c-1)`` along one flat axis;
- an output *chunk* is up to 9 output channels that use the same taps (a group split as evenly as possible); for
  each block of 64 consecutive padded positions of one D plane (48 for a chunk of 7-9) it keeps K × 4 (K × 3)
  vector accumulators in registers and adds, for every input channel and every tap the chunk uses, 4 (3) vector
  loads (shifted) times the broadcast weights; positions in the padding columns are computed and dropped (1.06x in a
  plane at 32³); results are stored straight into the channels_last_3d output. Where each input channel feeds at
  most two chunks (a thin grouped conv), a thread walks its D planes band by band of a plane's positions, so that
  the three planes its taps reach stay in L2;
- the input gradient is the same kernel on the packed output gradient with the roles swapped (chunks of input
  channels, each output channel a source with its taps mirrored);
- the weight gradient: per run of 1,024 positions, chunk (of up to 7 channels), input channel and tile of 3-6 of
  its taps, tile × chunk vector accumulators over the run's positions, added into a per-thread copy of the packed
  weights' vectors (one 16-lane vector per weight, summed over lanes at the end).

Stride 1, 'same' padding, float32, CPU. A ``TapPlan`` (cached per allocation, input channels and spatial size) holds
the chunks, sources, tap offsets and the index maps between a (C_out, C_in, 3, 3, 3) weight and its packed form. The
kernel is a ``psc_nas.native.Extension``: built once per machine; where it cannot build, callers keep their
oneDNN paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from math import prod
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

from psc_nas import native
from psc_nas.device import CPU_LAYOUT

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
// A scalar in every lane, broadcast straight from memory (a load-port instruction). ``v16{} + s`` compiled to a scalar
// add of +0.0 (kept: it is not an identity for -0.0) and a register broadcast, two more uops on the FMA ports a tap.
inline v16 splat(const float* s) {
  const float v = *s;
  return v16{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
}
#if defined(__clang__)
#define PSC_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int v16i __attribute__((vector_size(64)));
#define PSC_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v16i{__VA_ARGS__})
#endif
// r[i][l] -> r[l][i] for 16 vectors of 16 lanes, in four stages: the stage of distance d exchanges, between r[i]
// and r[i + d] (i without bit d), the lanes of r[i] with bit d and the lanes of r[i + d] without it.
#define PSC_STAGE(d, LO, HI)                   \
  for (int i = 0; i < 16; ++i) {               \
    if (i & d) continue;                       \
    const v16 a = r[i], b = r[i + d];          \
    r[i] = PSC_SHUFFLE(a, b, LO);              \
    r[i + d] = PSC_SHUFFLE(a, b, HI);          \
  }
#define PSC_LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define PSC_HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define PSC_LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define PSC_HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define PSC_LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define PSC_HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define PSC_LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define PSC_HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
inline void transpose16(v16* r) {
  PSC_STAGE(8, PSC_LO8, PSC_HI8)
  PSC_STAGE(4, PSC_LO4, PSC_HI4)
  PSC_STAGE(2, PSC_LO2, PSC_HI2)
  PSC_STAGE(1, PSC_LO1, PSC_HI1)
}

constexpr int64_t kLanes = 16;
constexpr int64_t kVectors = 4;                  // position vectors per output block
constexpr int64_t kBlock = kLanes * kVectors;    // positions per output block
constexpr int64_t kNarrow = 6;                   // a chunk of up to 6 channels keeps kVectors position vectors
constexpr int64_t kWidest = 9;                   // the most channels in a chunk (3 position vectors)
constexpr int64_t kBandBytes = 1 << 20;          // a band's three planes of every input channel: at most 1 MB
constexpr int64_t kRun = 1024;  // positions per weight-gradient task
// taps per weight-gradient tile: tile x K accumulators, K dy vectors and one x vector fit 32 registers (7 x 3 + 7 + 1
// for a chunk of 7: a thin csn_ir group's 7 channels in one chunk, 10 loads for 21 multiply-adds where 4 + 3 took 19
// for 42 of 4 x 6 and 3 x 6; 1.06-1.22x its weight gradient, Xeon)
constexpr int64_t tap_tile(int64_t k) { return k <= 4 ? 6 : (k <= 6 ? 4 : 3); }

// The padded grid of one channel: row = W + 2, plane = (H + 2) * row; the interior of D plane d (1..D) is the run of
// ``len`` positions from d * plane + row + 1 ((h, w) = (1, 1)) to (H, W); ``volume`` is a channel's stride.
struct Grid {
  int64_t N, D, H, W, row, plane, len, volume;
  Grid(int64_t n, int64_t d, int64_t h, int64_t w, int64_t volume_)
      : N(n), D(d), H(h), W(w), row(w + 2), plane((h + 2) * (w + 2)), len((h - 1) * (w + 2) + w), volume(volume_) {}
  int64_t start(int64_t d) const { return d * plane + row + 1; }
};

// Chunks: (first output channel, K, first source, end source); sources: (channel, first tap, end tap, weight offset).
struct Plan {
  const int64_t* chunks;
  const int64_t* sources;
  const int64_t* offsets;
};

// y[c0 + k] at positions [p, p + V * 16) of one plane = sum over sources and their taps; stored into channels_last.
template <int K, int V = kVectors>
void block(const float* in, const float* w, const Plan& plan, const int64_t* chunk, const Grid& g, int64_t n,
           int64_t d, int64_t i0, float* y, int64_t out_channels) {
  constexpr int64_t positions = kLanes * V;
  v16 acc[K][V];
  for (int k = 0; k < K; ++k)
    for (int v = 0; v < V; ++v) acc[k][v] = v16{};
  const int64_t p = g.start(d) + i0;
  for (int64_t s = chunk[2]; s < chunk[3]; ++s) {
    const int64_t* src = plan.sources + 4 * s;
    const float* x = in + src[0] * g.volume + p;
    const float* ws = w + src[3];
    for (int64_t t = src[1]; t < src[2]; ++t, ws += K) {
      const float* xt = x + plan.offsets[t];
      v16 xv[V];
      for (int v = 0; v < V; ++v) xv[v] = load(xt + kLanes * v);
      for (int k = 0; k < K; ++k) {
        const v16 wk = splat(ws + k);
        for (int v = 0; v < V; ++v) acc[k][v] += xv[v] * wk;
      }
    }
  }
  alignas(64) float out[K][positions];
  for (int k = 0; k < K; ++k)
    for (int v = 0; v < V; ++v) store(&out[k][kLanes * v], acc[k][v]);
  const int64_t stop = std::min(positions, g.len - i0);
  float* base = y + (n * g.D + d - 1) * g.H * g.W * out_channels + chunk[0];
  // The position's row and column, stepped: a division per position made the forward 1.29x slower at 16 channels,
  // 32³ (tapconv_ab, Xeon), where a block's chunk has only 2-3 channels' multiply-adds to hide it.
  int64_t h = i0 / g.row, c = i0 - h * g.row;
  for (int64_t j = 0; j < stop; ++j) {
    if (c < g.W) {  // not a padding column
      float* o = base + (h * g.W + c) * out_channels;
      for (int k = 0; k < K; ++k) o[k] = out[k][j];
    }
    if (++c == g.row) c = 0, ++h;
  }
}

// block<K, V> over the positions [i0, i1) of a step: chunks of up to 6 channels keep 4 position vectors (K x 4
// accumulators), of 7-9 channels 3 (K x 3, up to 27 of the 32 vector registers), so a wide chunk's x vectors serve 7-9
// weights each: per 16 positions and tap, 1 + K / 4 ... 1 + K / 3 loads for K multiply-adds, where the same channels in
// two chunks of 3-5 load every x vector twice (a group of 7 as 4 + 3: 0.82 loads a multiply-add, as one chunk 0.62).
template <int K>
void blocks(const float* in, const float* w, const Plan& plan, const int64_t* chunk, const Grid& g, int64_t n,
            int64_t d, int64_t i0, int64_t i1, float* y, int64_t out_channels) {
  constexpr int V = K > kNarrow ? 3 : kVectors;
  for (int64_t i = i0; i < i1; i += kLanes * V) block<K, V>(in, w, plan, chunk, g, n, d, i, y, out_channels);
}

}  // namespace

// Zero-padded channel-major volumes (N, C, volume) of a (N, C, D, H, W) tensor whose channels are contiguous (a
// channels_last_3d tensor, or a channel slice of one, such as a DenseNet's share of a concatenation's gradient), or
// of a single channel, whatever its stride (PyTorch leaves (N, 1, D, H, W) its NCDHW strides in either layout).
torch::Tensor pack(torch::Tensor x, int64_t volume) {
  TORCH_CHECK(x.dim() == 5 && x.scalar_type() == at::kFloat && (x.size(1) == 1 || x.stride(1) == 1),
              "pack: a float32 5-D tensor with contiguous channels");
  const int64_t N = x.size(0), C = x.size(1), D = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t sN = x.stride(0), sD = x.stride(2), sH = x.stride(3), sW = x.stride(4);  // sW: the positions' pitch
  const Grid g(N, D, H, W, volume);
  TORCH_CHECK(volume >= (D + 2) * g.plane, "pack: volume too small");
  auto out = at::empty({N, C, volume}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, N * (D + 2), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (D + 2), dd = task % (D + 2);
      for (int64_t c = 0; c < C; ++c) {
        float* o = dst + (n * C + c) * volume + dd * g.plane;
        if (dd == 0 || dd == D + 1) {
          std::memset(o, 0, sizeof(float) * (dd == 0 ? g.plane : volume - (D + 1) * g.plane));
          continue;
        }
        std::memset(o, 0, sizeof(float) * (g.row + 1));
        for (int64_t h = 1; h < H; ++h) o[h * g.row + W + 1] = o[h * g.row + W + 2] = 0.f;
        std::memset(o + H * g.row + W + 1, 0, sizeof(float) * (g.row + 1));
      }
      if (dd == 0 || dd == D + 1) continue;
      // 16 channels at a time over the whole plane (its input, H·W·C floats, stays in L2), so only 16 output streams
      // are open at once: 16 positions' vectors of 16 channels are transposed in registers into 16 channel rows'
      // vectors (2.9x at C = 16, 1.1-1.5x at C = 28-64: a vector's lanes were 16 scalar stores), the last W % 16
      // positions a vector at a time
      const float* plane = src + n * sN + (dd - 1) * sD;
      float* o = dst + n * C * volume + dd * g.plane + g.row + 1;
      for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
        const int64_t lanes = std::min(kLanes, C - c0);
        for (int64_t h = 0; h < H; ++h) {
          const float* row = plane + h * sH + c0;
          float* oc = o + c0 * volume + h * g.row;
          if (lanes == kLanes) {
            int64_t w = 0;
            for (; w + kLanes <= W; w += kLanes) {  // 16 positions x 16 channels, transposed in registers
              v16 r[kLanes];
              for (int64_t i = 0; i < kLanes; ++i) r[i] = load(row + (w + i) * sW);
              transpose16(r);
              for (int64_t j = 0; j < kLanes; ++j) store(oc + j * volume + w, r[j]);
            }
            for (; w < W; ++w) {
              const v16 v = load(row + w * sW);
              for (int64_t j = 0; j < kLanes; ++j) oc[j * volume + w] = v[j];
            }
          } else {
            for (int64_t w = 0; w < W; ++w)
              for (int64_t j = 0; j < lanes; ++j) oc[j * volume + w] = row[w * sW + j];
          }
        }
      }
    }
  });
  return out;
}

// y (channels_last_3d, out_channels) = the chunks' sums over packed ``in`` (N, S, volume).
void conv(torch::Tensor in, torch::Tensor weights, torch::Tensor chunks, torch::Tensor sources, torch::Tensor offsets,
          torch::Tensor y) {
  const int64_t N = y.size(0), Co = y.size(1), D = y.size(2), H = y.size(3), W = y.size(4);
  TORCH_CHECK(y.is_contiguous(at::MemoryFormat::ChannelsLast3d) && in.is_contiguous() && in.size(0) == N,
              "conv: packed input and a channels_last_3d output");
  const Grid g(N, D, H, W, in.size(2));
  const Plan plan{chunks.data_ptr<int64_t>(), sources.data_ptr<int64_t>(), offsets.data_ptr<int64_t>()};
  const int64_t nchunks = chunks.size(0), S = in.size(1);
  const float* ip = in.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  bool wide = false;
  for (int64_t c = 0; c < nchunks; ++c) {
    TORCH_CHECK(plan.chunks[4 * c + 1] >= 1 && plan.chunks[4 * c + 1] <= kWidest, "conv: chunks of 1 to 9 channels");
    wide = wide || plan.chunks[4 * c + 1] > kNarrow;
  }
  // A step is the positions every chunk runs before the next step: one block, or 192 positions (3 blocks of 64,
  // 4 of 48) where a chunk of 7-9 channels runs blocks of 48.
  const int64_t step = wide ? 3 * kBlock : kBlock;
  // One task per D plane, as many as a thread's share of the N x D planes (ATen gives each thread one range), walked
  // band by band of a plane's positions where every input channel is read by at most two chunks of a block (a thin
  // grouped conv: csn_ir's): each read of its rows then comes from L2 or memory, and a band's three planes of every
  // input channel (the taps' reach) stay in L2 as the walk moves a plane on, where whole planes had them come from
  // memory again once 3 planes x C_in outgrew L2 (124 channels at 32³: 1.7 MB; one chunk of a group's 7 channels ran
  // 0.9x as fast as 4 + 3 there with whole planes, 1.0-1.2x with bands, Xeon). Where several chunks share a block's
  // input rows they read them from L1 after the first, and whole planes were faster (CAKES 64 -> 64 at 64³: bands
  // 0.9x).
  const bool banded = sources.size(0) <= 2 * S;
  const int64_t band = banded ? std::max(step, kBandBytes / (3 * S * int64_t(sizeof(float))) / step * step) : g.len;
  at::parallel_for(0, N * D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b0 = 0; b0 < g.len; b0 += band) {
      const int64_t b1 = std::min(g.len, b0 + band);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t d = task % D + 1, n = task / D;
        const float* x = ip + n * S * g.volume;
        for (int64_t i0 = b0; i0 < b1; i0 += step) {
          const int64_t i1 = std::min(i0 + step, b1);
          for (int64_t c = 0; c < nchunks; ++c) {
            const int64_t* chunk = plan.chunks + 4 * c;
            switch (chunk[1]) {
              case 1: blocks<1>(x, wp, plan, chunk, g, n, d, i0, i1, yp, Co); break;
              case 2: blocks<2>(x, wp, plan, chunk, g, n, d, i0, i1, yp, Co); break;
              case 3: blocks<3>(x, wp, plan, chunk, g, n, d, i0, i1, yp, Co); break;
              case 4: blocks<4>(x, wp, plan, chunk, g, n, d, i0, i1, yp, Co); break;
              case 5: blocks<5>(x, wp, plan, chunk, g, n, d, i0, i1, yp, Co); break;
              case 6: blocks<6>(x, wp, plan, chunk, g, n, d, i0, i1, yp, Co); break;
              case 7: blocks<7>(x, wp, plan, chunk, g, n, d, i0, i1, yp, Co); break;
              case 8: blocks<8>(x, wp, plan, chunk, g, n, d, i0, i1, yp, Co); break;
              default: blocks<9>(x, wp, plan, chunk, g, n, d, i0, i1, yp, Co); break;
            }
          }
        }
      }
    }
  });
}

namespace {

// grad[t * K + k] += sum over the run's positions of dy[c0 + k] * x[source][p + offset of tap t0 + t], T taps. The
// taps' pointers are set before the loop and the last, partial vector is peeled off it, so the loop body is T + K
// vector loads and T * K multiply-adds: with the tap count a run-time bound and the partial vector's lanes zeroed in
// place, GCC kept dy's vectors on the stack and reloaded each tap's offset, ~2 loads per multiply-add.
template <int K, int T>
void weight_tile(const float* x, const float* dy, const int64_t* offsets, int64_t t0, const Grid& g, int64_t p0,
                 int64_t len, float* grad) {
  v16 acc[T][K];
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < K; ++k) acc[t][k] = v16{};
  const float* xt[T];
  for (int t = 0; t < T; ++t) xt[t] = x + p0 + offsets[t0 + t];
  const float* dk[K];
  for (int k = 0; k < K; ++k) dk[k] = dy + k * g.volume + p0;
  const int64_t full = len / kLanes * kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    v16 dv[K];
    for (int k = 0; k < K; ++k) dv[k] = load(dk[k] + i);
    for (int t = 0; t < T; ++t) {
      const v16 xv = load(xt[t] + i);
      for (int k = 0; k < K; ++k) acc[t][k] += dv[k] * xv;
    }
  }
  if (full < len) {  // the last, partial vector: lanes past the run count nothing
    alignas(64) float tail[K][kLanes] = {};
    for (int k = 0; k < K; ++k)
      for (int64_t l = 0; l < len - full; ++l) tail[k][l] = dk[k][full + l];
    for (int t = 0; t < T; ++t) {
      const v16 xv = load(xt[t] + full);
      for (int k = 0; k < K; ++k) acc[t][k] += load(tail[k]) * xv;
    }
  }
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < K; ++k) {
      float* gv = grad + (t * K + k) * kLanes;
      store(gv, load(gv) + acc[t][k]);
    }
}

// weight_tile<K, T> for the T = t1 - t0 taps of a tile (at most tap_tile(K)).
template <int K, int T = tap_tile(K)>
void weight_tiles(const float* x, const float* dy, const int64_t* offsets, int64_t t0, int64_t t1, const Grid& g,
                  int64_t p0, int64_t len, float* grad) {
  if constexpr (T > 0) {
    if (t1 - t0 == T) return weight_tile<K, T>(x, dy, offsets, t0, g, p0, len, grad);
    weight_tiles<K, T - 1>(x, dy, offsets, t0, t1, g, p0, len, grad);
  }
}

}  // namespace

// The packed weights' gradient: sum over every plane of the chunks' products of packed dy and packed x.
torch::Tensor weight_grad(torch::Tensor x, torch::Tensor dy, torch::Tensor chunks, torch::Tensor sources,
                          torch::Tensor offsets, int64_t size, int64_t D, int64_t H, int64_t W) {
  TORCH_CHECK(x.is_contiguous() && dy.is_contiguous() && x.size(2) == dy.size(2), "weight_grad: packed x and dy");
  const int64_t N = x.size(0), S = x.size(1), Co = dy.size(1), nchunks = chunks.size(0);
  const Grid g(N, D, H, W, x.size(2));
  const int64_t* ch = chunks.data_ptr<int64_t>();
  const int64_t* src = sources.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t threads = at::get_num_threads();
  // Per-thread vector partials, zeroed by their own thread where it first runs (in parallel, no pass of its own) and
  // summed here over threads and lanes: torch's zero fill and sum over (threads, lanes) of them had taken 3% of a
  // CAKES DenseNet3D step (2026-12-06, Xeon: its last blocks' layers have up to 144,144 weights, 18 MB of partials).
  auto partial = at::empty({threads, size, kLanes}, x.options());
  std::vector<char> used(threads, 0);
  const float* xp = x.data_ptr<float>();
  const float* dp = dy.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  // A task is a run of up to kRun consecutive positions of one sample's padded volume, between the first D plane's
  // first interior position and the last one's last: the padding rows and columns it crosses are zero in dy, so they
  // add nothing. Runs of 1,024 positions keep a chunk's dy (16 KB at 4 channels) and the source's rows around it in
  // L1 while the source's tiles pass over them; the tiles add their accumulators into per-thread vector partials,
  // summed over lanes once at the end, so a short run costs no horizontal sums (2026-12-05 night, Xeon: 1.03-1.15x
  // the previous runs of up to 16,384 positions, whole D planes with 16-lane sums per tile; docs/benchmarks/ops.md).
  // Runs are cut at multiples of 16 positions (the first one shorter), so that dy's vectors are aligned to a cache
  // line (a packed channel's start is, and its volume a multiple of 16): an unaligned vector load touches two lines
  // (Xeon: 1.05-1.16x the weight gradient of runs from the first interior position).
  const int64_t lead = g.start(1) % kLanes;  // the first run starts this many positions after a line
  const int64_t span = (D - 1) * g.plane + g.len + lead, runs = (span + kRun - 1) / kRun;
  at::parallel_for(0, N * runs, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    float* grad = pp + thread * size * kLanes;
    if (!used[thread]) {
      std::fill(grad, grad + size * kLanes, 0.0f);
      used[thread] = 1;
    }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / runs, q = task % runs * kRun;
      const int64_t skip = q == 0 ? lead : 0;  // the first run begins at the first interior position
      const int64_t p0 = g.start(1) - lead + q + skip, len = std::min(kRun, span - q) - skip;
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t* chunk = ch + 4 * c;
        const float* dyc = dp + (n * Co + chunk[0]) * g.volume;
        for (int64_t s = chunk[2]; s < chunk[3]; ++s) {
          const int64_t* sv = src + 4 * s;
          const float* xs = xp + (n * S + sv[0]) * g.volume;
          const int64_t tile = tap_tile(chunk[1]);
          for (int64_t t0 = sv[1]; t0 < sv[2]; t0 += tile) {
            const int64_t t1 = std::min(t0 + tile, sv[2]);
            float* gt = grad + (sv[3] + (t0 - sv[1]) * chunk[1]) * kLanes;
            switch (chunk[1]) {
              case 1: weight_tiles<1>(xs, dyc, off, t0, t1, g, p0, len, gt); break;
              case 2: weight_tiles<2>(xs, dyc, off, t0, t1, g, p0, len, gt); break;
              case 3: weight_tiles<3>(xs, dyc, off, t0, t1, g, p0, len, gt); break;
              case 4: weight_tiles<4>(xs, dyc, off, t0, t1, g, p0, len, gt); break;
              case 5: weight_tiles<5>(xs, dyc, off, t0, t1, g, p0, len, gt); break;
              case 6: weight_tiles<6>(xs, dyc, off, t0, t1, g, p0, len, gt); break;
              case 7: weight_tiles<7>(xs, dyc, off, t0, t1, g, p0, len, gt); break;
              default: TORCH_CHECK(false, "weight_grad: chunks of 1 to 7 channels");
            }
          }
        }
      }
    }
  });
  // Sixteen weights at a time: their vectors summed over the threads that ran, transposed so that lane l of r[i] is
  // weight l's lane i, and the sixteen added in lane order.
  auto out = at::empty({size}, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (size + kLanes - 1) / kLanes, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t w0 = b * kLanes, count = std::min(kLanes, size - w0);
      v16 r[kLanes] = {};
      for (int64_t t = 0; t < threads; ++t) {
        if (!used[t]) continue;
        const float* pt = pp + (t * size + w0) * kLanes;
        for (int64_t i = 0; i < count; ++i) r[i] += load(pt + i * kLanes);
      }
      transpose16(r);
      v16 sum = r[0];
      for (int64_t i = 1; i < kLanes; ++i) sum += r[i];
      if (count == kLanes) {
        store(op + w0, sum);
      } else {
        for (int64_t i = 0; i < count; ++i) op[w0 + i] = sum[i];
      }
    }
  });
  return out;
}
"""

KERNEL = native.Extension("tapconv", 17, SOURCE, ["pack", "conv", "weight_grad"], "the C++ CAKES tap-conv kernel")
CUBE = (1 << 27) - 1  # every tap of the 3x3x3 cube
WIDEST = 9  # the most channels in a chunk of the forward and input-gradient convs (9 x 3 position vectors)
WEIGHT_WIDEST = 7  # the most in a chunk of the weight gradient (its tiles: 7 channels x 3 taps at most)
LANES_BLOCK = 64  # positions per output block: the slack a packed volume needs past its last plane


@dataclass(frozen=True)
class TapPlan:
    """How one conv's channels and taps map onto the kernel, for one input size.

    ``forward``/``backward``/``weight``: (chunks, sources, offsets) of y from x, of dx from dy and of the weight
    gradient from x and dy (chunked as y, in narrower chunks); ``*_index``: for each packed weight, its position in
    the flat (C_out, C_in, 27) weight."""

    volume: int
    forward: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    forward_index: torch.Tensor
    backward: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    backward_index: torch.Tensor
    weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    weight_index: torch.Tensor


def tap_offsets(taps: Sequence[int], spatial: Sequence[int], sign: int = 1) -> list[int]:
    """Flat offsets in the padded grid of the cube's taps (index ``a·9 + b·3 + c``)."""
    _, height, width = spatial
    row, plane = width + 2, (height + 2) * (width + 2)
    return [sign * ((t // 9 - 1) * plane + (t // 3 % 3 - 1) * row + (t % 3 - 1)) for t in taps]


def packed_volume(spatial: Sequence[int]) -> int:
    """A packed channel's length: the padded grid plus the slack a block may read past it, a multiple of 16."""
    depth, height, width = spatial
    plane = (height + 2) * (width + 2)
    need = (depth + 2) * plane + 2 * LANES_BLOCK + (height + 2) + (width + 2)
    return -(-need // 16) * 16


class _Chunks:
    """A kernel call's chunks (first channel, size, first source, end source), its sources (channel, first tap,
    end tap, weight offset) and, per packed weight, its index in the flat weight."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.sources: list[list[int]] = []
        self.index: list[int] = []

    def add(self, c0: int, k: int, sources: Sequence[tuple[int, int, tuple[int, ...]]], flat: Any) -> None:
        """A chunk of ``k`` channels from ``c0``: per source (channel, first offset, taps), ``flat(source, j, tap)``
        is the flat weight index of chunk channel j's weight."""
        s0 = len(self.sources)
        for channel, t0, taps in sources:
            self.sources.append([channel, t0, t0 + len(taps), len(self.index)])
            self.index += [flat(channel, j, t) for t in taps for j in range(k)]
        self.chunks.append([c0, k, s0, len(self.sources)])

    def tensors(self, offsets: list[int]) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        return (_longs(self.chunks), _longs(self.sources), _longs(offsets)), _longs(self.index)


@lru_cache(maxsize=256)
def tap_plan(
    groups: tuple[tuple[int, tuple[int, ...]], ...],
    in_channels: int,
    spatial: tuple[int, int, int],
    conv_groups: int = 1,
    widest: int = WIDEST,
    weight_widest: int = WEIGHT_WIDEST,
) -> TapPlan:
    """``groups``: (output channels, taps) per run of output channels in order (a CAKES allocation's shapes);
    ``conv_groups``: the conv's ``groups`` (output channel co reads only the input channels of its group);
    ``widest``, ``weight_widest``: the most channels in a forward or input-gradient chunk and in a weight-gradient
    chunk (6 and 6 for kernels before version 15, 9 and 6 for versions 15-16)."""
    out_channels = sum(count for count, _ in groups)
    per_in, per_out = in_channels // conv_groups, out_channels // conv_groups
    offsets: list[int] = []
    mirrored: list[int] = []
    taps_of: list[tuple[int, tuple[int, ...]]] = []  # per output channel: (first offset, its taps)
    for count, taps in groups:
        taps_of += [(len(offsets), taps)] * count
        offsets += tap_offsets(taps, spatial)
        mirrored += tap_offsets(taps, spatial, sign=-1)
    forward, weight, backward = _Chunks(), _Chunks(), _Chunks()
    for group in range(conv_groups):
        outs, ins = range(group * per_out, (group + 1) * per_out), range(group * per_in, (group + 1) * per_in)
        first = outs.start  # y: chunks of output channels that share their taps, the group's inputs as sources
        while first < outs.stop:
            stop = first
            while stop < outs.stop and taps_of[stop] == taps_of[first]:
                stop += 1
            t0, taps = taps_of[first]
            for calls, most in ((forward, widest), (weight, weight_widest)):
                for c0, k in chunked(first, stop - first, most):
                    inputs = [(ci, t0, taps) for ci in ins]
                    calls.add(c0, k, inputs, lambda ci, j, t, c0=c0: ((c0 + j) * per_in + ci - ins.start) * 27 + t)
            first = stop
        # dx[ci] = sum over the group's co of w[co, ci, t] dy[co] at the mirrored offset: chunks of input
        # channels, output channels as sources, each with its own taps
        for c0, k in chunked(ins.start, len(ins), widest):
            outputs = [(co, *taps_of[co]) for co in outs]
            backward.add(c0, k, outputs, lambda co, j, t, c0=c0: (co * per_in + c0 - ins.start + j) * 27 + t)
    return TapPlan(
        packed_volume(spatial), *forward.tensors(offsets), *backward.tensors(mirrored), *weight.tensors(offsets)
    )


def chunked(first: int, count: int, most: int) -> list[tuple[int, int]]:
    """``count`` channels from ``first`` as (first, size) chunks of at most ``most``, as even as possible (with
    ``most`` 6, 9 as 5 + 4, not 6 + 3 or 4 + 4 + 1: a thin chunk runs its loads for fewer multiply-adds)."""
    pieces = -(-count // most)
    base, extra = divmod(count, pieces)
    sizes = [base + (1 if i < extra else 0) for i in range(pieces)]
    return [(first + sum(sizes[:i]), size) for i, size in enumerate(sizes)]


def _longs(rows: Sequence[Any]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def tap_groups(counts: Sequence[int], masks: Sequence[int]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(output channels, taps) per group from counts and 27-bit tap masks (bit ``a·9 + b·3 + c``)."""
    return tuple((count, tuple(t for t in range(27) if mask >> t & 1)) for count, mask in zip(counts, masks))


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel computes a conv of ``x`` by ``weight`` (any kernel within the 3x3x3 cube, zero-padded
    to it by the caller): both float32 on the CPU, and the kernel built."""
    return (
        x.device.type == weight.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() == 5
        and KERNEL.available()
    )


def packable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernel's pack reads it: itself where its channels are adjacent (a channels_last_3d tensor or a
    channel slice of one, such as a DenseNet layer's share of a concatenation's gradient) or it has one channel
    (whose stride PyTorch leaves NCDHW's in either layout); else its channels_last_3d copy."""
    return t if t.shape[1] == 1 or t.stride(1) == 1 else t.contiguous(memory_format=CPU_LAYOUT)


def tap_conv3d(
    x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], masks: Sequence[int], groups: int = 1
) -> torch.Tensor:
    """Stride-1 'same' conv of ``x`` (N, C_in, D, H, W) by ``weight`` (C_out, C_in / groups, 3, 3, 3) in which the
    ``counts[i]`` output channels of run i sum only the taps of ``masks[i]`` (27-bit, bit ``a·9 + b·3 + c``), each
    over its conv group's input channels (``groups`` as in ``F.conv3d``); channels_last_3d out. The weight's other
    taps are neither read nor given a gradient."""
    return _tap_conv3d(x, weight, counts, masks, groups)[0]


@torch.library.custom_op("psc_nas::tap_conv3d", mutates_args=(), device_types="cpu")
def _tap_conv3d(
    x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], masks: Sequence[int], groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, packed x): the packed input is an output so that the backward reuses it instead of packing x again."""
    module = KERNEL.module()
    if module is None:
        raise RuntimeError(f"the tap-conv C++ kernel is unavailable: {KERNEL.unavailable_reason()}")
    x = packable(x)
    plan = tap_plan(tap_groups(counts, masks), x.shape[1], tuple(x.shape[2:]), groups)
    y = torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, memory_format=CPU_LAYOUT)
    packed = module.pack(x, plan.volume)
    module.conv(packed, weight.reshape(-1)[plan.forward_index].contiguous(), *plan.forward, y)
    return y, packed


@_tap_conv3d.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], masks: Sequence[int], groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    y = x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:])).contiguous(memory_format=CPU_LAYOUT)
    return y, x.new_empty((x.shape[0], x.shape[1], packed_volume(tuple(x.shape[2:]))))


def _setup_context(ctx: Any, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, weight, counts, masks, groups = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.runs, ctx.groups, ctx.shape = tap_groups(counts, masks), groups, tuple(x.shape)
    ctx.mark_non_differentiable(output[1])
    # The packed input never gets a gradient (the backward runs only when y's does); materialised, autograd filled a
    # zero one of its size, (N, C_in, packed volume), for every backward: a CAKES DenseNet3D step at 32³, batch 4 ran
    # 1.03-1.04x faster without them (Xeon, benchmarks/network_step.py).
    ctx.set_materialize_grads(False)


def _backward(
    ctx: Any, grad_y: torch.Tensor, _grad_packed: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
    module = KERNEL.module()
    packed_x, weight = ctx.saved_tensors
    shape = ctx.shape
    plan = tap_plan(ctx.runs, shape[1], shape[2:], ctx.groups)
    packed_dy = module.pack(packable(grad_y), plan.volume)
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.empty(shape, dtype=grad_y.dtype, memory_format=CPU_LAYOUT)
        module.conv(packed_dy, weight.reshape(-1)[plan.backward_index].contiguous(), *plan.backward, grad_x)
    if ctx.needs_input_grad[1]:
        size = plan.weight_index.numel()
        packed = module.weight_grad(packed_x, packed_dy, *plan.weight, size, *shape[2:])
        grad_weight = weight.new_zeros(weight.numel()).index_put_((plan.weight_index,), packed).view_as(weight)
    return grad_x, grad_weight, None, None, None


_tap_conv3d.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.psc_nas.tap_conv3d)
def _flops(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    counts: Sequence[int],
    masks: Sequence[int],
    groups: int,
    *args: Any,
    out_shape: Sequence[Sequence[int]],
    **kw: Any,
) -> int:
    taps = sum(count * bin(mask).count("1") for count, mask in zip(counts, masks))
    return 2 * prod(x_shape[2:]) * x_shape[0] * x_shape[1] // groups * taps  # a MAC per group input, tap, position

"""BatchNorm ─ ReLU in one C++ kernel on channels_last_3d CPU tensors, forward and backward.

Every pre-activation layer of a DenseNet3D, and every conv ─ BN ─ ReLU of the other backbones, runs a BatchNorm3d
and a ReLU back to back. PyTorch runs them as separate ops: the BN's statistics and normalisation, the ReLU's
pass, then in the backward the ReLU's mask, the BN's two reductions and its input gradient. Fused, a training step
reads and writes each activation fewer times (1.3-2.2x faster at DenseNet3D's 32³ shapes, about 2x in inference;
``benchmarks/norm_act.py``, docs/benchmarks/ops.md):

    forward   per-channel sums of x (float blocks of 128 rows flushed into float64, shifted by the first row so the
              variance does not cancel) ─► y = max(x·a + b, 0), a = γ/σ, b = β − μ·a       (2 reads, 1 write)
    backward  Σ g·[x·a + b > 0] and Σ g·[x·a + b > 0]·(x − μ)   (the mask recomputed from x, not stored)
              ─► dx = [x·a + b > 0]·g·a + x·k1 + k0, the BN input gradient in closed form    (4 reads, 1 write)

against at least 3 reads and 2 writes forward and 6 reads and 2 writes backward unfused. Where a 2x2x2 average pool
follows (a DenseNet3D transition: ``norm_act_pool``), the forward pools as it applies, writing only the pooled
eighth, and the backward reads each window's pooled gradient for its eight inputs, so the full-size activation and its
gradient never exist; the results equal the unfused pool's to the bit (the transition's BN ─ ReLU ─ pool at 152
channels, 32³, batch 4: 57 → 21 ms forward + backward on a 2-core Xeon). ``x`` may also come as the pieces of its
concatenation along the channels (``Features``: a DenseNet block's input and its layers' outputs, never
concatenated); the kernel reads them where they are, with the concatenation's arithmetic per channel, so the same
values to the bit, and gives each piece its own gradient. Running statistics are
updated as ``nn.BatchNorm3d`` does (momentum, or the cumulative average when it is None; unbiased variance). In eval
mode without gradients the forward is one pass with the running statistics.

``norm_act(norm, act, x)`` is ``act(norm(x))``, fused where ``fusable`` says the kernel computes exactly that: an
``nn.BatchNorm3d`` with affine parameters and an ``nn.ReLU``, neither observed by hooks (NASWOT hooks its ReLUs), a
float32 channels_last_3d CPU input, not inside TorchScript tracing, ``torch.compile`` or export (those graphs keep
PyTorch's ops), and the kernel built (``psc_nas.native``; without a compiler, or with ``PSC_NAS_NO_EXTENSIONS=1``,
PyTorch's ops run). Values equal PyTorch's up to float rounding; where a pre-activation is within rounding of 0
the two may disagree on the ReLU mask, as any two correct implementations may.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from psc_nas import native
from psc_nas.ops.fast import tracing

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK_ROWS = 128;  // rows summed in float before a flush into double

// Two per-channel sums over the rows of a (rows, C) matrix, float64, (sum1, sum2): ``add(r0, r1, b1, b2)`` adds the
// terms of rows [r0, r1) into float accumulators b1, b2 of C values, which are flushed into float64 every BLOCK_ROWS
// rows. The rows are cut into a fixed number of chunks (a function of the thread count only), summed in parallel,
// then added.
template <typename AddRows>
std::vector<torch::Tensor> channel_sums(int64_t rows, int64_t C, const torch::TensorOptions& options, AddRows add) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows / BLOCK_ROWS + 1, 4 * at::get_num_threads()));
  auto sum1 = at::zeros({chunks, C}, options.dtype(at::kDouble));
  auto sum2 = at::zeros({chunks, C}, options.dtype(at::kDouble));
  double* s1 = sum1.data_ptr<double>();
  double* s2 = sum2.data_ptr<double>();
  const int64_t per = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> b1(C), b2(C);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t last = std::min(rows, (k + 1) * per);
      for (int64_t start = k * per; start < last; start += BLOCK_ROWS) {
        std::fill(b1.begin(), b1.end(), 0.f);
        std::fill(b2.begin(), b2.end(), 0.f);
        add(start, std::min(last, start + BLOCK_ROWS), b1.data(), b2.data());
        for (int64_t c = 0; c < C; ++c) {
          s1[k * C + c] += b1[c];
          s2[k * C + c] += b2[c];
        }
      }
    }
  });
  return {sum1.sum(0), sum2.sum(0)};
}

// A 5-D float32 CPU tensor in channels_last_3d: a (rows, C) matrix in memory.
void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d), name, " must be 5-D channels_last_3d");
}

// A per-channel float32 vector of C values.
void check_channels(const torch::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == C, name,
              " must be a contiguous float32 CPU vector of one value per channel");
}

// The input x: one tensor, or the pieces of its concatenation along the channels (a DenseNet's features, never
// concatenated): piece p holds channels [offset[p], offset[p] + width[p]) of C as a (rows, width[p]) matrix. Every
// kernel walks the rows once, each row whole (whole_row); a channel's arithmetic is the same whether x comes whole
// or in pieces, so are its results, to the bit.
struct Pieces {
  std::vector<const float*> x;
  std::vector<int64_t> width, offset;
  int64_t N = 0, C = 0, D = 0, H = 0, W = 0, rows = 0;
  explicit Pieces(const std::vector<torch::Tensor>& xs) {
    TORCH_CHECK(!xs.empty(), "x: at least one tensor");
    const auto& first = xs[0];
    for (const auto& t : xs) {
      check_rows(t, "x");
      TORCH_CHECK(t.size(0) == first.size(0) && t.size(2) == first.size(2) && t.size(3) == first.size(3) &&
                      t.size(4) == first.size(4) && t.size(1) > 0,
                  "x: pieces differ in batch or spatial size, or have no channel");
      x.push_back(t.data_ptr<float>());
      width.push_back(t.size(1));
      offset.push_back(C);
      C += t.size(1);
    }
    N = first.size(0), D = first.size(2), H = first.size(3), W = first.size(4), rows = N * D * H * W;
  }
  int64_t count() const { return static_cast<int64_t>(x.size()); }
  const float* row(int64_t p, int64_t r) const { return x[p] + r * width[p]; }
  // Row r of x, all C channels in a row: in place for one piece, else the pieces' rows copied into ``buffer`` (C
  // floats). Every loop reads rows whole: looping per piece, a DenseNet's 28 channels ran 16 in a vector and 12 one
  // at a time, and the backward's sums took 1.9x as long as over the concatenation (5 pieces, 152 channels, 32³,
  // Xeon); over whole rows, as long.
  const float* whole_row(int64_t r, float* buffer) const {
    if (count() == 1) return row(0, r);
    for (int64_t p = 0; p < count(); ++p) std::memcpy(buffer + offset[p], row(p, r), sizeof(float) * width[p]);
    return buffer;
  }
};

// y = max(x * a + b, 0) over rows [r0, r1), y a (rows, C) matrix.
void apply_rows(const Pieces& in, const float* a, const float* b, float* y, int64_t r0, int64_t r1) {
  std::vector<float> buffer(in.C);
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = in.whole_row(r, buffer.data());
    float* out = y + r * in.C;
#pragma omp simd
    for (int64_t c = 0; c < in.C; ++c) {
      out[c] = std::max(xr[c] * a[c] + b[c], 0.f);
    }
  }
}

// The 2x2x2 average pool (stride 2, floor) of max(x * a + b, 0), x a (N, D, H, W, C) array: y (N, D/2, H/2, W/2, C),
// output rows [q0, q1). The eight terms are added in pairs along D, then H, then W and scaled by 1/8, the order of
// ``nets._layers.AvgPool2``'s tensor ops, so the result is theirs on ``bnr_apply``'s output to the bit.
void apply_pool_rows(const Pieces& in, const float* a, const float* b, float* y, int64_t q0, int64_t q1) {
  const int64_t C = in.C, D = in.D, H = in.H, W = in.W, d2 = D / 2, h2 = H / 2, w2 = W / 2;
  std::vector<float> buffer(8 * C);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t i = q % w2, t = q / w2, j = t % h2, k = t / h2 % d2, n = t / h2 / d2;
    const int64_t first = ((n * D + 2 * k) * H + 2 * j) * W + 2 * i;  // the window's first row
    const float* v[8];  // (dz, dy, dx) = (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), then dx = 1
    for (int64_t e = 0; e < 8; ++e) {
      const int64_t r = first + (e & 1) * H * W + (e >> 1 & 1) * W + (e >> 2);
      v[e] = in.whole_row(r, buffer.data() + e * C);
    }
    float* out = y + q * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      auto f = [&](int64_t e) { return std::max(v[e][c] * a[c] + b[c], 0.f); };
      const float w0 = (f(0) + f(1)) + (f(2) + f(3));
      const float w1 = (f(4) + f(5)) + (f(6) + f(7));
      out[c] = (w0 + w1) * 0.125f;
    }
  }
}

// The gradient arriving at row r of x (C channels), read row by row from a cursor (``at(r)``, then ``next()``):
// ``Full``, a tensor of x's shape; ``Pooled``, that of a 2x2x2 average pool after the BN ─ ReLU (already scaled by
// 1/8 by the caller), whose value reaches each of its eight rows; rows the pool's floor drops read a row of zeros, so
// every row runs the arithmetic of the unfused backward, whose gradient is zero there.
struct Full {
  const float* g;
  int64_t C;
  struct Cursor {
    const float* p;
    int64_t C;
    const float* row() const { return p; }
    void next() { p += C; }
  };
  Cursor at(int64_t r) const { return {g + r * C, C}; }
};

struct Pooled {
  const float* g;
  const float* zeros;  // C zeros
  int64_t C, D, H, W;
  struct Cursor {
    const Pooled* s;
    int64_t n, z, y, x;
    const float* row() const {
      const int64_t d2 = s->D / 2, h2 = s->H / 2, w2 = s->W / 2;
      if (z >= 2 * d2 || y >= 2 * h2 || x >= 2 * w2) return s->zeros;
      return s->g + (((n * d2 + z / 2) * h2 + y / 2) * w2 + x / 2) * s->C;
    }
    void next() {
      if (++x < s->W) return;
      x = 0;
      if (++y < s->H) return;
      y = 0;
      if (++z < s->D) return;
      z = 0;
      ++n;
    }
  };
  Cursor at(int64_t r) const {
    const int64_t t = r / W / H;
    return {this, t / D, t % D, r / W % H, r % W};
  }
};

// g is the gradient of the BN ─ ReLU's output, (N, C, D, H, W), or of its 2x2x2 average pool, (N, C, D/2, H/2, W/2):
// whether the latter.
bool pooled_grad(const torch::Tensor& g, const Pieces& in) {
  check_rows(g, "grad");
  TORCH_CHECK(g.size(0) == in.N && g.size(1) == in.C, "grad: not the BN ─ ReLU output's batch and channels");
  if (g.size(2) == in.D && g.size(3) == in.H && g.size(4) == in.W) return false;
  TORCH_CHECK(g.size(2) == in.D / 2 && g.size(3) == in.H / 2 && g.size(4) == in.W / 2,
              "grad must have x's shape or that of x's 2x2x2 average pool");
  return true;
}

// dx = (x * a + b > 0 ? g * a : 0) + x * k1 + k0, one (rows, width) matrix per piece: computed over the whole row
// (in a buffer for pieces, as Pieces::whole_row says why), then copied into the pieces' rows.
template <typename Grad>
void grad_input_rows(const Grad& grad, const Pieces& in, const float* a, const float* b, const float* k1,
                     const float* k0, const std::vector<float*>& dx, int64_t r0, int64_t r1) {
  const int64_t C = in.C;
  std::vector<float> buffer(2 * C);
  auto cursor = grad.at(r0);
  for (int64_t r = r0; r < r1; ++r, cursor.next()) {
    const float *gr = cursor.row(), *xr = in.whole_row(r, buffer.data());
    float* out = in.count() == 1 ? dx[0] + r * C : buffer.data() + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float gm = xr[c] * a[c] + b[c] > 0.f ? gr[c] * a[c] : 0.f;
      out[c] = gm + xr[c] * k1[c] + k0[c];
    }
    if (in.count() == 1) continue;
    for (int64_t p = 0; p < in.count(); ++p) {
      std::memcpy(dx[p] + r * in.width[p], out + in.offset[p], sizeof(float) * in.width[p]);
    }
  }
}

template <typename Grad>
std::vector<torch::Tensor> grad_sums(const Grad& grad, const Pieces& in, const torch::TensorOptions& options,
                                     const float* a, const float* b, const float* mean) {
  return channel_sums(in.rows, in.C, options, [&](int64_t r0, int64_t r1, float* b1, float* b2) {
    std::vector<float> buffer(in.C);
    auto cursor = grad.at(r0);
    for (int64_t r = r0; r < r1; ++r, cursor.next()) {
      const float *gr = cursor.row(), *xr = in.whole_row(r, buffer.data());
#pragma omp simd
      for (int64_t c = 0; c < in.C; ++c) {
        const float gm = xr[c] * a[c] + b[c] > 0.f ? gr[c] : 0.f;
        b1[c] += gm;
        b2[c] += gm * (xr[c] - mean[c]);
      }
    }
  });
}

}  // namespace

// x: a list of one tensor, or of the pieces of its concatenation along the channels (Pieces); every tensor is 5-D
// channels_last_3d float32, and a, b, mean, k1, k0 are per-channel vectors of x's channels.

// (x's first row, sum of x - first row, sum of (x - first row)^2): per channel, the sums in float64.
std::vector<torch::Tensor> bnr_stats(std::vector<torch::Tensor> xs) {
  const Pieces in(xs);
  auto shift = at::empty({in.C}, xs[0].options().memory_format(at::MemoryFormat::Contiguous));
  float* sp = shift.data_ptr<float>();
  for (int64_t p = 0; p < in.count(); ++p) std::copy(in.row(p, 0), in.row(p, 0) + in.width[p], sp + in.offset[p]);
  auto sums = channel_sums(in.rows, in.C, xs[0].options(), [&](int64_t r0, int64_t r1, float* b1, float* b2) {
    std::vector<float> buffer(in.C);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = in.whole_row(r, buffer.data());
#pragma omp simd
      for (int64_t c = 0; c < in.C; ++c) {
        const float d = row[c] - sp[c];
        b1[c] += d;
        b2[c] += d * d;
      }
    }
  });
  return {shift, sums[0], sums[1]};
}

// max(x * a + b, 0): (N, C, D, H, W), channels_last_3d.
torch::Tensor bnr_apply(std::vector<torch::Tensor> xs, torch::Tensor a, torch::Tensor b) {
  const Pieces in(xs);
  check_channels(a, in.C, "a");
  check_channels(b, in.C, "b");
  auto y = at::empty({in.N, in.C, in.D, in.H, in.W}, xs[0].options().memory_format(at::MemoryFormat::ChannelsLast3d));
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, in.rows, 256, [&](int64_t r0, int64_t r1) { apply_rows(in, ap, bp, yp, r0, r1); });
  return y;
}

// The 2x2x2 average pool (stride 2, floor) of max(x * a + b, 0): (N, C, D/2, H/2, W/2), channels_last_3d. The
// full-size activation is never written.
torch::Tensor bnr_apply_pool2(std::vector<torch::Tensor> xs, torch::Tensor a, torch::Tensor b) {
  const Pieces in(xs);
  TORCH_CHECK(in.D >= 2 && in.H >= 2 && in.W >= 2, "bnr_apply_pool2: every spatial side at least 2");
  check_channels(a, in.C, "a");
  check_channels(b, in.C, "b");
  auto y = at::empty({in.N, in.C, in.D / 2, in.H / 2, in.W / 2},
                     xs[0].options().memory_format(at::MemoryFormat::ChannelsLast3d));
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, y.numel() / in.C, 32, [&](int64_t q0, int64_t q1) { apply_pool_rows(in, ap, bp, yp, q0, q1); });
  return y;
}

// (sum of g where x * a + b > 0, sum of g * (x - mean) there) per channel, float64; g the gradient of the output
// or of its 2x2x2 average pool (pooled_grad).
std::vector<torch::Tensor> bnr_grad_sums(torch::Tensor g, std::vector<torch::Tensor> xs, torch::Tensor a,
                                         torch::Tensor b, torch::Tensor mean) {
  const Pieces in(xs);
  check_channels(a, in.C, "a");
  check_channels(b, in.C, "b");
  check_channels(mean, in.C, "mean");
  const bool pooled = pooled_grad(g, in);
  const float *gp = g.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>(),
              *mp = mean.data_ptr<float>();
  const std::vector<float> zeros(in.C, 0.f);
  if (pooled) return grad_sums(Pooled{gp, zeros.data(), in.C, in.D, in.H, in.W}, in, xs[0].options(), ap, bp, mp);
  return grad_sums(Full{gp, in.C}, in, xs[0].options(), ap, bp, mp);
}

// (x * a + b > 0 ? g * a : 0) + x * k1 + k0: one tensor per piece of x, of its shape; g as in bnr_grad_sums.
std::vector<torch::Tensor> bnr_grad_input(torch::Tensor g, std::vector<torch::Tensor> xs, torch::Tensor a,
                                          torch::Tensor b, torch::Tensor k1, torch::Tensor k0) {
  const Pieces in(xs);
  for (const auto& [t, name] : {std::pair{&a, "a"}, std::pair{&b, "b"}, std::pair{&k1, "k1"}, std::pair{&k0, "k0"}}) {
    check_channels(*t, in.C, name);
  }
  const bool pooled = pooled_grad(g, in);
  std::vector<torch::Tensor> dxs;
  std::vector<float*> dp;
  for (const auto& t : xs) {
    dxs.push_back(at::empty_like(t));
    dp.push_back(dxs.back().data_ptr<float>());
  }
  const float *gp = g.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>(),
              *k1p = k1.data_ptr<float>(), *k0p = k0.data_ptr<float>();
  const std::vector<float> zeros(in.C, 0.f);
  const Pooled pooled_rows{gp, zeros.data(), in.C, in.D, in.H, in.W};
  at::parallel_for(0, in.rows, 256, [&](int64_t r0, int64_t r1) {
    if (pooled) return grad_input_rows(pooled_rows, in, ap, bp, k1p, k0p, dp, r0, r1);
    grad_input_rows(Full{gp, in.C}, in, ap, bp, k1p, k0p, dp, r0, r1);
  });
  return dxs;
}
"""
FUNCTIONS = ["bnr_stats", "bnr_apply", "bnr_apply_pool2", "bnr_grad_sums", "bnr_grad_input"]
KERNEL = native.Extension("norm_act", 4, SOURCE, FUNCTIONS, "the BatchNorm-ReLU C++ kernel")

# A tensor, or the pieces of its concatenation along the channels (dim 1) that no one has concatenated: a DenseNet
# block's features. The fused kernel reads the pieces where they are; every other path concatenates them (``joined``).
Features = torch.Tensor | Sequence[torch.Tensor]


def pieces(x: Features) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def joined(x: Features) -> torch.Tensor:
    """``x`` as one tensor: the concatenation of its pieces (a lone piece as it is)."""
    return x if isinstance(x, torch.Tensor) else x[0] if len(x) == 1 else torch.cat(list(x), dim=1)


def fusable(norm: nn.Module, act: nn.Module, x: Features) -> bool:
    """Whether ``act(norm(x))`` may run as the fused kernel (module docstring); pieces of x must each qualify and
    share their batch and spatial sizes."""
    if not (type(norm) is nn.BatchNorm3d and type(act) is nn.ReLU and norm.affine):
        return False
    if tracing():  # before any check that reads tensor sizes into a traced graph
        return False
    xs = pieces(x)
    first = xs[0]
    return (
        norm.weight.dtype == torch.float32
        and all(
            t.device.type == "cpu"
            and t.dtype == torch.float32
            and t.dim() == 5
            and t.numel() > t.shape[1] > 0  # more than one value per channel, as training needs
            and t.is_contiguous(memory_format=torch.channels_last_3d)
            and t.shape[0] == first.shape[0]
            and t.shape[2:] == first.shape[2:]
            for t in xs
        )
        and (_batch_stats(norm) or not any(_needs_grad(norm, t) for t in xs))
        and not (_observed(norm) or _observed(act) or _global_hooks())
        and KERNEL.available()
    )


def norm_act(norm: nn.Module, act: nn.Module, x: Features) -> torch.Tensor:
    """``act(norm(x))`` (of the concatenation, for pieces), by the fused kernel where it applies."""
    return batch_norm_relu(x, norm) if fusable(norm, act, x) else act(norm(joined(x)))  # type: ignore[arg-type]


def pool2(pool: nn.Module, x: Features) -> bool:
    """Whether ``pool`` is the 2x2x2 average pool the kernel fuses (stride 2, no padding, floor) and ``x`` has room
    for one window along every side."""
    return (
        isinstance(pool, nn.AvgPool3d)
        and _triple(pool.kernel_size) == _triple(pool.stride) == (2, 2, 2)
        and _triple(pool.padding) == (0, 0, 0)
        and not pool.ceil_mode
        and pool.divisor_override is None
        and not _observed(pool)
        and min(pieces(x)[0].shape[2:]) >= 2
    )


def norm_act_pool(norm: nn.Module, act: nn.Module, pool: nn.Module, x: Features) -> torch.Tensor:
    """``pool(act(norm(x)))``; where ``pool`` is a 2x2x2 average pool (``pool2``) and the BN ─ ReLU fuses, one kernel
    pools as it normalises, so the full-size activation is neither written nor read (forward), and its gradient is
    read from the pooled one (backward): a DenseNet3D transition."""
    if fusable(norm, act, x) and pool2(pool, x):
        return batch_norm_relu(x, norm, pooled=True)  # type: ignore[arg-type]
    return pool(norm_act(norm, act, x))


def _triple(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


def batch_norm_relu(x: Features, norm: nn.BatchNorm3d, pooled: bool = False) -> torch.Tensor:
    """``relu(norm(x))`` by the kernel (of the concatenation, for pieces, each of which gets its own gradient), with
    ``norm``'s running statistics updated as its own forward would; with ``pooled``, its 2x2x2 average pool
    (``pool2``), equal to the pool's tensor ops on the unpooled output to the bit (``nets._layers.AvgPool2``), its
    gradient too."""
    xs = pieces(x)
    factor = 0.0
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    if _batch_stats(norm):
        y, mean, var = _BatchNormReLU.apply(norm.weight, norm.bias, norm.eps, pooled, *xs)
        if norm.training and norm.track_running_stats and norm.running_mean is not None:
            rows = xs[0].numel() // xs[0].shape[1]
            with torch.no_grad():
                norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
                norm.running_var.lerp_((var * (rows / (rows - 1))).to(norm.running_var.dtype), factor)
        return y
    with torch.no_grad():
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        apply = KERNEL.module().bnr_apply_pool2 if pooled else KERNEL.module().bnr_apply
        return apply(xs, scale.float().contiguous(), shift.float().contiguous())


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, bias: torch.Tensor, eps: float, pooled: bool, *xs: torch.Tensor
    ) -> tuple:
        kernel = KERNEL.module()
        rows = xs[0].numel() // xs[0].shape[1]
        first, sums, squares = kernel.bnr_stats(list(xs))
        offset = sums / rows
        mean64 = first.double() + offset
        var64 = (squares / rows - offset * offset).clamp_min(0.0)
        invstd64 = (var64 + eps).rsqrt()
        scale64 = weight.detach().double() * invstd64
        mean, invstd = mean64.float(), invstd64.float()
        scale, shift = scale64.float(), (bias.detach().double() - mean64 * scale64).float()
        y = (kernel.bnr_apply_pool2 if pooled else kernel.bnr_apply)(list(xs), scale, shift)
        ctx.save_for_backward(scale, shift, mean, invstd, *xs)
        ctx.pooled = pooled
        ctx.mark_non_differentiable(mean64, var64)
        return y, mean64, var64

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, _mean: Any, _var: Any) -> tuple:
        scale, shift, mean, invstd, *xs = ctx.saved_tensors
        kernel = KERNEL.module()
        grad_y = grad_y.contiguous(memory_format=torch.channels_last_3d)
        if ctx.pooled:  # each of a window's eight inputs receives 1/8 of its output's gradient (kernel: pooled_grad)
            grad_y = grad_y * 0.125
        rows = xs[0].numel() // xs[0].shape[1]
        masked, masked_centred = kernel.bnr_grad_sums(grad_y, xs, scale, shift, mean)  # float64
        grad_xs: list[torch.Tensor | None] = [None] * len(xs)
        if any(ctx.needs_input_grad[4:]):
            scale64, invstd64 = scale.double(), invstd.double()
            k1 = -scale64 * invstd64 * invstd64 * masked_centred / rows
            k0 = -scale64 * masked / rows - mean.double() * k1
            every = kernel.bnr_grad_input(grad_y, xs, scale, shift, k1.float(), k0.float())
            grad_xs = [grad if needed else None for grad, needed in zip(every, ctx.needs_input_grad[4:])]
        grad_weight = (masked_centred * invstd.double()).float() if ctx.needs_input_grad[0] else None
        grad_bias = masked.float() if ctx.needs_input_grad[1] else None
        return grad_weight, grad_bias, None, None, *grad_xs


def _batch_stats(norm: nn.BatchNorm3d) -> bool:
    """Whether ``norm`` normalises by the batch's statistics (training, or no running statistics kept)."""
    return norm.training or norm.running_mean is None


def _needs_grad(norm: nn.BatchNorm3d, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad)


def _observed(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    return any(getattr(torch_module, name, None) for name in (*names, "_global_backward_pre_hooks"))

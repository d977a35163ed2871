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

against at least 3 reads and 2 writes forward and 6 reads and 2 writes backward unfused. Running statistics are
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

from typing import Any

import torch
from torch import nn

from psc_nas import native
from psc_nas.ops.fast import tracing

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

namespace {

constexpr int64_t BLOCK_ROWS = 128;  // rows summed in float before a flush into double

// Two per-channel sums over the rows of a (rows, C) matrix, float64, (sum1, sum2): ``add(r, b1, b2)`` adds row r's
// terms into float accumulators b1, b2 of C values, which are flushed into float64 every BLOCK_ROWS rows. The rows
// are cut into a fixed number of chunks (a function of the thread count only), summed in parallel, then added.
template <typename AddRow>
std::vector<torch::Tensor> channel_sums(int64_t rows, int64_t C, const torch::TensorOptions& options, AddRow add) {
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
        for (int64_t r = start; r < std::min(last, start + BLOCK_ROWS); ++r) {
          add(r, b1.data(), b2.data());
        }
        for (int64_t c = 0; c < C; ++c) {
          s1[k * C + c] += b1[c];
          s2[k * C + c] += b2[c];
        }
      }
    }
  });
  return {sum1.sum(0), sum2.sum(0)};
}

// y = max(x * a + b, 0) over rows [r0, r1).
void apply_rows(const float* x, const float* a, const float* b, float* y, int64_t r0, int64_t r1, int64_t C) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* in = x + r * C;
    float* out = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      out[c] = std::max(in[c] * a[c] + b[c], 0.f);
    }
  }
}

// dx = (x * a + b > 0 ? g * a : 0) + x * k1 + k0
void grad_input_rows(const float* g, const float* x, const float* a, const float* b, const float* k1,
                     const float* k0, float* dx, int64_t r0, int64_t r1, int64_t C) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gr = g + r * C;
    const float* xr = x + r * C;
    float* out = dx + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float gm = xr[c] * a[c] + b[c] > 0.f ? gr[c] * a[c] : 0.f;
      out[c] = gm + xr[c] * k1[c] + k0[c];
    }
  }
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

}  // namespace

// (x's first row, sum of x - first row, sum of (x - first row)^2): per channel, the sums in float64.
std::vector<torch::Tensor> bnr_stats(torch::Tensor x) {
  check_rows(x, "x");
  const int64_t C = x.size(1), rows = x.numel() / C;
  auto shift = x.permute({0, 2, 3, 4, 1}).reshape({rows, C})[0].contiguous();
  const float* xp = x.data_ptr<float>();
  const float* sp = shift.data_ptr<float>();
  auto sums = channel_sums(rows, C, x.options(), [&](int64_t r, float* b1, float* b2) {
    const float* row = xp + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float d = row[c] - sp[c];
      b1[c] += d;
      b2[c] += d * d;
    }
  });
  return {shift, sums[0], sums[1]};
}

// max(x * a + b, 0), channels_last_3d.
torch::Tensor bnr_apply(torch::Tensor x, torch::Tensor a, torch::Tensor b) {
  check_rows(x, "x");
  const int64_t C = x.size(1), rows = x.numel() / C;
  check_channels(a, C, "a");
  check_channels(b, C, "b");
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) { apply_rows(xp, ap, bp, yp, r0, r1, C); });
  return y;
}

// (sum of g where x * a + b > 0, sum of g * (x - mean) there) per channel, float64.
std::vector<torch::Tensor> bnr_grad_sums(torch::Tensor g, torch::Tensor x, torch::Tensor a, torch::Tensor b,
                                         torch::Tensor mean) {
  check_rows(x, "x");
  check_rows(g, "grad");
  TORCH_CHECK(g.sizes() == x.sizes(), "grad and x differ in shape");
  const int64_t C = x.size(1), rows = x.numel() / C;
  check_channels(a, C, "a");
  check_channels(b, C, "b");
  check_channels(mean, C, "mean");
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(),
              *bp = b.data_ptr<float>(), *mp = mean.data_ptr<float>();
  return channel_sums(rows, C, x.options(), [&](int64_t r, float* b1, float* b2) {
    const float* gr = gp + r * C;
    const float* xr = xp + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float gm = xr[c] * ap[c] + bp[c] > 0.f ? gr[c] : 0.f;
      b1[c] += gm;
      b2[c] += gm * (xr[c] - mp[c]);
    }
  });
}

// (x * a + b > 0 ? g * a : 0) + x * k1 + k0, channels_last_3d.
torch::Tensor bnr_grad_input(torch::Tensor g, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor k1,
                             torch::Tensor k0) {
  check_rows(x, "x");
  check_rows(g, "grad");
  TORCH_CHECK(g.sizes() == x.sizes(), "grad and x differ in shape");
  const int64_t C = x.size(1), rows = x.numel() / C;
  for (const auto& [t, name] : {std::pair{&a, "a"}, std::pair{&b, "b"}, std::pair{&k1, "k1"}, std::pair{&k0, "k0"}}) {
    check_channels(*t, C, name);
  }
  auto dx = at::empty_like(x);
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(),
              *bp = b.data_ptr<float>(), *k1p = k1.data_ptr<float>(), *k0p = k0.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, rows, 256,
                   [&](int64_t r0, int64_t r1) { grad_input_rows(gp, xp, ap, bp, k1p, k0p, dp, r0, r1, C); });
  return dx;
}
"""
FUNCTIONS = ["bnr_stats", "bnr_apply", "bnr_grad_sums", "bnr_grad_input"]
KERNEL = native.Extension("norm_act", 2, SOURCE, FUNCTIONS, "the BatchNorm-ReLU C++ kernel")


def fusable(norm: nn.Module, act: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``act(norm(x))`` may run as the fused kernel (module docstring)."""
    return (
        type(norm) is nn.BatchNorm3d
        and type(act) is nn.ReLU
        and norm.affine
        and not tracing()  # first: the checks below would read tensor sizes into a traced graph
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and norm.weight.dtype == torch.float32
        and x.dim() == 5
        and x.numel() > x.shape[1] > 0  # more than one value per channel, as training needs
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and (_batch_stats(norm) or not _needs_grad(norm, x))
        and not (_observed(norm) or _observed(act) or _global_hooks())
        and KERNEL.available()
    )


def norm_act(norm: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(norm(x))``, by the fused kernel where it applies."""
    return batch_norm_relu(x, norm) if fusable(norm, act, x) else act(norm(x))  # type: ignore[arg-type]


def batch_norm_relu(x: torch.Tensor, norm: nn.BatchNorm3d) -> torch.Tensor:
    """``relu(norm(x))`` by the kernel, with ``norm``'s running statistics updated as its own forward would."""
    factor = 0.0
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    if _batch_stats(norm):
        y, mean, var = _BatchNormReLU.apply(x, norm.weight, norm.bias, norm.eps)
        if norm.training and norm.track_running_stats and norm.running_mean is not None:
            rows = x.numel() // x.shape[1]
            with torch.no_grad():
                norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
                norm.running_var.lerp_((var * (rows / (rows - 1))).to(norm.running_var.dtype), factor)
        return y
    with torch.no_grad():
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        return KERNEL.module().bnr_apply(x, scale.float().contiguous(), shift.float().contiguous())


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple:
        kernel = KERNEL.module()
        rows = x.numel() // x.shape[1]
        first, sums, squares = kernel.bnr_stats(x)
        offset = sums / rows
        mean64 = first.double() + offset
        var64 = (squares / rows - offset * offset).clamp_min(0.0)
        invstd64 = (var64 + eps).rsqrt()
        scale64 = weight.detach().double() * invstd64
        mean, invstd = mean64.float(), invstd64.float()
        scale, shift = scale64.float(), (bias.detach().double() - mean64 * scale64).float()
        y = kernel.bnr_apply(x, scale, shift)
        ctx.save_for_backward(x, scale, shift, mean, invstd)
        ctx.mark_non_differentiable(mean64, var64)
        return y, mean64, var64

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, _mean: Any, _var: Any) -> tuple:
        x, scale, shift, mean, invstd = ctx.saved_tensors
        kernel = KERNEL.module()
        grad_y = grad_y.contiguous(memory_format=torch.channels_last_3d)
        rows = x.numel() // x.shape[1]
        masked, masked_centred = kernel.bnr_grad_sums(grad_y, x, scale, shift, mean)  # float64
        grad_x = None
        if ctx.needs_input_grad[0]:
            scale64, invstd64 = scale.double(), invstd.double()
            k1 = -scale64 * invstd64 * invstd64 * masked_centred / rows
            k0 = -scale64 * masked / rows - mean.double() * k1
            grad_x = kernel.bnr_grad_input(grad_y, x, scale, shift, k1.float(), k0.float())
        grad_weight = (masked_centred * invstd.double()).float() if ctx.needs_input_grad[1] else None
        grad_bias = masked.float() if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


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

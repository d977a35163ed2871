"""The fused BatchNorm ─ ReLU kernel: values and gradients against float64 PyTorch, running statistics as
nn.BatchNorm3d keeps them, where it must not run, and whole networks with and without it."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psc_nas import native
from psc_nas.arch import ArchConfig, BlockChoice
from psc_nas.device import place
from psc_nas.evaluators import zero_cost
from psc_nas.nets import get_backbone
from psc_nas.nets._layers import AvgPool2, NormActSequential
from psc_nas.nets.densenet3d import DenseBlock
from psc_nas.ops import implementation, norm_act
from psc_nas.presets import preset_config

needs_kernel = pytest.mark.skipif(not norm_act.KERNEL.available(), reason="no C++ compiler: the fallback is tested")
CL = torch.channels_last_3d


def inputs(channels: int, shape=(3, 5, 6, 7), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, nn.BatchNorm3d]:
    generator = torch.Generator().manual_seed(seed + channels)
    n, d, h, w = shape
    x = (torch.randn(n, channels, d, h, w, generator=generator) * 3 + 2).to(memory_format=CL)  # mean far from 0
    upstream = torch.randn(n, channels, d, h, w, generator=generator).to(memory_format=CL)
    norm = nn.BatchNorm3d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
        norm.bias.uniform_(-0.5, 0.5, generator=generator)
    return x, upstream, norm


def float64_reference(x, upstream, norm, mask):
    """PyTorch's BN in float64, the ReLU taken as ``mask`` (the fused forward's own: where a pre-activation is
    within float32 rounding of 0 two correct implementations may differ), and its gradients."""
    x64 = x.detach().double().requires_grad_()
    weight = norm.weight.detach().double().requires_grad_()
    bias = norm.bias.detach().double().requires_grad_()
    pre = F.batch_norm(x64, None, None, weight, bias, True, 0.0, norm.eps)
    y = pre.clamp_min(0)
    (pre * mask * upstream.double()).sum().backward()
    return y, x64.grad, weight.grad, bias.grad


@needs_kernel
@pytest.mark.parametrize("channels", [1, 5, 16, 28, 67])  # 28: DenseNet3D's growth; 67: no vector multiple
def test_fused_forward_and_gradients_equal_float64_batch_norm_relu(channels):
    x, upstream, norm = inputs(channels)
    x.requires_grad_()
    y = norm_act.batch_norm_relu(x, norm)
    assert y.is_contiguous(memory_format=CL)
    y.backward(upstream)
    y_ref, gx, gw, gb = float64_reference(x, upstream, norm, (y > 0).double())
    torch.testing.assert_close(y.double(), y_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), gx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(norm.weight.grad.double(), gw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(norm.bias.grad.double(), gb, atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_batch_norm3d(momentum):
    x, _, norm = inputs(12)
    norm.momentum = momentum
    reference = copy.deepcopy(norm)
    for step in range(3):
        batch = x * (step + 1) - step
        norm_act.batch_norm_relu(batch.contiguous(memory_format=CL), norm)
        reference(batch)
    torch.testing.assert_close(norm.running_mean, reference.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.running_var, reference.running_var, atol=1e-4, rtol=1e-5)
    assert norm.num_batches_tracked.item() == reference.num_batches_tracked.item() == 3


@needs_kernel
def test_eval_mode_uses_the_running_statistics():
    x, _, norm = inputs(20)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    norm.eval()
    act = nn.ReLU()
    with torch.no_grad():
        assert norm_act.fusable(norm, act, x)
        torch.testing.assert_close(norm_act.norm_act(norm, act, x), act(norm(x)), atol=2e-6, rtol=1e-5)
    x.requires_grad_()
    assert not norm_act.fusable(norm, act, x)  # eval with gradients: PyTorch's ops (not a path worth a kernel)


@needs_kernel
def test_what_the_kernel_must_not_run():
    x, _, norm = inputs(8)
    act = nn.ReLU()
    assert norm_act.fusable(norm, act, x)
    assert not norm_act.fusable(norm, nn.LeakyReLU(), x)
    assert not norm_act.fusable(nn.InstanceNorm3d(8, affine=True), act, x)
    assert not norm_act.fusable(nn.BatchNorm3d(8, affine=False), act, x)
    assert not norm_act.fusable(norm, act, x.contiguous())  # NCDHW
    assert not norm_act.fusable(norm, act, x.double())
    assert not norm_act.fusable(norm, act, x[:1, :, :1, :1, :1])  # one value per channel: PyTorch raises for it
    handle = act.register_forward_hook(lambda *args: None)  # NASWOT observes the ReLUs
    assert not norm_act.fusable(norm, act, x)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert not norm_act.fusable(norm, act, x)
    handle.remove()
    assert norm_act.fusable(norm, act, x)


@needs_kernel
@pytest.mark.parametrize(("channels", "shape"), [(28, (2, 8, 6, 10)), (67, (2, 4, 4, 4)), (1, (3, 5, 6, 7))])
@pytest.mark.parametrize("training", [True, False])
def test_pooled_kernel_equals_the_pool_of_the_unfused_output_to_the_bit(channels, shape, training):
    # (3, 5, 6, 7): odd sides, whose last plane and column the pool's floor drops (they get a zero gradient)
    x, _, norm = inputs(channels, shape)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    norm.train(training)
    twin, act, pool = copy.deepcopy(norm), nn.ReLU(), AvgPool2()
    assert norm_act.pool2(pool, x)
    pooled_shape = (shape[0], channels, *(side // 2 for side in shape[1:]))
    upstream = torch.randn(pooled_shape).to(memory_format=CL)
    grads = []
    for run, bn in (("fused", norm), ("unfused", twin)):
        xg = x.clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            y = norm_act.norm_act_pool(bn, act, pool, xg) if run == "fused" else pool(norm_act.norm_act(bn, act, xg))
        assert y.shape == pooled_shape and y.is_contiguous(memory_format=CL)
        if training:
            y.backward(upstream)
            grads.append((y, xg.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var))
        else:
            grads.append((y,))
    for got, want in zip(*grads):
        assert torch.equal(got, want)


@needs_kernel
def test_what_the_pooled_kernel_must_not_run():
    x, _, norm = inputs(8)
    act = nn.ReLU()
    assert norm_act.pool2(nn.AvgPool3d(2), x) and norm_act.pool2(nn.AvgPool3d((2, 2, 2), stride=2), x)
    others = [nn.AvgPool3d(3), nn.AvgPool3d(2, stride=1), nn.AvgPool3d(2, padding=1), nn.AvgPool3d((2, 2, 1))]
    others += [nn.AvgPool3d(2, ceil_mode=True), nn.AvgPool3d(2, divisor_override=3), nn.MaxPool3d(2)]
    hooked = nn.AvgPool3d(2)
    hooked.register_forward_hook(lambda *args: None)
    for pool in [*others, hooked]:
        assert not norm_act.pool2(pool, x)
        torch.testing.assert_close(norm_act.norm_act_pool(norm, act, pool, x), pool(act(norm(x))))
    assert not norm_act.pool2(nn.AvgPool3d(2), x[:, :, :1])  # a side of 1: no window


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])  # on one thread PyTorch ran the 1x1x1 convs by its own NCDHW kernel
def test_a_densenets_transitions_run_the_pooled_kernel(monkeypatch, threads):
    calls = []
    real = norm_act.batch_norm_relu
    monkeypatch.setattr(norm_act, "batch_norm_relu", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = densenet().train()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model(torch.randn(2, 1, 12, 12, 12).to(memory_format=CL))
    finally:
        torch.set_num_threads(before)
    assert sum(call.get("pooled", False) for call in calls) == len(model.transitions) == 2
    assert len(calls) == 2 * 3 + len(model.transitions) + 3 + 1  # every layer, transition, side and the head fused


@needs_kernel
@pytest.mark.parametrize(
    ("backbone", "hparams", "shape"),
    [
        ("densenet3d", {"width": 0.25, "num_blocks": 3, "layers_per_block": 2}, (1, 12, 12, 12)),
        ("unet3d", {"width": 0.125}, (1, 16, 16, 16)),
        ("resnet3d", {"width": 0.125, "depth": 18}, (3, 8, 16, 16)),  # its stem's pair sat in a plain Sequential
    ],
)
def test_every_batchnorm_followed_by_a_relu_runs_the_kernel(monkeypatch, backbone, hparams, shape):
    model = place(preset_model("conv3d", backbone, **hparams), torch.device("cpu")).train()
    pairs, lone = 0, 0
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent)
            for a, b in zip(children, [*children[1:], None]):
                if isinstance(a, nn.BatchNorm3d):
                    pairs, lone = (pairs + 1, lone) if isinstance(b, nn.ReLU) else (pairs, lone + 1)
    calls = []
    real = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(torch.randn(2, *shape))
    assert pairs > 0 and len(calls) == lone  # PyTorch's BatchNorm ran only where no ReLU follows


@needs_kernel
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_the_kernel_reads_pieces_as_their_concatenation_to_the_bit(pooled, training):
    # a DenseNet block's features: the block input and each layer's output, never concatenated
    x, _, norm = inputs(34, (2, 6, 5, 8))
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    norm.train(training)
    twin, act, pool = copy.deepcopy(norm), nn.ReLU(), AvgPool2()
    split = [x[:, :5], x[:, 5:33], x[:, 33:]]  # 5, 28 and 1 channels
    split = [piece.contiguous(memory_format=CL).requires_grad_(training) for piece in split]
    whole = x.clone().requires_grad_(training)
    with torch.set_grad_enabled(training):
        assert norm_act.fusable(norm, act, split)
    results = []
    for features, bn in ((split, norm), (whole, twin)):
        with torch.set_grad_enabled(training):
            y = norm_act.norm_act_pool(bn, act, pool, features) if pooled else norm_act.norm_act(bn, act, features)
        results.append([y, bn.running_mean, bn.running_var])
        if training:
            y.backward(torch.ones_like(y).mul_(torch.arange(y.numel()).view_as(y) % 7 - 3))
            results[-1] += [bn.weight.grad, bn.bias.grad]
    for got, want in zip(*results):
        assert torch.equal(got, want)
    if training:
        assert torch.equal(torch.cat([piece.grad for piece in split], 1), whole.grad)
    # pieces that the kernel cannot read are concatenated for PyTorch's ops
    ncdhw = [split[0].detach().contiguous(), split[1].detach(), split[2].detach()]
    assert not norm_act.fusable(norm, act, ncdhw)
    norm.eval()
    with torch.no_grad():
        torch.testing.assert_close(norm_act.norm_act(norm, act, ncdhw), act(norm(torch.cat(ncdhw, 1))))


@needs_kernel
def test_a_densenets_blocks_hand_on_pieces_and_nothing_is_concatenated(monkeypatch):
    model = densenet().train()
    x = torch.randn(2, 1, 12, 12, 12).to(memory_format=CL)
    results = []
    for run in ("pieces", "concatenated"):
        if run == "concatenated":  # the block as it was: each layer's input concatenated
            monkeypatch.setattr(DenseBlock, "forward", lambda self, h: _concatenating_block(self, h))
        cats = []
        real = torch.cat
        monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or real(*a, **k))
        model.zero_grad()
        y = model(x)
        monkeypatch.setattr(torch, "cat", real)
        y.square().mean().backward()
        results.append((len(cats), y.detach(), [p.grad.clone() for p in model.parameters()]))
    (cats, y1, g1), (cats0, y0, g0) = results
    assert cats == 0 and cats0 == 2 * 3  # 3 blocks of 2 layers (the head joins the side outputs in both)
    assert torch.equal(y1, y0)  # the same values; the gradients differ in the order their sums are taken
    for got, want in zip(g1, g0):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@needs_kernel
def test_a_densenets_inference_of_one_sample_runs_the_fused_kernel_on_pieces(monkeypatch):
    # psc-search's latency objective times one sample. PyTorch runs the stem's conv of one 1-channel sample by its
    # own kernel, which returns NCDHW; that piece then had every layer of the first block concatenate its input and
    # run PyTorch's BatchNorm and ReLU.
    model = densenet().eval()
    x = torch.randn(1, 1, 12, 12, 12)
    cats = []
    real = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or real(*a, **k))
    with torch.inference_mode():
        y = model(x)
    monkeypatch.setattr(torch, "cat", real)
    assert cats == []
    with torch.inference_mode():
        torch.testing.assert_close(y, unfused(model)(x), rtol=1e-4, atol=1e-5)


def _concatenating_block(block: DenseBlock, h: torch.Tensor) -> torch.Tensor:
    h = norm_act.joined(h)
    for layer in block.layers:
        h = torch.cat([h, layer(h)], dim=1)
    return h


def densenet(**hparams) -> nn.Module:
    backbone = get_backbone("densenet3d")
    hparams = backbone.hparams({"width": 0.25, "num_blocks": 3, "layers_per_block": 2, **hparams})
    slots = backbone.slots(hparams)
    choices = [BlockChoice("csn_ip"), BlockChoice("csn_ir"), BlockChoice("conv3d")]
    config = ArchConfig("densenet3d", hparams, tuple(choices[i % 3] for i in range(len(slots))))
    torch.manual_seed(0)
    return place(backbone.build(config), torch.device("cpu"))


def unfused(model: nn.Module) -> nn.Module:
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, NormActSequential):
            module.fuse = False
    return plain


@needs_kernel
def test_a_densenet_trains_the_same_with_the_kernel_and_keeps_its_keys():
    model = densenet()
    assert all(m.fuse for m in model.modules() if isinstance(m, NormActSequential))
    plain = unfused(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 1, 12, 12, 12).to(memory_format=CL)
    results = []
    for net in (model, plain):
        net.train()
        y = net(x)
        y.square().mean().backward()
        results.append((y.detach(), {k: p.grad for k, p in net.named_parameters()}, dict(net.named_buffers())))
    (y1, g1, b1), (y0, g0, b0) = results
    torch.testing.assert_close(y1, y0, atol=1e-4, rtol=1e-4)
    for name in g0:  # float32 over a deep net, and ReLU masks that may flip at 0: compare whole tensors
        assert (g1[name] - g0[name]).norm() <= 1e-3 * g0[name].norm() + 1e-7, name
    for name in b0:
        torch.testing.assert_close(b1[name], b0[name], atol=1e-5, rtol=1e-5)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_naswot_still_sees_every_relu_and_the_reference_impl_keeps_pytorchs_ops():
    model = densenet().train()
    task, batch = SimpleNamespace(input_key="image"), {"image": torch.randn(4, 1, 8, 8, 8).to(memory_format=CL)}
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    seen = []
    handles = [m.register_forward_hook(lambda *args: seen.append(1)) for m in model.modules() if type(m) is nn.ReLU]
    model(batch["image"])
    assert len(seen) == relus  # hooked modules run as modules
    for handle in handles:
        handle.remove()
    assert zero_cost.naswot(model, task, batch) == pytest.approx(zero_cost.naswot(unfused(model), task, batch))
    with implementation("reference"):
        reference = densenet()
    assert not any(m.fuse for m in reference.modules() if isinstance(m, NormActSequential))


@needs_kernel
def test_tracing_records_pytorchs_own_ops():
    model = densenet().eval()
    x = torch.randn(1, 1, 8, 8, 8).to(memory_format=CL)
    traced = torch.jit.trace(model, x, check_trace=False)
    graph = str(traced.inlined_graph)
    assert "aten::batch_norm" in graph and "psc_nas::" not in graph and "PythonOp" not in graph
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)


def test_without_the_kernel_networks_run_pytorchs_ops():
    script = (
        "import torch\n"
        "from psc_nas.nets._layers import NormActSequential\n"
        "from psc_nas.ops import norm_act\n"
        "seq = NormActSequential(torch.nn.BatchNorm3d(3), torch.nn.ReLU())\n"
        "assert not seq.fuse and not norm_act.KERNEL.available()\n"
        "x = torch.randn(2, 3, 4, 4, 4).to(memory_format=torch.channels_last_3d)\n"
        "assert torch.equal(seq(x), torch.relu(seq[0](x)))\n"
        "print(norm_act.KERNEL.unavailable_reason())\n"
    )
    env = {**os.environ, native.DISABLE_VAR: "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"disabled by {native.DISABLE_VAR}"


def preset_model(name: str, backbone: str, **hparams) -> nn.Module:
    torch.manual_seed(0)
    return get_backbone(backbone).build(preset_config(name, backbone, **hparams))

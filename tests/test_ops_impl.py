"""Fast operator implementations: same parameters and same numbers as the reference GraphConv."""

from __future__ import annotations

import os
import subprocess
import sys
from math import prod
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops import channels, family_args, spatial, stride
from torch.utils.flop_counter import FlopCounterMode

from psc_nas import native
from psc_nas.device import place
from psc_nas.ops import (
    ENV_VAR,
    EXACT_IMPLS,
    FastGraphConv,
    GraphConv,
    create_op,
    depthwise,
    families,
    fast,
    implementation,
    make_spec,
    pwdw,
    tapconv,
)
from psc_nas.ops.cakes import shape_mask


def forward_backward(module: torch.nn.Module, x: torch.Tensor, upstream_seed: int) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    y = module(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(upstream_seed))
    y.backward(upstream)
    return (y, x.grad, *(p.grad for p in module.parameters()))


@settings(max_examples=40, deadline=None)
@given(cin=channels, cout=channels, size=spatial, stride=stride, batch=st.integers(1, 2), data=st.data())
def test_every_fast_impl_matches_the_reference_forward_and_gradients(cin, cout, size, stride, batch, data):
    op, args = data.draw(family_args(cin, cout))
    spec = make_spec(op, cin, cout, stride=stride, **args)
    reference = spec.build("reference")
    x = torch.randn(batch, cin, *size)
    expected = forward_backward(reference, x, upstream_seed=cin)
    impls = [i for i in EXACT_IMPLS if i != "reference"] + list(type(spec).impls)
    for impl in impls:
        fast = spec.build(impl)
        assert {k: v.shape for k, v in fast.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()
        }
        fast.load_state_dict(reference.state_dict())
        got = forward_backward(fast, x, upstream_seed=cin)
        assert len(got) == len(expected)
        for name, a, b in zip(["output", "input grad", *(n for n, _ in fast.named_parameters())], got, expected):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"{impl}: {name} differs by {(a - b).abs().max()}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", ["folded", "channels_last"])
def test_fast_impls_return_channels_last_3d(threads, impl):
    # On one thread PyTorch ran 1x1x1 convs of fewer than 16 samples by its own kernel, NCDHW out (seen 2026-12-02
    # under OMP_NUM_THREADS=1); oneDNN is now called directly (fast.direct_onednn).
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = create_op("pmscn", 4, 6, impl=impl, m=2, n=2)(torch.randn(2, 4, 5, 6, 7))
        z = create_op("conv3d", 4, 6, impl=impl, kernel_size=1)(torch.randn(3, 4, 5, 6, 7))
    finally:
        torch.set_num_threads(before)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and z.is_contiguous(
        memory_format=torch.channels_last_3d
    )


@pytest.mark.parametrize(
    ("op", "cin", "cout", "size"),
    [
        ("conv3d", 1, 8, (6, 6, 6)),  # a network's stem
        ("conv3d", 32, 16, (2, 4, 4)),  # a deep stage: 256 values in (N, C, D, H)
        ("p3d", 8, 8, (1, 6, 6)),  # a folded 1x3x3 conv of one plane: a 2D conv of one sample
    ],
)
@pytest.mark.parametrize("grad", [False, True])
def test_one_sample_runs_onednn_in_channels_last_with_reference_values_and_counted_macs(op, cin, cout, size, grad):
    # PyTorch runs a conv of one small sample by its own kernel, NCDHW out: downstream, a DenseNet3D then concatenated
    # and ran PyTorch's BatchNorm (test_norm_act), in the batch of one psc-search times as its latency objective.
    spec = make_spec(op, cin, cout)
    reference = spec.build("reference")
    fast = place(spec.build(), torch.device("cpu"))  # weights in channels_last_3d, as in a network
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(1, cin, *size)
    with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
        y = fast(x.requires_grad_(grad))
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert counter.get_total_flops() // 2 == spec.cost(size).macs
    expected = forward_backward(reference, x, upstream_seed=1)
    got = forward_backward(fast, x, upstream_seed=1)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "batch", "size", "bias"),
    [
        (256, 256, (3, 3, 3), (1, 1, 1), 2, (2, 1, 3), False),  # ResNet3D's last stage: 2 x 1 x 1 positions a clip
        (260, 300, (1, 3, 3), (1, 1, 1), 1, (3, 2, 2), True),  # a (2+1)D conv's 2D half, with a bias
        (256, 264, (3, 1, 1), (2, 2, 1), 3, (4, 3, 2), False),  # a 1D conv at stride 2
        (300, 256, (1, 1, 1), (1, 1, 1), 4, (2, 2, 2), False),  # a 1x1x1 conv: 32 rows
    ],
)
def test_a_wide_conv_over_few_positions_runs_as_one_product_with_the_convs_values(
    cin, cout, kernel, stride, batch, size, bias
):
    gen = torch.Generator().manual_seed(cin + cout)
    x = torch.randn(batch, cin, *size, dtype=torch.float64, generator=gen)
    w = torch.randn(cout, cin, *kernel, dtype=torch.float64, generator=gen)
    b = torch.randn(cout, dtype=torch.float64, generator=gen) if bias else None
    padding = [k // 2 for k in kernel]
    ref = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    reference = F.conv3d(ref[0], ref[1], ref[2], stride, padding)
    upstream = torch.randn(reference.shape, dtype=torch.float64, generator=gen)
    reference.backward(upstream)
    got_in = [t.float().contiguous(memory_format=torch.channels_last_3d) if t.dim() == 5 else t.float() for t in (x, w)]
    got_in = [t.requires_grad_() for t in got_in] + ([b.float().requires_grad_()] if bias else [None])
    assert fast.as_product(got_in[0], got_in[1], 1, stride, padding)
    with FlopCounterMode(display=False) as counter:
        got = fast.conv(got_in[0], got_in[1], got_in[2], stride, padding, 1, fold=True)
    assert {str(op) for op in counter.get_flop_counts()["Global"]} == {"aten.addmm" if bias else "aten.mm"}
    assert counter.get_total_flops() == 2 * reference.numel() * cin * prod(kernel)  # the conv's MACs
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    got.backward(upstream.float())
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=1e-4)
    for a, r in zip(got_in, ref):
        if a is not None:
            torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-3)


def test_under_cpu_autocast_fast_convs_run_in_bfloat16_as_conv3d_does():
    module = make_spec("p3d", 8, 8).build()
    x = torch.randn(2, 8, 4, 5, 6)
    assert fast.direct_onednn(x, module.convs[0].weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast.direct_onednn(x, module.convs[0].weight)
        y = module(x)
    assert y.dtype == torch.bfloat16


def test_the_product_rule_keeps_onednn_outside_its_measured_bounds():
    x = torch.randn(4, 256, 2, 2, 2).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(256, 256, 3, 3, 3).to(memory_format=torch.channels_last_3d)
    assert fast.as_product(x, w, 1, (1, 1, 1), (1, 1, 1))  # 32 rows, 256 -> 256
    assert not fast.as_product(x[:, :255], w[:, :255], 1, (1, 1, 1), (1, 1, 1))  # 255 input channels
    assert not fast.as_product(x, w[:255], 1, (1, 1, 1), (1, 1, 1))  # 255 output channels: a thin output
    assert not fast.as_product(torch.randn(5, 256, 3, 3, 3), w, 1, (1, 1, 1), (1, 1, 1))  # 135 rows
    assert fast.as_product(torch.randn(5, 256, 4, 4, 4), w, 1, (2, 2, 2), (1, 1, 1))  # 320 inputs, 40 outputs
    assert not fast.as_product(torch.randn(4, 256, 2, 2, 2), w[:, :128], 2, (1, 1, 1), (1, 1, 1))  # grouped
    assert not fast.as_product(x.double(), w.double(), 1, (1, 1, 1), (1, 1, 1))
    assert not fast.as_product(x, w, 1, (1, 1, 1), (0, 0, 0))  # not 'same' padding
    module = make_spec("conv3d", 256, 256).build()
    assert module.impl == "channels_last"
    traced = torch.jit.trace(module.eval(), x)  # a traced or exported graph keeps the conv
    assert "aten::mm" not in str(traced.inlined_graph) and "conv" in str(traced.inlined_graph)


@pytest.mark.parametrize("op", sorted(families()))
def test_auto_runs_the_analytic_macs_or_the_merge_it_declares(op):
    spec = make_spec(op, 8, 8)
    module = spec.build()
    assert module.impl == spec.fast_impl()
    assert type(module) is GraphConv if module.impl == "reference" else isinstance(module, FastGraphConv)
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(1, 8, 5, 5, 5))
    executed = spec.executed_ratio(module.impl) if module.impl in ("masked", "planes") else 1.0
    assert counter.get_total_flops() // 2 == pytest.approx(executed * spec.cost((5, 5, 5)).macs)
    assert sum(p.numel() for p in module.parameters()) == spec.cost((5, 5, 5)).params
    with implementation("reference"):  # what FlopCounterMode must count as the analytic cost, whatever the rule
        exact = spec.build()
    with FlopCounterMode(display=False) as counter:
        exact(torch.randn(1, 8, 5, 5, 5))
    assert counter.get_total_flops() // 2 == spec.cost((5, 5, 5)).macs


@pytest.mark.parametrize(
    ("cout", "allocation", "stride", "auto", "merged"),
    [
        (16, None, 1, "taps", "masked"),  # uniform: thin groups (oneDNN pads 2-3 channels to 16), masked 3.3x
        (28, None, 1, "taps", "masked"),  # a DenseNet3D slot
        (64, None, 1, "taps", "planes"),  # uniform from 64 channels: planes 1.3x
        (64, None, 2, "planes", "planes"),  # the kernel is stride 1
        (28, {"3x3x3": 28}, 1, "masked", "masked"),  # a full cube: oneDNN's dense conv
        (28, {"3x3x3": 24, "1x3x1": 4}, 1, "masked", "masked"),  # masked 1.15x: not worth the kernel
        (64, {"3x3x3": 60, "1x3x1": 4}, 1, "masked", "masked"),  # nearly a full cube: 1.06x at any width
        (32, {"1x1x3": 10, "1x3x1": 11, "3x1x1": 11}, 1, "taps", "planes"),  # 1D on every axis: planes is exact
        # groups of whole blocks of 16 channels (oneDNN pads by at most 1.2x): the per-shape convs, at any stride
        (32, {"1x1x3": 16, "1x3x1": 16}, 1, "channels_last", "channels_last"),
        (64, {"1x1x3": 32, "3x1x1": 32}, 1, "channels_last", "channels_last"),
        (32, {"1x3x3": 16, "3x3x1": 16}, 2, "channels_last", "channels_last"),
        (28, {"3x3x3": 14, "1x3x3": 14}, 1, "channels_last", "channels_last"),  # 16/14: padded 1.14x
        (64, {"3x3x3": 48, "1x1x3": 16}, 1, "channels_last", "channels_last"),
        (48, {"3x3x3": 24, "1x3x3": 24}, 1, "taps", "masked"),  # 24 channels run as 32: padded 1.33x
        (64, {"1x3x3": 22, "3x1x3": 21, "3x3x1": 21}, 1, "taps", "planes"),  # wide but ragged: 1.5x
    ],
)
def test_cakes_rule_picks_the_kernel_the_exact_convs_or_a_merge_by_padding_and_executed_macs(
    cout, allocation, stride, auto, merged
):
    spec = make_spec("cakes", 16, cout, stride=stride, **({"allocation": allocation} if allocation else {}))
    assert (spec.fast_impl(), spec.merged_impl()) == (auto, merged)
    module = spec.build()
    runs = "taps" if module.impl == "taps" else merged  # where the kernel cannot build, the merge runs
    assert module.impl == (auto if tapconv.KERNEL.available() or auto != "taps" else merged)
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(1, 16, 4, 4, 4))
    executed = 1.0 if runs in ("taps", "channels_last") else spec.executed_ratio(runs)
    assert counter.get_total_flops() // 2 / spec.cost((4, 4, 4)).macs == pytest.approx(executed)


@pytest.mark.parametrize(("impl", "executed_over_analytic"), [("masked", 27 / 9), ("planes", 81 / 63)])
def test_cakes_merges_execute_more_macs_than_the_analytic_cost(impl, executed_over_analytic):
    spec = make_spec("cakes", 7, 7)  # uniform allocation: one channel per shape
    with FlopCounterMode(display=False) as counter:
        spec.build(impl)(torch.randn(1, 7, 4, 4, 4))
    assert counter.get_total_flops() // 2 / spec.cost((4, 4, 4)).macs == pytest.approx(executed_over_analytic)
    assert spec.executed_ratio(impl) == pytest.approx(executed_over_analytic)


TAP_CASES = [
    # (C_in, allocation, size, batch, groups): chunks of 1-9 channels, every shape, planes narrower than a 64-position
    # block and wider than several, a W of 2 (a tail that ends inside the next plane's padding), batch > 1, grouped
    # convs (csn_ir's C_in != C_out; a run of taps across conv groups)
    (5, {"1x1x3": 1, "3x3x3": 2, "1x3x3": 3}, (4, 5, 6), 2, 1),
    (9, {"1x1x3": 2, "1x3x1": 2, "3x1x1": 2, "1x3x3": 2, "3x1x3": 1, "3x3x1": 1, "3x3x3": 1}, (2, 3, 2), 3, 1),
    (3, {"3x1x1": 9, "1x3x3": 5}, (7, 9, 19), 1, 1),
    (17, {"3x3x1": 4, "3x3x3": 7}, (3, 2, 40), 2, 1),
    (12, {"3x3x3": 8}, (5, 4, 6), 2, 4),
    (6, {"1x3x3": 3, "3x3x3": 6}, (3, 5, 2), 1, 3),
    # 16 input channels (one whole transposed block in the pack), W = 33 (two blocks and one position), D = 7: two
    # weight-gradient runs (the kernel's kRun = 1,024 positions and 864); (7, 9, 19) above: 1,024 and 549, the last
    # vector partial
    (16, {"3x3x3": 3, "1x3x3": 3, "1x1x3": 2}, (7, 6, 33), 2, 1),
    # one input channel (EM's stem) and one output channel: PyTorch gives (N, 1, D, H, W) NCDHW strides even as
    # channels_last_3d, which the pack reads in place
    (1, {"3x3x3": 2, "1x3x3": 1}, (4, 5, 6), 2, 1),
    (4, {"1x3x3": 1}, (3, 4, 5), 2, 1),
    # wide chunks (7-9 channels, blocks of 48 positions): 8 + 8 and 8 of a shape, one sample (the threads share its
    # D planes); (17, ...) above: a chunk of 4 beside one of 7 (7 in the weight gradient too), input-gradient chunks
    # of 9 + 8
    (10, {"1x3x3": 8, "3x3x3": 16}, (5, 6, 7), 1, 1),
    # 256 input channels: a plane's positions split into bands (the kernel's 1 MB for three planes of every input),
    # 8 channels a group
    (256, {"3x3x3": 256}, (3, 24, 24), 1, 32),
]


def cakes_weight(allocation, cin, generator):
    weight = torch.randn(sum(allocation.values()), cin, 3, 3, 3, generator=generator, dtype=torch.float64)
    rows = [
        torch.tensor([shape_mask(shape) >> t & 1 for t in range(27)]).repeat(n, 1) for shape, n in allocation.items()
    ]
    mask = torch.cat(rows)
    return weight * mask.view(-1, 1, 3, 3, 3), mask.view(-1, 1, 3, 3, 3).double()


@pytest.mark.skipif(not tapconv.KERNEL.available(), reason="the tap-conv C++ kernel could not be built here")
@pytest.mark.parametrize(("cin", "allocation", "size", "batch", "groups"), TAP_CASES)
def test_tap_conv_matches_a_float64_conv3d_of_the_masked_weight(cin, allocation, size, batch, groups):
    generator = torch.Generator().manual_seed(cin)
    weight, mask = cakes_weight(allocation, cin // groups, generator)
    x = torch.randn(batch, cin, *size, generator=generator, dtype=torch.float64)
    y_ref = torch.nn.functional.conv3d(x.requires_grad_(), weight.requires_grad_(), padding=1, groups=groups)
    upstream = torch.randn(y_ref.shape, generator=generator, dtype=torch.float64)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, weight), upstream)
    # the kernel's weight: the masked taps hold noise, which it must neither read nor give a gradient
    noisy = (weight + (1 - mask) * 7).float().detach().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    masks = [shape_mask(shape) for shape in allocation]
    y = tapconv.tap_conv3d(x32, noisy, list(allocation.values()), masks, groups)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    gx, gw = torch.autograd.grad(y, (x32, noisy), upstream.float())
    for name, got, want in (("output", y, y_ref), ("input grad", gx, gx_ref), ("weight grad", gw, gw_ref * mask)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 2e-6 * scale, name


@pytest.mark.skipif(not tapconv.KERNEL.available(), reason="the tap-conv C++ kernel could not be built here")
@pytest.mark.parametrize(("channels", "size"), [(33, (3, 4, 35)), (16, (2, 17, 16)), (5, (2, 3, 18))])
def test_pack_is_the_zero_padded_channel_major_volume(channels, size):
    # channels: two transposed blocks of 16 and one left over, one block, none; W: whole blocks of 16 and a rest
    x = torch.randn(2, channels, *size).contiguous(memory_format=torch.channels_last_3d)
    volume = tapconv.packed_volume(size)
    packed = tapconv.KERNEL.module().pack(x, volume)
    padded = torch.nn.functional.pad(x.contiguous(), (1, 1, 1, 1, 1, 1)).flatten(2)
    assert torch.equal(packed[..., : padded.shape[2]], padded)
    assert not packed[..., padded.shape[2] :].any()
    # a channel slice of a wider channels_last tensor (a DenseNet layer's share of a concatenation's gradient) packs
    # in place: its positions are 3 + channels + 2 floats apart
    wider = torch.cat([torch.randn(2, 3, *size), x, torch.randn(2, 2, *size)], 1)
    view = wider.contiguous(memory_format=torch.channels_last_3d)[:, 3 : 3 + channels]
    assert view.stride(1) == 1 and view.stride(4) == channels + 5
    assert torch.equal(tapconv.KERNEL.module().pack(view, volume), packed)


@pytest.mark.skipif(not tapconv.KERNEL.available(), reason="the tap-conv C++ kernel could not be built here")
def test_tap_conv_backward_of_a_channel_slice_of_a_concatenation():
    # y joins a concatenation, as in a DenseNet: its gradient reaches the backward as a strided channel slice
    cin, allocation, size, batch, groups = TAP_CASES[-3]  # 16 channels, W = 33
    generator = torch.Generator().manual_seed(7)
    weight, mask = cakes_weight(allocation, cin // groups, generator)
    x = torch.randn(batch, cin, *size, generator=generator)
    before = torch.randn(batch, 5, *size, generator=generator)
    masks = [shape_mask(shape) for shape in allocation]
    grads = []
    for run in ("kernel", "reference"):
        xg, wg = x.clone().requires_grad_(), weight.float().clone().requires_grad_()
        if run == "kernel":
            y = tapconv.tap_conv3d(xg, wg, list(allocation.values()), masks, groups)
        else:
            y = torch.nn.functional.conv3d(xg, wg, padding=1, groups=groups)
        joined = torch.cat([before, y], 1).contiguous(memory_format=torch.channels_last_3d)
        (joined * torch.arange(joined.shape[1]).view(1, -1, 1, 1, 1)).square().mean().backward()
        grads.append((xg.grad, wg.grad * mask.float()))  # the kernel gives the masked taps no gradient
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and an input that is itself a channel slice is read in place, with the same result as its copy
    view = torch.cat([before, x], 1).contiguous(memory_format=torch.channels_last_3d)[:, 5:]
    assert view.stride(1) == 1 and not view.is_contiguous(memory_format=torch.channels_last_3d)
    args = (weight.float(), list(allocation.values()), masks, groups)
    torch.testing.assert_close(tapconv.tap_conv3d(view, *args), tapconv.tap_conv3d(view.contiguous(), *args))


@pytest.mark.skipif(not tapconv.KERNEL.available(), reason="the tap-conv C++ kernel could not be built here")
def test_tap_conv_backward_fills_no_gradient_for_the_packed_input():
    # the op returns the packed input for its backward; autograd must not build a zero gradient of that size
    cin, allocation, size, batch, groups = TAP_CASES[-3]
    weight, _ = cakes_weight(allocation, cin // groups, torch.Generator().manual_seed(3))
    x = torch.randn(batch, cin, *size).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    y = tapconv.tap_conv3d(x, weight.float(), list(allocation.values()), [shape_mask(s) for s in allocation], groups)
    packed_shape = [batch, cin, tapconv.packed_volume(size)]
    with torch.profiler.profile(record_shapes=True) as profile:
        y.square().sum().backward()
    shapes = [(event.name, list(event.input_shapes[0])) for event in profile.events() if event.input_shapes]
    assert x.grad is not None and any("tap_conv3d" in name for name, _ in shapes)  # the backward ran, recorded
    assert [shape for name, shape in shapes if name == "aten::fill_" and shape == packed_shape] == []


@pytest.mark.skipif(not tapconv.KERNEL.available(), reason="the tap-conv C++ kernel could not be built here")
def test_thin_grouped_csn_runs_the_tap_kernel_from_16_cubed_with_exact_macs_and_traces_plain():
    spec = make_spec("csn_ir", 12, 8)  # groups = gcd = 4: 2 output channels a group
    module = spec.build()
    assert module.impl == "depthwise" and module.taps and not module.kernel
    for size, runs in (((16, 16, 16), True), ((8, 8, 8), False)):
        with FlopCounterMode(display=False) as counter:
            module(torch.randn(2, 12, *size))
        assert counter.get_total_flops() // 2 == 2 * spec.cost(size).macs
        assert ("psc_nas.tap_conv3d" in {str(op) for op in counter.get_flop_counts()["Global"]}) == runs
    module.eval()
    x = torch.randn(1, 12, 16, 16, 16)
    traced = torch.jit.trace(module, x)
    assert "tap_conv3d" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), module(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not tapconv.KERNEL.available(), reason="the tap-conv C++ kernel could not be built here")
@pytest.mark.parametrize(
    ("allocation", "size", "runs"),
    [
        ({"3x3x3": 21, "1x1x3": 7}, (8, 8, 8), False),  # groups of 7-21 below 16³: the exact per-shape convs
        ({"3x3x3": 21, "1x1x3": 7}, (16, 16, 16), True),
        (None, (8, 8, 8), True),  # uniform 28: groups of 4, the kernel at any size
    ],
)
def test_cakes_taps_runs_the_exact_convs_below_16_cubed_unless_the_groups_are_thin(allocation, size, runs):
    spec = make_spec("cakes", 12, 28, **({"allocation": allocation} if allocation else {}))
    module, reference = spec.build(), spec.build("reference")
    assert module.impl == "taps"
    module.load_state_dict(reference.state_dict())
    x = torch.randn(2, 12, *size)
    with FlopCounterMode(display=False) as counter:
        y = module(x)
    assert counter.get_total_flops() // 2 == 2 * spec.cost(size).macs
    assert ("psc_nas.tap_conv3d" in {str(op) for op in counter.get_flop_counts()["Global"]}) == runs
    torch.testing.assert_close(y, reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not tapconv.KERNEL.available(), reason="the tap-conv C++ kernel could not be built here")
def test_cakes_taps_counts_exactly_the_analytic_macs_and_traces_as_plain_convs():
    spec = make_spec("cakes", 7, 11)
    module = spec.build("taps")
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(2, 7, 4, 5, 6))
    assert counter.get_total_flops() // 2 == 2 * spec.cost((4, 5, 6)).macs
    assert "psc_nas.tap_conv3d" in {str(op) for op in counter.get_flop_counts()["Global"]}
    module.eval()
    x = torch.randn(1, 7, 4, 4, 4)
    traced = torch.jit.trace(module, x)  # a TorchScript file must load where psc-nas is not installed
    assert "tap_conv3d" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), module(x), rtol=1e-4, atol=1e-5)
    strided = make_spec("cakes", 7, 11, stride=2).build("taps")  # the kernel is stride 1: exact convs instead
    with FlopCounterMode(display=False) as counter:
        strided(torch.randn(1, 7, 4, 4, 4))
    assert "psc_nas.tap_conv3d" not in {str(op) for op in counter.get_flop_counts()["Global"]}


def test_reference_can_be_forced_by_argument_or_environment(monkeypatch):
    assert type(create_op("p3d", 4, 4, impl="reference")) is GraphConv
    monkeypatch.setenv(ENV_VAR, "reference")
    assert type(create_op("p3d", 4, 4)) is GraphConv
    assert type(create_op("p3d", 4, 4, impl="folded")) is FastGraphConv  # an argument beats the variable


@pytest.mark.parametrize(
    ("op", "impl", "message"), [("p3d", "fastest", "impl must be one of"), ("pmscn", "masked", "only applies to cakes")]
)
def test_unknown_or_misapplied_impl_raises(op, impl, message):
    with pytest.raises(ValueError, match=message):
        create_op(op, 4, 4, impl=impl)


# ---------------------------------------------------------------------- the depthwise C++ kernel
needs_kernel = pytest.mark.skipif(not depthwise.KERNEL.available(), reason="no C++ compiler: the fallback is tested")
DEPTHWISE_CASES = [  # (batch, channels, D, H, W, stride): odd sizes, strides 1 and 2, batch 1 and 3
    (1, 5, 5, 7, 9, (1, 1, 1)),
    (3, 16, 7, 5, 6, (1, 1, 1)),
    (1, 3, 9, 9, 7, (2, 2, 2)),
    (3, 8, 6, 7, 5, (2, 2, 2)),
    (3, 4, 5, 8, 7, (1, 2, 2)),
    (1, 6, 4, 6, 5, (2, 1, 1)),
    (2, 32, 5, 7, 6, (2, 2, 2)),
    (1, 16, 6, 5, 9, (1, 2, 2)),
    (2, 28, 6, 5, 7, (1, 1, 1)),  # DenseNet3D's growth: a full block of 16 channels and a masked one of 12
    (1, 20, 5, 6, 4, (2, 2, 2)),
    # W stride 1: the row-window weight gradient, by 1 / 2 blocks (three rows at once) and 3 / 4 blocks (one row), a
    # group of four blocks then a masked one (70 channels), rows of one and two columns, a D stride
    (2, 40, 5, 4, 6, (1, 1, 1)),
    (1, 64, 4, 5, 3, (2, 1, 1)),
    (2, 70, 4, 3, 2, (1, 1, 1)),
    (1, 20, 3, 4, 1, (1, 1, 1)),
]
# In float32 every case runs an AVX-512 weight gradient where the CPU has it (masked below 16 channels): the
# row-window kernel where the W stride is 1, else the column kernel; in float64 the generic loop.


def reference_grads(x, weight, stride, upstream):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    y = torch.nn.functional.conv3d(x, weight, None, stride, 1, 1, weight.shape[0])
    y.backward(upstream)
    return y, x.grad, weight.grad


@needs_kernel
@pytest.mark.parametrize(("batch", "channels", "d", "h", "w", "stride"), DEPTHWISE_CASES)
def test_depthwise_op_matches_conv3d_forward_and_both_gradients(batch, channels, d, h, w, stride):
    generator = torch.Generator().manual_seed(channels * d)
    x = torch.randn(batch, channels, d, h, w, generator=generator)
    weight = torch.randn(channels, 1, 3, 3, 3, generator=generator)
    y = depthwise.depthwise_conv3d(x, weight, list(stride))
    upstream = torch.randn(y.shape, generator=generator)
    expected = reference_grads(x, weight, stride, upstream)
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    got = depthwise.depthwise_conv3d(xg, wg, list(stride))
    got.backward(upstream)
    for name, a, b in zip(("output", "input grad", "weight grad"), (got, xg.grad, wg.grad), expected):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"{name} differs by {(a - b).abs().max()}"
    assert got.is_contiguous(memory_format=torch.channels_last_3d)


@needs_kernel
@pytest.mark.parametrize(("batch", "channels", "d", "h", "w", "stride"), DEPTHWISE_CASES)
def test_every_cpp_kernel_function_matches_conv3d_in_float64(batch, channels, d, h, w, stride):
    # The op runs oneDNN's forward (and its flipped-kernel input gradient at stride 1); the C++ forward and
    # input gradient are benchmarked too (benchmarks/roofline.py), so each is checked here on its own.
    generator = torch.Generator().manual_seed(channels + d)
    x = torch.randn(batch, channels, d, h, w, generator=generator, dtype=torch.float64)
    weight = torch.randn(channels, 1, 3, 3, 3, generator=generator, dtype=torch.float64)
    y_ref = torch.nn.functional.conv3d(x, weight, None, stride, 1, 1, channels)
    upstream = torch.randn(y_ref.shape, generator=generator, dtype=torch.float64)
    _, gx_ref, gw_ref = reference_grads(x, weight, stride, upstream)
    kernel = depthwise.KERNEL.module()
    taps = depthwise.taps_weight(weight)
    torch.testing.assert_close(kernel.dw_forward(x, taps, [3, 3, 3], list(stride)), y_ref)
    torch.testing.assert_close(kernel.dw_input_grad(upstream, taps, list(x.shape), [3, 3, 3], list(stride)), gx_ref)
    gw = kernel.dw_weight_grad(x, upstream, [3, 3, 3], list(stride)).t().reshape(weight.shape)
    torch.testing.assert_close(gw, gw_ref)


@needs_kernel
@pytest.mark.parametrize("op", ["csn_ip", "csn_ir"])
def test_csn_auto_runs_the_kernel_and_counts_exact_macs(op):
    spec = make_spec(op, 6, 6, stride=2)
    module = spec.build()
    assert module.impl == "depthwise" and module.kernel
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(3, 6, 5, 7, 6))
    assert counter.get_total_flops() // 2 == 3 * spec.cost((5, 7, 6)).macs  # batch 3, cost is per sample
    assert "psc_nas.depthwise_conv3d" in {str(op) for op in counter.get_flop_counts()["Global"]}


def test_without_the_kernels_depthwise_is_folded_and_cakes_merged_with_no_error(tmp_path):
    # A machine without a compiler: PSC_NAS_NO_EXTENSIONS=1 makes available() False, as a failed build does.
    script = (
        "import torch\n"
        "from psc_nas.ops import depthwise, make_spec\n"
        "spec = make_spec('csn_ir', 4, 4)\n"
        "m = spec.build(); ref = spec.build('reference'); m.load_state_dict(ref.state_dict())\n"
        "x = torch.randn(2, 4, 5, 5, 5)\n"
        "assert m.impl == 'depthwise' and not m.kernel and not depthwise.KERNEL.available(), m.kernel\n"
        "assert torch.allclose(m(x), ref(x), atol=1e-5)\n"
        "c = make_spec('cakes', 4, 8); mc = c.build(); rc = c.build('reference'); mc.load_state_dict(rc.state_dict())\n"
        "assert c.fast_impl() == 'taps' and mc.impl == c.merged_impl() == 'masked', mc.impl\n"
        "assert torch.allclose(mc(x), rc(x), atol=1e-5)\n"
        "assert not make_spec('csn_ir', 12, 8).build().taps\n"
        "ip = make_spec('csn_ip', 4, 4); mi = ip.build(); ri = ip.build('reference')\n"
        "mi.load_state_dict(ri.state_dict())\n"
        "assert not mi.fused\n"
        "with torch.no_grad(): assert torch.allclose(mi(x), ri(x), atol=1e-5)\n"
        "print(depthwise.KERNEL.unavailable_reason())\n"
    )
    env = {**os.environ, native.DISABLE_VAR: "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"disabled by {native.DISABLE_VAR}"


@needs_kernel
@pytest.mark.parametrize("op", ["csn_ir", "csn_ip"])
def test_inference_tracing_and_export_of_csn_hold_no_custom_op(op):
    # A TorchScript or ONNX file of a csn network must load where psc-nas is not installed.
    module = make_spec(op, 4, 4).build().eval()
    x = torch.randn(1, 4, 5, 5, 5)
    for grad in (True, False):  # traced in a no_grad block too, where inference would run the fused pair
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(module, x)
        assert "depthwise_conv3d" not in str(traced.inlined_graph)
        assert "pointwise_depthwise" not in str(traced.inlined_graph)
    exported = torch.export.export(module, (x,))
    assert "depthwise_conv3d" not in str(exported.graph) and "pointwise_depthwise" not in str(exported.graph)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    assert "psc_nas.depthwise_conv3d" not in {str(op) for op in counter.get_flop_counts()["Global"]}


needs_pwdw = pytest.mark.skipif(not pwdw.KERNEL.available(), reason="the fused 1x1x1 + depthwise kernel was not built")
PWDW_CASES = [  # (batch, C_in, C, (D, H, W), threads)
    (2, 16, 16, (6, 7, 5), 2),  # one block, W below the 8-column step
    (1, 5, 28, (4, 9, 11), 2),  # a block of 16 and a masked one of 12; batch 1: two bands, one a thread
    (3, 40, 33, (3, 3, 17), 2),  # three blocks, the last of one channel; W = 2 x 8 + 1
    (1, 70, 70, (3, 4, 9), 1),  # five blocks: a group of four, then one; one thread, one band
    (1, 8, 64, (3, 11, 200), 2),  # wide rows: bands of 4 rows (three buffer planes in 1 MiB), halos between bands
    (2, 3, 1, (1, 1, 1), 3),  # one position, one output channel, more threads than tasks
    (1, 124, 28, (2, 5, 8), 2),  # DenseNet3D's 124 -> 28; 2 x 5 positions of x per group of 8
]


@needs_pwdw
@pytest.mark.parametrize(("batch", "cin", "channels", "size", "threads"), PWDW_CASES)
def test_fused_pointwise_depthwise_matches_the_two_convs_and_their_gradients_in_float64(
    batch, cin, channels, size, threads
):
    generator = torch.Generator().manual_seed(cin * 1000 + channels)
    x = torch.randn(batch, cin, *size, generator=generator, dtype=torch.float64, requires_grad=True)
    w_pointwise = torch.randn(channels, cin, 1, 1, 1, generator=generator, dtype=torch.float64, requires_grad=True)
    w_depthwise = torch.randn(channels, 1, 3, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    expected = F.conv3d(F.conv3d(x, w_pointwise), w_depthwise, padding=1, groups=channels)
    upstream = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    expected.backward(upstream)
    leaves = [t.detach().float().requires_grad_() for t in (x, w_pointwise, w_depthwise)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = pwdw.pointwise_depthwise(*leaves)
        y.backward(upstream.float())
    finally:
        torch.set_num_threads(before)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected.detach(), rtol=0, atol=2e-6 * expected.abs().max().item())
    names = ("dx", "1x1x1 weights", "depthwise weights")
    for name, got, reference in zip(names, leaves, (x, w_pointwise, w_depthwise)):
        scale = reference.grad.abs().max().item()
        assert got.grad.shape == reference.grad.shape, name
        torch.testing.assert_close(got.grad.double(), reference.grad, rtol=0, atol=4e-6 * scale, msg=name)


@needs_pwdw
def test_fused_backward_skips_dx_where_the_input_needs_none():
    x = torch.randn(1, 6, 3, 4, 5)
    w_pointwise = torch.randn(9, 6, 1, 1, 1, requires_grad=True)
    w_depthwise = torch.randn(9, 1, 3, 3, 3, requires_grad=True)
    y = pwdw.pointwise_depthwise(x, w_pointwise, w_depthwise)
    (grad_pointwise, grad_depthwise) = torch.autograd.grad(y, (w_pointwise, w_depthwise), torch.ones_like(y))
    reference = [w.detach().double().requires_grad_() for w in (w_pointwise, w_depthwise)]
    y_ref = F.conv3d(F.conv3d(x.double(), reference[0]), reference[1], padding=1, groups=9)
    expected = torch.autograd.grad(y_ref, reference, torch.ones_like(y_ref))
    torch.testing.assert_close(grad_pointwise.double(), expected[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_depthwise.double(), expected[1], rtol=1e-5, atol=1e-4)
    assert x.grad is None


@needs_pwdw
def test_csn_ip_fuses_its_pair_in_training_and_inference_with_exact_macs_and_gradients():
    spec = make_spec("csn_ip", 6, 10)
    module, reference = spec.build(), spec.build("reference")
    module.load_state_dict(reference.state_dict())
    assert module.impl == "depthwise" and module.fused
    x = torch.randn(2, 6, 5, 7, 6)

    def ops_run(grad):
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
            y = module(x)
        assert counter.get_total_flops() // 2 == 2 * spec.cost((5, 7, 6)).macs
        torch.testing.assert_close(y, reference(x), rtol=1e-4, atol=1e-5)
        return {str(op) for op in counter.get_flop_counts()["Global"]}

    assert "psc_nas.pointwise_depthwise" in ops_run(False)
    assert "psc_nas.pointwise_depthwise" in ops_run(True)  # a training step: the fused forward and backward
    xs = [x.clone().requires_grad_() for _ in range(2)]
    upstream = torch.randn(2, 10, 5, 7, 6)
    for net, leaf in zip((module, reference), xs):
        net(leaf).backward(upstream)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-4)
    for (name, got), expected in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert not make_spec("csn_ip", 6, 10, stride=2).build().fused  # the kernel is stride 1 only
    assert make_spec("csn_ip", 6, pwdw.WIDEST).build().fused and not make_spec("csn_ip", 6, 80).build().fused

"""Backbones: analytic cost equals the built module exactly, shapes, anchors, errors, budgets."""

from __future__ import annotations

from math import prod

import pytest
import torch
from _families import block_choice
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError
from psc_nas.costs import Cost
from psc_nas.nets import fit_to_budget, get_backbone, validate
from psc_nas.nets.budget import WIDTH_GRID, with_width
from psc_nas.ops import implementation
from psc_nas.ops.cakes import highest_averages

CONV3D = BlockChoice("conv3d")


@st.composite
def random_config(draw, name: str, hparams: dict) -> ArchConfig:
    backbone = get_backbone(name)
    slots = backbone.slots(hparams)
    return ArchConfig(name, backbone.hparams(hparams), tuple(draw(block_choice(slot)) for slot in slots))


def measured(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    model.eval()  # batch statistics of a single sample at 1x1x1 would be undefined
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y = model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2, y


# Tiny widths on the CPU, with sides the pooling does not divide; full widths at the papers' input
# sizes on the meta device, where FlopCounterMode counts shapes without computing anything.
def sides(low: int, high: int, multiple: tuple[int, int, int] = (1, 1, 1)):
    return st.tuples(*[st.integers(low, high).map(lambda k, m=m: k * m) for m in multiple])


CASES = {
    "densenet3d-tiny": ("densenet3d", {"width": 0.1, "num_blocks": 3, "layers_per_block": 2}, sides(4, 9), "cpu"),
    "resnet18-tiny": ("resnet3d", {"depth": 18, "width": 0.05, "num_classes": 5}, sides(1, 9), "cpu"),
    "resnet50-tiny": ("resnet3d", {"depth": 50, "width": 0.05, "num_classes": 5}, sides(1, 9), "cpu"),
    "unet3d-tiny": ("unet3d", {"width": 0.1, "downsample": [[1, 2, 2], [2, 1, 2]]}, sides(1, 3, (2, 4, 4)), "cpu"),
    "densenet3d-paper": ("densenet3d", {}, st.just((64, 64, 64)), "meta"),
    "unet3d-paper": ("unet3d", {}, st.just((64, 64, 64)), "meta"),
    "resnet34-paper": ("resnet3d", {"depth": 34}, st.just((64, 64, 64)), "meta"),
    "resnet50-paper": ("resnet3d", {"depth": 50}, st.just((16, 112, 112)), "meta"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_cost_is_exact_for_random_choices_of_every_family_and_sizes(case, data):
    name, hparams, spatial_strategy, device = CASES[case]
    config = data.draw(random_config(name, hparams))
    spatial = data.draw(spatial_strategy)
    backbone = get_backbone(name)
    with torch.device(device), implementation("reference"):  # the MAC-exact convs (the rule may merge CAKES)
        params, macs, y = measured(backbone.build(config), torch.randn(1, config.hparams["in_channels"], *spatial))
    assert backbone.cost(config, spatial) == Cost(params, macs)
    num_classes = config.hparams["num_classes"]
    assert tuple(y.shape) == ((1, num_classes) if name == "resnet3d" else (1, num_classes, *spatial))


def meta_params(config: ArchConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in get_backbone(config.backbone).build(config).parameters())


def test_densenet_defaults_match_the_paper_scale():
    backbone = get_backbone("densenet3d")
    config = backbone.uniform(CONV3D)
    assert [slot.convs for slot in backbone.slots({})] == [1] * 20
    assert backbone.cost(config, (64, 64, 64)).params == meta_params(config) == 5_164_524


def test_resnet34_all_conv3d_has_the_papers_64m_parameters():
    """The breakdown of 63,527,717 is in psc_nas/nets/resnet3d.py's docstring."""
    config = get_backbone("resnet3d").uniform(CONV3D, depth=34, num_classes=101)
    assert get_backbone("resnet3d").cost(config, (64, 64, 64)).params == meta_params(config) == 63_527_717


@pytest.mark.parametrize(("depth", "slots", "convs"), [(18, 8, 2), (34, 16, 2), (50, 16, 1)])
def test_resnet_slots_are_basic_pairs_or_bottleneck_middles(depth, slots, convs):
    found = get_backbone("resnet3d").slots({"depth": depth})
    assert [s.convs for s in found] == [convs] * slots
    strided = [s.name for s in found if s.stride != (1, 1, 1)]
    assert strided == ["conv3.block0", "conv4.block0", "conv5.block0"]


def test_joint_pmscn_replaces_a_double_conv_with_one_op():
    backbone = get_backbone("unet3d")
    joint = backbone.uniform(BlockChoice("pmscn", {"m": 2, "n": 2}))
    per_conv = backbone.uniform(BlockChoice("pmscn", {"m": 2, "n": 1}))
    assert len(backbone.slots({})) == 9
    assert backbone.cost(joint, (16, 16, 16)).params < backbone.cost(per_conv, (16, 16, 16)).params


@pytest.mark.parametrize(
    ("name", "spatial", "message"),
    [("densenet3d", (64, 15, 64), "at least 16"), ("unet3d", (64, 40, 64), "divisible by .*16, 16, 16")],
)
def test_unsupported_input_sizes_are_rejected(name, spatial, message):
    backbone = get_backbone(name)
    config = backbone.uniform(CONV3D)
    with pytest.raises(ValueError, match=message):
        backbone.cost(config, spatial)
    with pytest.raises(ValueError, match=message):
        backbone.build(config)(torch.zeros(1, 1, *spatial, device="meta"))


def test_config_errors_name_the_bad_field():
    densenet = get_backbone("densenet3d")
    config = densenet.uniform(CONV3D)
    with pytest.raises(ConfigError, match="^blocks: densenet3d has 20 searchable slots, the config gives 19"):
        validate(config.with_blocks(config.blocks[:-1]))
    bad = list(config.blocks)
    bad[3] = BlockChoice("cakes", {"allocation": {"3x3x3": 5}})
    with pytest.raises(ConfigError, match=r"^blocks\[3\]: cakes: allocation counts must sum to out_channels=28"):
        validate(config.with_blocks(bad))
    with pytest.raises(ConfigError, match="^backbone: config is for 'densenet3d', not 'unet3d'"):
        get_backbone("unet3d").build(config)
    with pytest.raises(ConfigError, match="^hparams.depth: must be one of"):
        get_backbone("resnet3d").slots({"depth": 101})
    with pytest.raises(ConfigError, match="^hparams.width: must be a positive finite number"):
        densenet.slots({"width": 0})
    with pytest.raises(ConfigError, match="^hparams.width: must be a positive finite number, got inf"):
        densenet.slots({"width": float("inf")})  # found by the psc-train config fuzz test (an OverflowError)
    with pytest.raises(ConfigError, match="^hparams.downsample"):
        get_backbone("unet3d").slots({"downsample": [[2, 2]]})


# ---------------------------------------------------------------- fit_to_budget
CAKES_EVERYWHERE = BlockChoice("cakes", {"allocation": {"1x3x3": 1, "3x1x1": 1, "3x3x3": 2}})


def cakes_config() -> ArchConfig:
    """resnet3d-18 at width 1/16 (4 channels in conv2), CAKES with explicit allocations."""
    backbone = get_backbone("resnet3d")
    hparams = backbone.hparams({"depth": 18, "width": 0.0625})
    slots = backbone.slots(hparams)
    blocks = [CAKES_EVERYWHERE if slot.out_channels == 4 else BlockChoice("cakes") for slot in slots]
    return ArchConfig("resnet3d", hparams, tuple(blocks))


@pytest.mark.parametrize(
    ("config", "budget", "shape"),
    [
        (
            get_backbone("densenet3d").uniform(BlockChoice("pmscn", {"m": 2, "n": 2})),
            {"params": 1_000_000},
            (32, 32, 32),
        ),
        (get_backbone("unet3d").uniform(CONV3D), {"macs": 2 * 10**9, "params": 5_000_000}, (1, 1, 16, 32, 32)),
        (cakes_config(), {"params": 2_500_000}, (8, 64, 64)),
    ],
    ids=["densenet-params", "unet-both", "resnet-cakes"],
)
def test_fit_to_budget_uses_the_budget_up_to_one_width_step(config, budget, shape):
    fitted = fit_to_budget(config, input_shape=shape, **budget)
    backbone = get_backbone(config.backbone)
    validate(fitted)
    assert backbone.cost(fitted, shape[-3:]).fits(**budget)
    wider = with_width(fitted, fitted.hparams["width"] + 1 / WIDTH_GRID)
    assert not backbone.cost(wider, shape[-3:]).fits(**budget)


def test_fit_to_budget_rescales_cakes_allocations_proportionally():
    fitted = fit_to_budget(cakes_config(), params=2_500_000, input_shape=(8, 64, 64))
    allocation = dict(fitted.blocks[0].args["allocation"])
    out_channels = get_backbone("resnet3d").slots(fitted.hparams)[0].out_channels
    assert sum(allocation.values()) == out_channels > 4
    assert allocation["3x3x3"] >= allocation["1x3x3"] + allocation["3x1x1"] - 1  # 2:1:1 kept


def test_fit_to_budget_rejects_budgets_it_cannot_meet():
    config = get_backbone("densenet3d").uniform(CONV3D)
    with pytest.raises(ValueError, match="budget too small"):
        fit_to_budget(config, params=1000, input_shape=(32, 32, 32))
    with pytest.raises(ValueError, match="needs a budget"):
        fit_to_budget(config, input_shape=(32, 32, 32))


def test_highest_averages_keeps_the_sum_and_never_shrinks_a_share_as_seats_grow():
    weights = {"a": 5, "b": 3, "c": 1, "d": 0}
    previous = dict.fromkeys(weights, 0)
    for seats in range(1, 40):
        shares = highest_averages(weights, seats)
        assert sum(shares.values()) == seats and shares["d"] == 0
        assert all(shares[k] >= previous[k] for k in weights)
        previous = shares


@pytest.mark.parametrize("shape", [(2, 5, 8, 6, 4), (1, 3, 7, 5, 9), (1, 2, 2, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_densenet_pooling_keeps_channels_last_and_equals_avg_pool3d(shape, dtype):
    from psc_nas.nets._layers import AvgPool2

    pool = AvgPool2()
    x = torch.randn(shape, dtype=dtype)
    weights = torch.randn(pool(x).shape, dtype=dtype)  # a backward that tells windows apart
    ref_in = x.clone().requires_grad_()
    reference = torch.nn.functional.avg_pool3d(ref_in, 2)
    (reference * weights).sum().backward()
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        got_in = x.clone(memory_format=layout).requires_grad_()
        got = pool(got_in)
        (got * weights).sum().backward()
        torch.testing.assert_close(got, reference)
        torch.testing.assert_close(got_in.grad, ref_in.grad)
        if layout == torch.channels_last_3d:
            assert got.is_contiguous(memory_format=layout)
            assert got_in.grad.is_contiguous(memory_format=layout)
    # An NCDHW input takes avg_pool3d itself: the same values, bit for bit.
    assert torch.equal(pool(x), torch.nn.functional.avg_pool3d(x, 2))


def test_a_placed_densenet_keeps_channels_last_through_its_transitions():
    from psc_nas.device import place

    backbone = get_backbone("densenet3d")
    hparams = backbone.hparams({"width": 0.1, "num_blocks": 3, "layers_per_block": 1})
    config = ArchConfig("densenet3d", hparams, tuple(CONV3D for _ in backbone.slots(hparams)))
    model = place(backbone.build(config), torch.device("cpu"))
    layouts = []
    for transition in model.transitions:
        transition.register_forward_hook(
            lambda module, inputs, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last_3d))
        )
    model(torch.randn(2, 1, 8, 8, 8)).sum().backward()
    assert layouts == [True, True]


def test_densenet_transition_pools_before_its_conv_and_keeps_the_paper_orders_keys():
    from psc_nas.nets.densenet3d import Transition

    backbone = get_backbone("densenet3d")
    hparams = backbone.hparams({"width": 0.2, "num_blocks": 2, "layers_per_block": 1})
    config = ArchConfig("densenet3d", hparams, tuple(CONV3D for _ in backbone.slots(hparams)))
    model = backbone.build(config).eval()
    (transition,) = model.transitions
    assert isinstance(transition, Transition)
    assert [name for name, _ in transition.named_parameters()] == ["0.weight", "0.bias", "2.convs.0.weight"]
    norm, activation, conv, pool = transition
    x = torch.randn(2, norm.num_features, 6, 7, 4, dtype=torch.float64)
    transition.double()
    # The paper's order, conv then pool: the same function (the two linear maps commute).
    torch.testing.assert_close(transition(x), pool(conv(activation(norm(x)))))


@pytest.mark.parametrize(("factor", "batch", "size"), [((2, 2, 2), 1, (3, 4, 5)), ((1, 2, 2), 2, (2, 3, 1))])
def test_unet_upconv_is_the_transposed_conv_as_a_product_in_channels_last(factor, batch, size):
    from psc_nas.nets.unet3d import UpConv

    up = UpConv(6, 5, factor, stride=factor, bias=False)
    plain = torch.nn.ConvTranspose3d(6, 5, factor, stride=factor, bias=False)
    assert list(up.state_dict()) == list(plain.state_dict())
    x = torch.randn(batch, 6, *size, dtype=torch.float64)
    out_shape = (batch, 5, *(s * f for s, f in zip(size, factor)))
    weights = torch.randn(out_shape, dtype=torch.float64)  # a backward that tells outputs apart
    ref_in, ref_w = x.clone().requires_grad_(), up.weight.detach().double().requires_grad_()
    reference = torch.nn.functional.conv_transpose3d(ref_in, ref_w, None, factor)
    (reference * weights).sum().backward()
    got_in = x.float().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    up.to(memory_format=torch.channels_last_3d)  # as psc_nas.device.place stores it
    assert up.as_product(got_in)
    with FlopCounterMode(display=False) as counter:
        got = up(got_in)
    (got * weights.float()).sum().backward()
    assert got.shape == out_shape and got.is_contiguous(memory_format=torch.channels_last_3d)
    assert counter.get_total_flops() == 2 * 6 * 5 * factor[0] * factor[1] * factor[2] * batch * prod(size)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_in.grad.double(), ref_in.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up.weight.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-5)
    traced = torch.jit.trace(up, got_in)  # a traced or exported graph keeps the transposed conv
    assert "aten::mm" not in str(traced.inlined_graph) and "conv" in str(traced.inlined_graph)
    assert not up.as_product(x)  # float64 runs the transposed conv itself


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [((2, 2, 2), (32, 32, 32)), ((4, 3, 5), (16, 12, 7)), ((5, 7, 1), (11, 7, 3)), ((6, 6, 6), (6, 6, 6))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_densenet_upsampling_equals_trilinear_interpolate(size_in, size_out, dtype):
    from psc_nas.nets._layers import interpolation_matrix, upsample_trilinear

    x = torch.randn(2, 3, *size_in, dtype=dtype)
    weights = torch.randn(2, 3, *size_out, dtype=dtype)  # a backward that tells outputs apart
    ref_in = x.clone().requires_grad_()
    reference = torch.nn.functional.interpolate(ref_in, size=size_out, mode="trilinear", align_corners=False)
    (reference * weights).sum().backward()
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}  # grads sum up to 4096 terms
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        got_in = x.clone(memory_format=layout).requires_grad_()
        got = upsample_trilinear(got_in, size_out)
        (got * weights).sum().backward()
        torch.testing.assert_close(got, reference, **tolerance)
        torch.testing.assert_close(got_in.grad, ref_in.grad, **tolerance)
        assert got.is_contiguous(memory_format=torch.channels_last_3d) == (layout == torch.channels_last_3d)
    for size in (*size_in, *size_out):
        assert torch.allclose(interpolation_matrix(size, 9, torch.float64).sum(1), torch.ones(9, dtype=torch.float64))

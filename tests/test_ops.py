"""Operator families: shapes, exact analytic cost, and clear errors for bad arguments."""

from __future__ import annotations

import pytest
import torch
from _families import block_choice
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from psc_nas.arch import Slot
from psc_nas.ops import create_op, families, make_spec
from psc_nas.ops.pmscn import subspace_width

channels = st.integers(1, 24)
spatial = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))
stride = st.one_of(st.sampled_from([1, 2]), st.tuples(*[st.integers(1, 2)] * 3))


@st.composite
def family_args(draw, cin: int, cout: int) -> tuple[str, dict]:
    """Any registered family and valid arguments for a ``cin -> cout`` conv."""
    choice = draw(block_choice(Slot("drawn", cin, cout)))
    return choice.op, dict(choice.args)


def measured(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    with FlopCounterMode(display=False) as counter:
        y = module(x)
    return sum(p.numel() for p in module.parameters()), counter.get_total_flops() // 2, y


@settings(max_examples=150, deadline=None)
@given(cin=channels, cout=channels, size=spatial, stride=stride, data=st.data())
def test_analytic_cost_equals_parameters_and_flop_counter(cin, cout, size, stride, data):
    op, args = data.draw(family_args(cin, cout))
    spec = make_spec(op, cin, cout, stride=stride, **args)
    params, macs, y = measured(spec.build("reference"), torch.randn(1, cin, *size))  # the MAC-exact convs
    cost = spec.cost(size)
    assert (cost.params, cost.macs) == (params, macs)
    assert tuple(y.shape) == (1, cout, *spec.out_spatial(size))


@pytest.mark.parametrize("op", sorted(families()))
@pytest.mark.parametrize("stride", [1, 2, (1, 2, 2)])
def test_every_family_keeps_the_conv3d_output_shape(op, stride):
    x = torch.randn(2, 8, 7, 8, 9)
    reference = create_op("conv3d", 8, 12, stride=stride)(x)
    assert create_op(op, 8, 12, stride=stride)(x).shape == reference.shape


def test_pmscn_width_follows_eq5_of_the_paper_split_over_streams():
    assert subspace_width(64, 64) == (64 * 64 * 27) // (64 * 9 + 64 * 3) == 144
    spec = make_spec("pmscn", 64, 64, m=2, n=1)
    assert spec.stream_width == 72
    # one stream at eq. 5 width has (nearly) the parameters of the 3D conv it replaces
    assert abs(make_spec("p3d", 64, 64).cost((4, 4, 4)).params - 64 * 64 * 27) / (64 * 64 * 27) < 0.01


def test_pmscn_streams_use_their_orientation_and_n_planes():
    spec = make_spec("pmscn", 4, 6, m=2, n=3, orientations=["3x3x1", "1x3x3"])
    graph = spec.graph()
    kernels = [[conv.kernel for conv in graph.path(index)] for index in graph.outputs]
    assert kernels == [[(3, 3, 1)] * 3 + [(1, 1, 3)], [(1, 3, 3)] * 3 + [(3, 1, 1)]]
    assert [graph.nodes[index].conv.out_channels for index in graph.outputs] == [3, 3]
    assert all(node.relu == (node.source >= 0) for node in graph.nodes)  # ReLU between, none first


def test_cakes_allocation_is_canonical_and_drops_empty_shapes():
    spec = make_spec("cakes", 4, 5, allocation={"3x3x3": 2, "1x1x3": 3, "1x3x3": 0})
    assert spec.args() == {"allocation": {"1x1x3": 3, "3x3x3": 2}}
    assert [node.conv.kernel for node in spec.graph().nodes] == [(1, 1, 3), (3, 3, 3)]


def test_csn_ir_is_depthwise_when_widths_match():
    (node,) = make_spec("csn_ir", 16, 16).graph().nodes
    assert node.conv.groups == 16
    (node,) = make_spec("csn_ir", 16, 24).graph().nodes
    assert node.conv.groups == 8


@pytest.mark.parametrize(
    ("op", "cin", "cout", "args", "stride", "expected"),
    [
        # 16 -> 18 (1x3x3) and 18 -> 8 (3x1x1) per stream: oneDNN computes 32 and 16 output channels.
        ("pmscn", 16, 16, {"m": 2, "n": 1}, 1, (32 * 16 * 9 + 16 * 18 * 3) / (18 * 16 * 9 + 8 * 18 * 3)),
        ("p3d", 64, 64, {}, 1, 1.0),  # 64 -> 144 -> 64: whole blocks
        # stride 2: 16 -> 36 (48 computed; 16 x 9 MACs each) at 16 x 8 x 8 outputs, then 36 -> 16 (36 x 3) at 8³
        ("p3d", 16, 16, {}, 2, (48 * 144 * 1024 + 16 * 108 * 512) / (36 * 144 * 1024 + 16 * 108 * 512)),
        ("csn_ir", 20, 20, {}, 1, 32 / 20),  # depthwise: the channels as a whole
        ("csn_ir", 16, 28, {}, 1, 16 / 7),  # four groups of 7 outputs, each a block of 16
        ("cakes", 28, 28, {}, 1, 4.0),  # seven shapes of 4 channels
        ("conv3d", 16, 16, {}, 1, 1.0),
    ],
)
def test_blocked_ratio_rounds_output_channels_to_onednn_blocks(op, cin, cout, args, stride, expected):
    spec = make_spec(op, cin, cout, stride=stride, **args)
    assert spec.graph().blocked_ratio((16, 16, 16)) == pytest.approx(expected)
    if op == "cakes":
        assert spec.padded_ratio() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("op", "args", "field"),
    [
        ("pmscn", {"m": 4}, "m must be one of [1, 2, 3]"),
        ("pmscn", {"n": 0}, "n must be one of [1, 2, 3]"),
        ("pmscn", {"n": 1.0}, "n must be one of [1, 2, 3], got 1.0"),  # found by the psc-train config fuzz test
        ("pmscn", {"m": 2.0}, "m must be one of [1, 2, 3], got 2.0"),
        ("pmscn", {"m": 2, "orientations": ["1x3x3"]}, "orientations must hold m=2"),
        ("pmscn", {"m": 1, "orientations": ["2x2x2"]}, "orientations must be a list of distinct values"),
        ("pmscn", {"m": 2, "orientations": ["1x3x3", "1x3x3"]}, "distinct"),
        ("pmscn", {"mid_channels": 0}, "mid_channels must be"),
        ("p3d", {"orientation": "3x3x3"}, "orientation must be one of"),
        ("cakes", {"allocation": {"3x3x3": 3}}, "must sum to out_channels=8"),
        ("cakes", {"allocation": {"5x5x5": 8}}, "unknown shape"),
        ("cakes", {"allocation": {"3x3x3": -1, "1x1x3": 9}}, "non-negative int"),
        ("conv3d", {"kernel_size": 2}, "kernel_size must be odd"),
        ("conv3d", {"padding": 1}, "unknown argument"),
        ("sepconv", {}, "op must be one of"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(op, args, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        make_spec(op, 4, 8, **args)


@pytest.mark.parametrize(
    ("cin", "cout", "message"), [(0, 8, "in_channels"), (4, -1, "out_channels"), (4.5, 8, "in_channels")]
)
def test_bad_channel_counts_raise(cin, cout, message):
    with pytest.raises(ValueError, match=message):
        make_spec("conv3d", cin, cout)


def test_pmscn_needs_as_many_output_channels_as_streams():
    with pytest.raises(ValueError, match="out_channels must be at least m=3"):
        make_spec("pmscn", 4, 2, m=3)


def test_bad_stride_is_named():
    with pytest.raises(ValueError, match="stride"):
        make_spec("csn_ip", 4, 4, stride=0)

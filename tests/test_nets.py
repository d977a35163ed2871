"""Backbones: analytic cost equals the built module exactly, shapes, anchors, errors, budgets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError
from psc_nas.nets import get_backbone
from psc_nas.nets.base import Slot
from psc_nas.ops import ORIENTATIONS, SHAPES

CONV3D = BlockChoice("conv3d")


@st.composite
def choice_for(draw, slot: Slot) -> BlockChoice:
    """A valid random choice of any family for ``slot``."""
    op = draw(st.sampled_from(["conv3d", "p3d", "pmscn", "cakes", "csn_ip", "csn_ir"]))
    if op == "p3d":
        return BlockChoice(op, {"orientation": draw(st.sampled_from(ORIENTATIONS))})
    if op == "pmscn":
        m = draw(st.integers(1, 3))
        orientations = list(draw(st.permutations(ORIENTATIONS))[:m])
        return BlockChoice(op, {"m": m, "n": draw(st.integers(1, 3)), "orientations": orientations})
    if op == "cakes":
        cuts = sorted(draw(st.lists(st.integers(0, slot.out_channels), min_size=len(SHAPES) - 1, max_size=len(SHAPES) - 1)))
        counts = [b - a for a, b in zip([0, *cuts], [*cuts, slot.out_channels])]
        return BlockChoice(op, {"allocation": dict(zip(SHAPES, counts))})
    return BlockChoice(op)


@st.composite
def random_config(draw, name: str, hparams: dict) -> ArchConfig:
    backbone = get_backbone(name)
    slots = backbone.slots(hparams)
    return ArchConfig(name, backbone.hparams(hparams), tuple(draw(choice_for(slot)) for slot in slots))


def measured(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    model.eval()  # batch statistics of a single sample at 1x1x1 would be undefined
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y = model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2, y


def check_exact_cost(config: ArchConfig, spatial: tuple[int, int, int]) -> torch.Tensor:
    backbone = get_backbone(config.backbone)
    model = backbone.build(config)
    params, macs, y = measured(model, torch.randn(1, config.hparams["in_channels"], *spatial))
    cost = backbone.cost(config, spatial)
    assert (cost.params, cost.macs) == (params, macs)
    return y


# ---------------------------------------------------------------- densenet3d
TINY_DENSENET = {"width": 0.1, "num_blocks": 3, "layers_per_block": 2}


@settings(max_examples=25, deadline=None)
@given(data=st.data(), spatial=st.tuples(*[st.integers(4, 9)] * 3))
def test_densenet_cost_is_exact_for_random_choices_and_sizes(data, spatial):
    config = data.draw(random_config("densenet3d", TINY_DENSENET))
    y = check_exact_cost(config, spatial)
    assert tuple(y.shape) == (1, 4, *spatial)


def test_densenet_defaults_match_the_paper_scale():
    backbone = get_backbone("densenet3d")
    config = backbone.uniform(CONV3D)
    assert len(config.blocks) == 20
    assert all(slot.convs == 1 for slot in backbone.slots({}))
    assert backbone.cost(config, (64, 64, 64)).params == 5_164_524
    with torch.device("meta"):
        assert sum(p.numel() for p in backbone.build(config).parameters()) == 5_164_524


def test_densenet_rejects_inputs_smaller_than_its_pooling():
    backbone = get_backbone("densenet3d")
    with pytest.raises(ValueError, match="at least 16"):
        backbone.cost(backbone.uniform(CONV3D), (64, 15, 64))

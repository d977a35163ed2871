"""A new op family defined here, in a test file only, runs through everything psc-nas does with a family.

The family is GhostNet-style (Han et al. 2020): a primary conv makes about half of the output
channels, a cheap depthwise 3x3x3 conv reading the primary's output makes the rest, and the two
are concatenated. Its cheap conv reads another conv's output, which parallel streams could not
express; the conv graph can. It is registered the way a third-party module registers a family,
by calling the registry, and is then priced, sampled from a space YAML, searched, drawn by the
dashboard and exported, with no edit to psc_nas/.

    x ─ primary conv kxkxk (C_in→P, stride) ─┬──────────────────────────────────┐
                                             └─ ReLU ─ dw 3x3x3 (P→C-P) ────────┴─ concat ─► y
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops import measured, spatial, stride
from test_ops_impl import forward_backward
from torch.utils.flop_counter import FlopCounterMode

import psc_nas
from psc_nas.arch import ArchConfig, BlockChoice, ConfigError, Slot
from psc_nas.dashboard import payload
from psc_nas.export import export
from psc_nas.nets import fit_to_budget, get_backbone
from psc_nas.ops import (
    EXACT_IMPLS,
    ConvGraph,
    Node,
    OpDomain,
    OpFamily,
    OpSpec,
    families,
    make_spec,
    register_family,
    summary,
)
from psc_nas.ops._conv import ConvSpec
from psc_nas.ops.domain import Choice, Pick, check_keys, int_choices
from psc_nas.ops.registry import FAMILIES
from psc_nas.results import Run
from psc_nas.space import SearchSpace, shipped_spaces

SPATIAL = (32, 32, 32)  # the ibsr task's input size, at which its search prices


# ---------------------------------------------------------------------- the family, in full
@dataclass(frozen=True)
class GhostSpec(OpSpec):
    family = "ghost"

    kernel: int = 1  # the primary conv's cube side

    def validate(self) -> None:
        if self.kernel not in (1, 3) or isinstance(self.kernel, bool):
            raise ValueError(f"ghost: kernel must be one of [1, 3], got {self.kernel!r}")
        if self.out_channels < 2:
            raise ValueError(f"ghost: out_channels must be at least 2 (primary and cheap), got {self.out_channels}")

    def graph(self) -> ConvGraph:
        cheap = self.out_channels // 2
        primary = self.out_channels - cheap
        return ConvGraph(
            nodes=(
                Node(ConvSpec(self.in_channels, primary, (self.kernel,) * 3, self.stride)),
                Node(ConvSpec(primary, cheap, (3, 3, 3), groups=gcd(primary, cheap)), source=0, relu=True),
            ),
            outputs=(0, 1),
        )

    def fast_impl(self) -> str:
        return "channels_last"


@dataclass(frozen=True)
class GhostDomain(OpDomain):
    kernels: tuple[int, ...] = (1,)

    @classmethod
    def parse(cls, op: str, raw: Mapping[str, Any], path: str) -> GhostDomain:
        check_keys(raw, ("kernel",), path)
        return cls(op, int_choices(raw.get("kernel", 1), f"{path}.kernel", (1, 3)))

    @property
    def params(self) -> dict[str, tuple[Choice, ...]]:
        return {"kernel": self.kernels}

    def decide(self, pick: Pick) -> tuple[Any, ...]:
        return (pick("kernel"),)

    def resolve(self, decision: tuple[Any, ...], slot: Slot) -> BlockChoice:
        (kernel,) = decision
        return BlockChoice(self.op, {"kernel": kernel})


GHOST = OpFamily(spec=GhostSpec, domain=GhostDomain, label_args=("kernel",))


@pytest.fixture(scope="module", autouse=True)
def ghost_registered():
    register_family(GHOST)
    yield
    del FAMILIES[GHOST.name]  # the other test modules see the shipped families only


def ghost_space(tmp_path: Path) -> Path:
    """The shipped IBSR space with ghost (kernel 1 or 3) and conv3d as each dense block's ops."""
    data = yaml.safe_load(shipped_spaces()["ibsr_densenet3d"].read_text())
    data["name"] = "ibsr_ghost"
    data["blocks"]["ops"] = {"ghost": {"kernel": [1, 3]}, "conv3d": {}}
    path = tmp_path / "ibsr_ghost.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ghost_blocks(config: ArchConfig) -> list[BlockChoice]:
    return [block for block in config.blocks if block.op == "ghost"]


def meta_cost(model_or_config: Any) -> tuple[int, int]:
    """Parameters and FlopCounterMode MACs of the network at SPATIAL, built on the meta device."""
    with torch.device("meta"):
        model = psc_nas.build_model(model_or_config).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 1, *SPATIAL))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


# ---------------------------------------------------------------------- op level
@settings(max_examples=25, deadline=None)
@given(cin=st.integers(1, 12), cout=st.integers(2, 12), size=spatial, stride=stride, kernel=st.sampled_from([1, 3]))
def test_ghost_cost_is_exact_and_every_implementation_computes_the_reference(cin, cout, size, stride, kernel):
    spec = make_spec("ghost", cin, cout, stride=stride, kernel=kernel)
    params, macs, y = measured(spec.build(), torch.randn(1, cin, *size))
    assert (spec.cost(size).params, spec.cost(size).macs) == (params, macs)
    assert tuple(y.shape) == (1, cout, *spec.out_spatial(size))
    reference = spec.build("reference")
    x = torch.randn(2, cin, *size)
    expected = forward_backward(reference, x, upstream_seed=cin)
    for impl in EXACT_IMPLS[1:]:
        fast = spec.build(impl)
        fast.load_state_dict(reference.state_dict())
        for a, b in zip(forward_backward(fast, x, upstream_seed=cin), expected):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"{impl} differs by {(a - b).abs().max()}"


def test_ghost_is_registered_checked_and_drawn_from_its_graph():
    assert families()["ghost"] is GHOST
    with pytest.raises(ValueError, match=r"ghost: kernel must be one of \[1, 3\], got 5"):
        make_spec("ghost", 4, 8, kernel=5)
    with pytest.raises(ValueError, match=r"ghost: unknown argument\(s\) \['ratio'\]"):
        make_spec("ghost", 4, 8, ratio=2)
    # the reference computes the graph: primary conv, then the cheap conv on ReLU(primary), concatenated
    module = make_spec("ghost", 3, 6, kernel=3).build("reference")
    x = torch.randn(2, 3, 5, 6, 7)
    primary, cheap = module.convs
    expected = torch.cat([primary(x), cheap(torch.relu(primary(x)))], dim=1)
    assert torch.allclose(module(x), expected, atol=1e-6)
    # the dashboard's segments: the primary's channels, then the cheap conv's path through it
    assert make_spec("ghost", 4, 7, kernel=3).segments() == [("3x3x3", 4), ("3x3x3×2", 3)]
    assert make_spec("ghost", 4, 8).segments() == [("1x1x1", 4), ("1x1x1→dw3x3x3", 4)]


# ---------------------------------------------------------------------- space, network, budget
def test_a_space_yaml_offers_ghost_and_sampling_pricing_and_fitting_follow(tmp_path):
    space = SearchSpace.load(ghost_space(tmp_path))
    assert space.size() == 3**5  # per dense block: ghost kernel 1, ghost kernel 3, conv3d
    assert space.parameters()["block1.ghost.kernel"] == (1, 3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = [space.sample(study.ask()) for _ in range(6)]
    assert any(ghost_blocks(config) for config in sampled)
    assert all(block.args["kernel"] in (1, 3) for config in sampled for block in ghost_blocks(config))

    everywhere = space.decide(lambda name, choices: "ghost" if name.endswith(".op") else 3)
    assert summary(everywhere) == "densenet3d: 20×ghost(kernel=3)"
    priced = psc_nas.cost(everywhere, SPATIAL)
    assert (priced.params, priced.macs) == meta_cost(everywhere)
    assert priced.params < psc_nas.cost(space.presets()["conv3d"], SPATIAL).params

    fitted = fit_to_budget(everywhere, params=priced.params // 2, input_shape=SPATIAL)
    assert psc_nas.cost(fitted, SPATIAL).params <= priced.params // 2
    assert ghost_blocks(fitted) == ghost_blocks(everywhere)  # no argument counts channels: unchanged

    raw = yaml.safe_load(ghost_space(tmp_path).read_text())
    raw["blocks"]["ops"]["ghost"] = {"kernel": [1, 5]}
    with pytest.raises(ConfigError, match=r"blocks\.ops\.ghost\.kernel: values must be from \[1, 3\], got 5"):
        SearchSpace.from_dict(raw, source="x.yaml")


def test_a_search_over_ghost_is_drawn_by_the_dashboard_and_exports_what_it_priced(tmp_path):
    from test_search import search  # the stand-in trainer's search, as the search tests run it

    _, out = search(tmp_path, space=str(ghost_space(tmp_path)), trials=4)
    run = Run.open(out)
    trained = [t for t in run.completed() if ghost_blocks(run.config(t.number))]
    assert trained, "the search should have trained an architecture with ghost blocks"
    trial = trained[0]
    config = run.config(trial.number)

    rows = {row["number"]: row for row in payload(run)["trials"]}
    drawn = rows[trial.number]["arch"]
    assert [block["slot"] for block in drawn] == [slot.name for slot in space_slots(config)]
    for block, choice in zip(drawn, config.blocks):
        if choice.op == "ghost":
            kernel = "x".join([str(choice.args["kernel"])] * 3)
            assert block["op"] == f"ghost(kernel={choice.args['kernel']})"
            assert [kind for kind, _ in block["segments"]] == [kernel, f"{kernel}→dw3x3x3"]
            assert sum(channels for _, channels in block["segments"]) == block["channels"]

    done = export(out, f"trial {trial.number}", out_dir=tmp_path / "export")
    assert ArchConfig.load(done.files["config"]) == config
    recorded = (trial.params, trial.macs)
    assert meta_cost(done.files["config"]) == recorded


def space_slots(config: ArchConfig) -> list[Slot]:
    backbone = get_backbone(config.backbone)
    return backbone.slots(config.hparams)


# ---------------------------------------------------------------------- as a plugin
@pytest.mark.slow
def test_a_plugin_module_registers_the_family_for_the_command_line(tmp_path):
    (tmp_path / "ghost_plugin.py").write_text(
        "from psc_nas.ops import register_family\nfrom test_op_family import GHOST\n\nregister_family(GHOST)\n"
    )
    root = Path(psc_nas.__file__).parents[1]
    env = {
        **os.environ,
        "PSC_NAS_PLUGINS": "ghost_plugin",
        "COLUMNS": "200",
        "PYTHONPATH": os.pathsep.join(map(str, [tmp_path, Path(__file__).parent, root])),
    }
    command = [sys.executable, "-c", "from psc_nas.cli import space_app; space_app()", str(ghost_space(tmp_path))]
    shown = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "conv3d, ghost" in shown.stdout and "243" in shown.stdout

"""Search spaces: schema errors, exact size, Optuna/NNI sampling, presets and the config round trip."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

import psc_nas
from psc_nas.arch import ArchConfig, ConfigError, Slot
from psc_nas.nets import BACKBONES, Backbone
from psc_nas.ops import implementation
from psc_nas.ops.cakes import largest_remainder
from psc_nas.presets import PRESETS, preset_config
from psc_nas.space import SearchSpace, replay_all, shipped_spaces

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = ["em_unet3d", "ibsr_densenet3d", "video_resnet3d"]

# A densenet3d small enough to enumerate: 3 slots of 3 output channels, so several CAKES quarter
# fractions and PmSCn width multipliers land on the same integer counts and must be counted once.
TINY = {
    "backbone": "densenet3d",
    "hparams": {"num_blocks": 1, "layers_per_block": 3, "init_channels": 4, "growth_rate": 3, "side_channels": 2},
    "task": "ibsr",
    "blocks": {
        "ops": {
            "conv3d": {},
            "p3d": {"orientation": ["1x3x3", "3x3x1"], "width": [0.25, 0.5, 1.0]},
            "pmscn": {
                "m": [1, 2],
                "n": [1, 2],
                "orientations": [["1x3x3"], ["1x3x3", "3x1x3"]],
                "width": [0.5, 0.6, 1.0],
            },
            "cakes": {"shapes": ["1D", "3x3x3"], "step": "1/4"},
        },
        "groups": [
            {"slots": "block1.layer1"},
            {
                "name": "rest",
                "slots": "*",
                "share": True,
                "ops": {"csn_ir": {}, "cakes": {"shapes": ["2D"], "step": 0.5}},
            },
        ],
    },
}


def tiny(**changes) -> SearchSpace:
    return SearchSpace.from_dict({**TINY, **changes}, source="tiny.yaml")


def random_trials(space: SearchSpace, seed: int, count: int) -> list[tuple[dict, ArchConfig]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trials = []
    for _ in range(count):
        trial = study.ask()
        config = space.sample(trial)
        trials.append((trial.params, config))
    return trials


# ---------------------------------------------------------------------- size
def test_size_equals_brute_force_enumeration_of_distinct_configs():
    space = tiny()
    runs = replay_all(space.decide)
    distinct = {config.hash for config in runs}
    assert len(runs) > len(distinct), "the tiny space is meant to contain colliding decisions"
    assert space.size() == len(distinct)


def test_size_of_shipped_ibsr_space_matches_hand_count():
    per_block = 1 + 3 + 7 * 3 * 2 + comb(4 + 6, 6) + 2  # conv3d, p3d, pmscn subsets·n·width, cakes quarters, csn
    assert SearchSpace.load("ibsr_densenet3d").size() == per_block**5


def test_replay_all_follows_conditional_questions_only_where_asked():
    def run(ask):
        first = ask("a", ("x", "y"))
        return (first, ask("b", (1, 2, 3))) if first == "y" else (first,)

    assert sorted(replay_all(run)) == [("x",), ("y", 1), ("y", 2), ("y", 3)]


# ---------------------------------------------------------------------- sampling
def test_same_seed_gives_the_same_configs_and_different_seeds_differ():
    space = SearchSpace.load("ibsr_densenet3d")
    first = [config.hash for _, config in random_trials(space, seed=3, count=8)]
    assert first == [config.hash for _, config in random_trials(space, seed=3, count=8)]
    assert first != [config.hash for _, config in random_trials(space, seed=4, count=8)]
    assert len(set(first)) > 1


def test_parameters_are_readable_and_conditional_on_the_chosen_op():
    space = SearchSpace.load("ibsr_densenet3d")
    for params, config in random_trials(space, seed=0, count=20):
        for name in params:
            unit, *rest = name.split(".")
            assert unit in {f"block{b}" for b in range(1, 6)}
            if rest != ["op"]:
                assert params[f"{unit}.op"] == rest[0], f"{name} asked although {unit}.op={params[f'{unit}.op']}"
        decisions = {shared_decision(block) for block in config.blocks[:4]}
        assert len(decisions) == 1, "block1's four layers share one decision"
        assert config.blocks[0].op == params["block1.op"]


def shared_decision(block) -> str:
    """A block without its slot-dependent widths: what one shared decision fixes."""
    return json.dumps({k: v for k, v in block.to_dict().items() if k != "mid_channels"}, sort_keys=True)


def test_shared_fractions_resolve_to_each_slots_own_channel_count():
    space = SearchSpace.load("ibsr_densenet3d", hparams={"growth_rate": 6})
    answers = {"block1.op": "cakes", "block1.cakes.allocation": "1x1x3=1/4,3x3x3=3/4"}
    config = space.decide(lambda name, choices: answers.get(name, choices[0]))
    assert dict(config.blocks[0].args["allocation"]) == {"1x1x3": 2, "3x3x3": 4}  # 1.5 -> 2 by largest remainder


@pytest.mark.parametrize(
    ("fractions", "total", "expected"),
    [
        (
            {"1x1x3": 1 / 4, "1x3x1": 1 / 4, "3x1x1": 1 / 4, "3x3x3": 1 / 4},
            6,
            {"1x1x3": 2, "1x3x1": 2, "3x1x1": 1, "3x3x3": 1},
        ),
        ({"1x3x3": 3 / 4, "3x3x3": 1 / 4}, 2, {"1x3x3": 2}),
        ({"3x3x1": 1 / 2, "1x3x3": 1 / 2}, 7, {"1x3x3": 4, "3x3x1": 3}),
    ],
)
def test_largest_remainder_counts_sum_to_the_slot_width(fractions, total, expected):
    from fractions import Fraction

    counts = largest_remainder({k: Fraction(v).limit_denominator(8) for k, v in fractions.items()}, total)
    assert counts == expected and sum(counts.values()) == total


# ---------------------------------------------------------------------- presets
def test_presets_are_points_of_a_space_that_holds_their_choice():
    space = SearchSpace.load("ibsr_densenet3d")
    answers = {"op": "pmscn", "pmscn.m": 2, "pmscn.n": 2, "pmscn.m2.orientations": "1x3x3+3x1x3", "pmscn.width": 1.0}
    config = space.decide(lambda name, choices: answers[name.split(".", 1)[1]])
    assert config == space.presets()["p2sc2"]
    assert set(space.presets()) == set(PRESETS)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'p9sc9'.*p1sc1"):
        preset_config("p9sc9", "densenet3d")


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(backbone="densenet2d"), r"x\.yaml: backbone: unknown backbone 'densenet2d'"),
        (lambda d: d["blocks"]["ops"].update(conv4d={}), r"x\.yaml: blocks\.ops\.conv4d: unknown op"),
        (lambda d: d["blocks"]["ops"]["pmscn"].update(k=2), r"x\.yaml: blocks\.ops\.pmscn\.k: unknown argument"),
        (
            lambda d: d["blocks"]["ops"]["pmscn"].update(m=[1, 4]),
            r"blocks\.ops\.pmscn\.m: values must be from \[1, 2, 3\]",
        ),
        (lambda d: d["blocks"]["ops"]["cakes"].update(step=0.3), r"blocks\.ops\.cakes\.step: must be 1/K"),
        (
            lambda d: d["blocks"]["groups"][1].update(slots="block9.*"),
            r"blocks\.groups\[1\]\.slots: \['block9\.\*'\] matches no slot",
        ),
        (
            lambda d: d["blocks"]["groups"].pop(),
            r"blocks\.groups: slots \['block1\.layer2', 'block1\.layer3'\] are in no group",
        ),
        (lambda d: d["hparams"].update(depth=3), r"x\.yaml: hparams\.depth: unknown for densenet3d"),
        (lambda d: d.pop("task"), r"x\.yaml: task: required, the name of the task the space is for; got None"),
        (lambda d: d.update(task=["ibsr"]), r"x\.yaml: task: required, the name of the task"),
        (lambda d: d.update(input_size=[64, 64, 64]), r"x\.yaml: input_size: no longer part of a space: its task sets"),
    ],
)
def test_schema_errors_name_the_file_and_the_path(tmp_path: Path, edit, message):
    data = yaml.safe_load(yaml.safe_dump(TINY))
    edit(data)
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        SearchSpace.load(path)


class NarrowBackbone(Backbone):
    """One slot of two output channels: too narrow for PmSCn's m=3 streams (real backbones keep >= 3)."""

    name = "narrow_test"
    defaults = {"channels": 2}

    def slots(self, hparams):
        return [Slot("only", 1, self.hparams(hparams)["channels"])]


def test_op_arguments_a_slot_cannot_take_are_rejected_at_load(monkeypatch):
    monkeypatch.setitem(BACKBONES, NarrowBackbone.name, NarrowBackbone())
    data = {"backbone": "narrow_test", "task": "narrow", "blocks": {"ops": {"conv3d": {}, "pmscn": {"m": [1, 3]}}}}
    with pytest.raises(ConfigError, match=r"narrow\.yaml: blocks\.ops\.pmscn: .*m=3.*\(slot only\)"):
        SearchSpace.from_dict(data, source="narrow.yaml")
    data["hparams"] = {"channels": 3}
    assert SearchSpace.from_dict(data).size() == 1 + (3 + 1) * 3  # conv3d; (3 single + 1 triple orientation) x n


def test_malformed_yaml_and_unknown_names_are_config_errors(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("backbone: [densenet3d\nblocks: {")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        SearchSpace.load(path)
    with pytest.raises(ConfigError, match=r"no search space 'nope'.*ibsr_densenet3d"):
        SearchSpace.load("nope")


def test_every_shipped_space_is_found_by_name():
    assert sorted(shipped_spaces()) == SHIPPED


# ---------------------------------------------------------------------- NNI
def test_nni_mutables_freeze_to_the_config_optuna_gives_for_the_same_answers():
    nni_mutable = pytest.importorskip("nni.mutable")
    numpy = pytest.importorskip("numpy")
    space = SearchSpace.load("em_unet3d")
    nni_space = space.to_nni()
    assert isinstance(nni_space, nni_mutable.Mutable)
    assert set(nni_space.simplify()) == set(space.parameters())
    study = optuna.create_study()
    state = numpy.random.RandomState(0)
    for _ in range(5):
        sample: dict = {}
        config = nni_space.random(sample, random_state=state)
        assert nni_space.freeze(sample) == config
        study.enqueue_trial(sample, skip_if_exists=False)
        trial = study.ask()
        assert space.sample(trial) == config
        assert set(trial.params) < set(sample), "Optuna is asked only the active subset of NNI's parameters"
        psc_nas.validate(config)


# ---------------------------------------------------------------------- round trip
SMALL = {  # shipped spaces at widths and sizes a CPU test can build
    "ibsr_densenet3d": ({"width": 0.25}, (16, 16, 16)),
    "em_unet3d": ({"width": 0.125, "downsample": [[2, 2, 2]] * 2}, (8, 8, 8)),
    "video_resnet3d": ({"width": 0.125, "depth": 18}, (4, 16, 16)),
}


def measured(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    with FlopCounterMode(display=False) as counter:
        y = model(x)
    return counter.get_total_flops() // 2, y


@pytest.mark.parametrize("name", SHIPPED)
def test_sampled_configs_round_trip_through_yaml_to_the_priced_network(name: str, tmp_path: Path):
    hparams, spatial = SMALL[name]
    space = SearchSpace.load(name, hparams=hparams)
    for index, (_, config) in enumerate(random_trials(space, seed=11, count=2)):
        path = config.save(tmp_path / f"{index}.yaml")
        loaded = ArchConfig.load(path)
        assert loaded == config and loaded.hash == config.hash
        with implementation("reference"):  # the MAC-exact convs, which FlopCounterMode counts as the cost
            first, second = psc_nas.build_model(path), psc_nas.build_model(path)
        assert {k: v.shape for k, v in first.state_dict().items()} == {
            k: v.shape for k, v in second.state_dict().items()
        }
        expected = psc_nas.cost(loaded, spatial)
        assert sum(p.numel() for p in first.parameters()) == expected.params
        x = torch.randn(1, config.hparams["in_channels"], *spatial)
        with torch.no_grad():
            macs, y = measured(first.eval(), x)
        assert macs == expected.macs
        classes = config.hparams["num_classes"]
        assert tuple(y.shape) == ((1, classes) if config.backbone == "resnet3d" else (1, classes, *spatial))


# ---------------------------------------------------------------------- psc-space
def test_psc_space_lists_every_shipped_space_with_size_and_priced_presets():
    from typer.testing import CliRunner

    from psc_nas.cli import space_app

    result = CliRunner().invoke(space_app, [], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert all(name in result.stdout for name in SHIPPED)
    assert "1.14e+12" in result.stdout  # ibsr_densenet3d: 258**5
    dense = psc_nas.cost(preset_config("p2sc2", "densenet3d", in_channels=1, num_classes=4), (32, 32, 32))
    assert psc_nas.format_count(dense.params) in result.stdout


def test_psc_space_reports_a_bad_name_in_one_line_and_exit_code_1():
    from typer.testing import CliRunner

    from psc_nas.cli import space_app

    result = CliRunner().invoke(space_app, ["no_such_space"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("psc-space: no search space 'no_such_space'")

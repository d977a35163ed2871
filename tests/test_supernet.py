"""The ``supernet`` evaluator: one weight-sharing super-network, trained by SPOS, scoring sub-networks.

Real modules, real training on the embedded IBSR cohort (16³ patches, tiny widths), a real
``psc-search --evaluator supernet`` on SQLite in a fresh process.
"""

from __future__ import annotations

import json

import optuna
import pytest
import tiny_task
import torch
from cli_process import run_cli
from test_op_family import GHOST
from test_train import DICE_KEYS, SmallPatchIBSR

from psc_nas.arch import BlockChoice
from psc_nas.evaluators import EvaluationFailed, EvaluatorSetup, make_evaluator
from psc_nas.evaluators.supernet import SuperNet, SupernetEvaluator, share_plan, supernet_key
from psc_nas.nets import build_model, get_backbone
from psc_nas.ops import families, make_spec, register_family
from psc_nas.ops.registry import FAMILIES
from psc_nas.space import SearchSpace

TINY_HPARAMS = {
    "in_channels": 1,
    "num_classes": 4,
    "init_channels": 8,
    "growth_rate": 6,
    "side_channels": 4,
    "num_blocks": 2,
    "layers_per_block": 2,
}
ALL_OPS = {
    "conv3d": {},
    "p3d": {"orientation": ["1x3x3", "3x1x3", "3x3x1"], "width": [0.5, 1.0]},
    "pmscn": {"m": [1, 2, 3], "n": [1, 2, 3], "orientations": "all", "width": [0.5, 1.0]},
    "cakes": {"shapes": ["1D", "2D", "3D"], "step": "1/2"},
    "csn_ip": {},
    "csn_ir": {},
    "ghost": {"kernel": [1, 3]},
}
TINY_DATA = {"samples_per_epoch": 4, "batch_size": 2, "spacing": 4.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_ghost():
    """One torch thread (tiny steps on a shared 2-core machine) and the ghost family of test_op_family."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    register_family(GHOST)
    yield
    del FAMILIES[GHOST.name]
    torch.set_num_threads(threads)


def space_of(
    ops: dict, *, backbone: str = "densenet3d", hparams: dict | None = None, task: str = "ibsr", share: bool = False
) -> SearchSpace:
    return SearchSpace.from_dict(
        {"task": task, "backbone": backbone, "hparams": hparams or TINY_HPARAMS, "blocks": {"share": share, "ops": ops}}
    )


def configs_through_every_choice(supernet: SuperNet, space: SearchSpace):
    """Configs that, together, put every choice of every slot in place (narrow: at the super-network's width)."""
    longest = max(len(switch.choices) for switch in supernet.switches)
    base = supernet.base
    for index in range(longest):
        blocks = tuple(switch.choices[index % len(switch.choices)] for switch in supernet.switches)
        yield base.__class__(base.backbone, dict(base.hparams), blocks)


def assert_same_as_standalone(supernet: SuperNet, config, inputs: torch.Tensor) -> None:
    supernet.activate(config)
    standalone = supernet.extract(config)
    reference = build_model(supernet.narrow(config))
    assert standalone.state_dict().keys() == reference.state_dict().keys()  # the standalone network, no extras
    for mode in ("train", "eval"):
        getattr(supernet, mode)()
        getattr(standalone, mode)()
        with torch.no_grad():
            got, expected = supernet(inputs), standalone(inputs)
        assert got.shape == expected.shape == reference(inputs).shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_every_family_s_every_choice_runs_in_the_super_network_as_its_standalone_network():
    torch.manual_seed(0)
    space = space_of(ALL_OPS)
    supernet = SuperNet(space, width=1.0)
    assert {choice.op for switch in supernet.switches for choice in switch.choices} == set(ALL_OPS)
    inputs = torch.randn(2, 1, 8, 8, 8)
    for config in configs_through_every_choice(supernet, space):
        assert_same_as_standalone(supernet, config, inputs)
    # Shared choices hold no parameters of their own; csn and the plugin ghost family have their own modules.
    switch = supernet.switches[1]
    for choice in switch.choices:
        owned = sum(p.numel() for p in switch.candidates[switch.key(choice)].parameters())
        assert (owned == 0) == (choice.op in ("conv3d", "cakes", "pmscn", "p3d")), choice


def test_sampled_architectures_at_reduced_width_equal_their_standalone_networks():
    torch.manual_seed(1)
    space = space_of(ALL_OPS, hparams={**TINY_HPARAMS, "growth_rate": 12, "init_channels": 16})
    supernet = SuperNet(space, width=0.5)
    draw = supernet.sampler(3)
    inputs = torch.randn(1, 1, 8, 8, 8)
    for _ in range(6):
        config = draw()
        assert supernet.activate(config).hparams["width"] == 0.5
        assert_same_as_standalone(supernet, config, inputs)


@pytest.mark.parametrize(
    "backbone, hparams, side",
    [
        ("resnet3d", {"in_channels": 1, "num_classes": 3, "depth": 18, "width": 0.125}, 16),  # basic pairs, convs=2
        ("resnet3d", {"in_channels": 1, "num_classes": 3, "depth": 50, "width": 0.0625}, 16),  # bottleneck middles
        ("unet3d", {"in_channels": 1, "num_classes": 3, "base_channels": 4, "downsample": [[2, 2, 2]]}, 8),
    ],
)
def test_slots_of_several_convs_share_too(backbone, hparams, side):
    torch.manual_seed(2)
    ops = {"conv3d": {}, "p3d": {}, "pmscn": {"m": [1, 2], "n": [1, 2]}, "cakes": {"step": "uniform"}, "csn_ir": {}}
    space = space_of(ops, backbone=backbone, hparams=hparams, share=True)
    supernet = SuperNet(space)
    draw = supernet.sampler(4)
    inputs = torch.randn(2, 1, side, side, side)
    for _ in range(4):
        assert_same_as_standalone(supernet, draw(), inputs)
    if backbone == "unet3d":  # n=2 PmSCn replaces a double conv jointly: one op, so one norm, in that choice
        switch = supernet.switches[0]
        joint = next(c for c in switch.choices if c.op == "pmscn" and c.args["n"] == 2)
        assert len([m for m in switch.candidates[switch.key(joint)] if isinstance(m, torch.nn.BatchNorm3d)]) == 1


def test_conv3d_cakes_and_pmscn_inherit_slices_of_one_kernel_bank():
    space = space_of(ALL_OPS)
    supernet = SuperNet(space)
    index = 3  # block2.layer2: 26 -> 6 channels
    slot = supernet.slots[index]
    base = supernet.base

    def weights(choice: BlockChoice) -> dict[str, torch.Tensor]:
        blocks = list(base.blocks)
        blocks[index] = choice
        config = base.__class__(base.backbone, dict(base.hparams), tuple(blocks))
        return supernet.switches[index].standalone_state(supernet.narrow(config).blocks[index])

    cube = weights(BlockChoice("conv3d", {"kernel_size": 3}))["convs.0.weight"]  # the space says conv3d: {}
    allocation = {"1x3x3": 3, "3x3x3": 3}
    cakes = weights(BlockChoice("cakes", {"allocation": allocation}))
    assert torch.equal(cakes["convs.0.weight"], cube[:3, :, 1:2])  # channels 0-2: 1x3x3, the cube's middle plane
    assert torch.equal(cakes["convs.1.weight"], cube[3:6])  # channels 3-5: the whole cube
    p3d = weights(BlockChoice("p3d", {"orientation": "1x3x3"}))
    pmscn = weights(BlockChoice("pmscn", {"m": 1, "n": 2, "orientations": ["1x3x3"]}))
    assert torch.equal(p3d["convs.0.weight"], pmscn["convs.0.weight"])  # the first 2D conv, by slicing
    assert torch.equal(p3d["convs.1.weight"], pmscn["convs.2.weight"])  # the 1D conv
    narrow = weights(BlockChoice("pmscn", {"m": 1, "n": 1, "orientations": ["1x3x3"], "mid_channels": 8}))
    assert torch.equal(narrow["convs.0.weight"], p3d["convs.0.weight"][:8])  # width 0.5: the first 8 2D filters
    assert share_plan(make_spec("csn_ip", slot.in_channels, slot.out_channels)) is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny super-network trained by SPOS on 16³ IBSR patches, saved in its run folder."""
    task = SmallPatchIBSR()
    space = space_of(
        {"conv3d": {}, "cakes": {"step": "1/2"}, "pmscn": {"m": [1, 2], "n": [1, 2]}, "csn_ip": {}}, share=True
    )
    setup = EvaluatorSetup(
        task,
        seed=0,
        space=space,
        data_options=TINY_DATA,
        options={"steps": "60", "width": "1.0", "lr": "0.01", "calib_patches": 4, "val_patches": 4},
    )
    evaluator = make_evaluator("supernet", setup)
    folder = tmp_path_factory.mktemp("supernet")
    evaluator.prepare(folder, seconds_left=None)
    return evaluator, setup, folder


def test_spos_training_lowers_the_loss_and_is_saved_under_its_key(trained):
    evaluator, setup, folder = trained
    assert isinstance(evaluator, SupernetEvaluator) and len(evaluator.losses) == evaluator.steps == 60
    first, last = sum(evaluator.losses[:15]) / 15, sum(evaluator.losses[-15:]) / 15
    assert last < first - 0.05, (first, last)
    key = supernet_key(setup.space, setup.task, evaluator.options, 0, TINY_DATA)
    assert [p.name for p in folder.iterdir()] == [f"supernet-{key}.pt"]
    assert evaluator.levels()[0].words == "supernet, width 1, 60 steps"


def test_evaluate_scores_a_sub_network_with_the_task_s_metrics(trained):
    evaluator, _, _ = trained
    draw = evaluator.supernet.sampler(11)
    first = draw()
    result = evaluator.evaluate(first, evaluator.levels()[0], seconds_left=None)
    assert result.evaluator == "supernet" and result.fidelity.words == "supernet, width 1, 60 steps"
    assert set(result.metrics) == DICE_KEYS and 0 <= result.metrics["dice_mean"] <= 1
    assert result.wall_s >= result.val_forward_s > 0
    again = evaluator.evaluate(first, evaluator.levels()[0], seconds_left=None)  # BN recalibrated from scratch
    assert again.metrics == result.metrics
    scores = {
        evaluator.evaluate(draw(), evaluator.levels()[0], seconds_left=None).metrics["dice_mean"] for _ in range(3)
    }
    assert len(scores | {result.metrics["dice_mean"]}) > 1  # different sub-networks, different scores


def test_a_resumed_search_reloads_the_saved_super_network(trained, monkeypatch):
    evaluator, setup, folder = trained
    config = evaluator.supernet.sampler(5)()
    expected = evaluator.evaluate(config, evaluator.levels()[0], seconds_left=None).metrics
    resumed = SupernetEvaluator(setup)
    monkeypatch.setattr(SupernetEvaluator, "train", lambda *args: pytest.fail("trained again instead of reloading"))
    resumed.prepare(folder, seconds_left=None)
    assert resumed.steps == 60 and resumed.losses == evaluator.losses
    # The weights; BatchNorm statistics are what each evaluation recalibrates, whatever was saved.
    saved, loaded = dict(evaluator.supernet.named_parameters()), dict(resumed.supernet.named_parameters())
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert resumed.evaluate(config, resumed.levels()[0], seconds_left=None).metrics == expected
    other = SupernetEvaluator(
        EvaluatorSetup(setup.task, seed=1, space=setup.space, data_options=TINY_DATA, options=setup.options)
    )
    assert supernet_key(setup.space, setup.task, other.options, 1, TINY_DATA) not in str(list(folder.iterdir()))


def test_option_and_usage_errors_are_one_clear_line():
    task = SmallPatchIBSR()
    space = space_of({"conv3d": {}})
    with pytest.raises(ValueError, match="supernet: unknown option 'widht'; known: width"):
        SupernetEvaluator(EvaluatorSetup(task, space=space, options={"widht": 0.5}))
    with pytest.raises(ValueError, match="supernet: option width must be a number, got 'wide'"):
        SupernetEvaluator(EvaluatorSetup(task, space=space, options={"width": "wide"}))
    with pytest.raises(ValueError, match="supernet: option steps must be a positive int, got '0'"):
        SupernetEvaluator(EvaluatorSetup(task, space=space, options={"steps": "0"}))
    with pytest.raises(ValueError, match="needs the search space"):
        SupernetEvaluator(EvaluatorSetup(task))
    evaluator = SupernetEvaluator(EvaluatorSetup(task, space=space))
    with pytest.raises(EvaluationFailed, match="not prepared"):
        evaluator.evaluate(space.decide(lambda name, choices: choices[0]), evaluator.levels()[0], seconds_left=None)


@pytest.mark.slow
def test_psc_search_with_the_supernet_evaluator_writes_supernet_trials(tmp_path):
    (tmp_path / "bars.yaml").write_text(tiny_task.SPACE_YAML)
    found = run_cli(
        "psc-search",
        "--task",
        "bar_axis",
        "--space",
        "bars.yaml",
        "--budget",
        "400k",
        "--trials",
        "6",
        "--evaluator",
        "supernet",
        "--evaluator-option",
        "steps=30",
        "--evaluator-option",
        "width=1",
        "--evaluator-option",
        "val_patches=16",
        "--no-retrain",  # retraining is tested in test_retrain.py
        "--out",
        "search",
        cwd=tmp_path,
        plugins="tiny_task",
    )
    assert found.returncode == 0, found.stderr
    out = tmp_path / "search"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["evaluator"] == "supernet"
    scored = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("fidelity", 0) > 0]
    assert len(scored) >= 5
    for trial in scored:
        assert trial.user_attrs["fidelity_words"] == "supernet, width 1, 30 steps"
        assert trial.values[0] == trial.user_attrs["metrics"]["error"]
    assert len(list(out.glob("supernet-*.pt"))) == 1
    assert json.loads((out / "pareto.json").read_text())["knee"] is not None
    bad = run_cli(
        "psc-search",
        "--task",
        "bar_axis",
        "--space",
        "bars.yaml",
        "--budget",
        "400k",
        "--evaluator",
        "supernet",
        "--evaluator-option",
        "nope",
        "--out",
        "bad",
        cwd=tmp_path,
        plugins="tiny_task",
    )
    assert bad.returncode == 1 and bad.stderr == "psc-search: --evaluator-option takes KEY=VALUE, got 'nope'\n"


def test_every_registered_family_is_covered():
    """A family added later is either shared by a rule here or falls back; the fallback needs no code."""
    assert set(families()) >= set(ALL_OPS)
    backbone = get_backbone("densenet3d")
    slot = backbone.slots(TINY_HPARAMS)[2]
    for op in families():
        spec = make_spec(op, slot.in_channels, slot.out_channels)
        plan = share_plan(spec)
        assert (plan is not None) == (op in ("conv3d", "cakes", "pmscn", "p3d")), op

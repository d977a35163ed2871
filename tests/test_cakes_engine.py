"""``psc-search --engine cakes``: the CAKES super-network's paths compute what the ``cakes`` op computes, both
priorities give valid ArchConfigs within the budget, and the CLI run writes a run folder psc-export exports."""

from __future__ import annotations

import csv
import re
from fractions import Fraction
from functools import partial
from pathlib import Path

import cli_process
import optuna
import pytest
import tiny_task
import torch
import torch.nn.functional as F
from cli_process import cli_env, ctrl_c_when, one_line

import psc_nas
from psc_nas.arch import ArchConfig, BlockChoice
from psc_nas.nets import cost, get_backbone
from psc_nas.ops import make_spec
from psc_nas.ops.cakes import SHAPES
from psc_nas.search import cakes_engine as ce
from psc_nas.search.budget import Budget
from psc_nas.search.runner import SearchSettings, plan_search
from psc_nas.space import SearchSpace

env = partial(cli_env, plugins="tiny_task")
run_cli = partial(cli_process.run_cli, plugins="tiny_task")


def bars(tmp_path: Path) -> Path:
    path = tmp_path / "bars.yaml"
    path.write_text(tiny_task.SPACE_YAML)
    return path


# ---------------------------------------------------------------------------------------- the super-network
@pytest.mark.parametrize("stride", [1, 2])
def test_a_chosen_path_per_channel_computes_what_the_cakes_op_with_those_weights_computes(stride):
    torch.manual_seed(0)
    conv = ce.CakesSuperConv(5, 11, (stride,) * 3, SHAPES, "performance")
    path = torch.randint(len(SHAPES), (11,))
    path[:3] = torch.tensor([0, 6, 3])  # at least three distinct shapes
    allocation = ce.counts(path, SHAPES)
    x = torch.randn(2, 5, 9, 8, 7)
    for impl in ("reference", None):  # the reference graph and the family's fast path
        spec = make_spec("cakes", 5, 11, stride=stride, allocation=allocation)
        op = spec.build(impl=impl) if impl else spec.build()
        # the op's groups, in the family's shape order, take the super-network's weights of their channels
        state = {
            f"convs.{i}.weight": conv.weights[SHAPES.index(shape)].detach()[path == SHAPES.index(shape)]
            for i, shape in enumerate(spec.allocation)
        }
        op.load_state_dict(state, strict=True)
        order = torch.cat([torch.nonzero(path == SHAPES.index(shape)).flatten() for shape in spec.allocation])
        with torch.no_grad():
            torch.testing.assert_close(op(x), conv.raw(x, path)[:, order], rtol=1e-5, atol=1e-5)
    # with the path fixed, the forward is that conv normalised and scaled by each channel's own path's BN
    conv.gamma.data.uniform_(0.5, 2.0)
    conv.path = path
    raw = conv.raw(x, path)
    channels = torch.arange(11)
    expected = F.batch_norm(raw, None, None, conv.gamma[path, channels], conv.shift[path, channels], training=True)
    torch.testing.assert_close(conv(x), expected)
    conv(x).square().sum().backward()  # only the chosen path's γ of each channel learns
    chosen = torch.zeros(len(SHAPES), 11, dtype=torch.bool)
    chosen[path, channels] = True
    assert (conv.gamma.grad[~chosen] == 0).all() and (conv.gamma.grad[chosen] != 0).all()


def test_performance_priority_draws_a_random_path_per_channel_at_each_training_step():
    conv = ce.CakesSuperConv(3, 64, (1, 1, 1), SHAPES, "performance")
    x = torch.randn(2, 3, 5, 5, 5)
    grads = []
    for _ in range(2):
        conv.zero_grad()
        conv(x).square().sum().backward()
        grads.append(conv.gamma.grad != 0)
    for used in grads:
        assert (used.sum(0) == 1).all()  # one path per channel
        assert used.any(1).sum() >= 5  # spread over the shapes
    assert not torch.equal(grads[0], grads[1])
    conv.gamma.data[6, 0] = 3.0  # eval: the argmax of |γ|
    assert int(conv.importance().argmax(0)[0]) == 6


def test_cost_priority_aggregates_every_path_by_a_1x1x1_conv_and_penalises_gamma_by_cost():
    torch.manual_seed(0)
    shapes = ce.SHAPE_SETS["2D+3D"]
    conv = ce.CakesSuperConv(4, 6, (1, 1, 1), shapes, "cost")
    x = torch.randn(2, 4, 6, 6, 6)
    per_path = [
        F.batch_norm(conv.raw(x, torch.full((6,), i)), None, None, conv.gamma[i], conv.shift[i], training=True)
        for i in range(len(shapes))
    ]
    expected = F.conv3d(torch.cat(per_path, 1), conv.aggregate.weight)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert ce.cost_weights(ce.SHAPE_SETS["1D+2D+3D"]) == {
        **{s: 1 / 13 for s in SHAPES[:3]},
        **{s: 3 / 13 for s in SHAPES[3:6]},
        "3x3x3": 9 / 13,
    }
    assert ce.cost_weights(shapes) == {**{s: 3 / 12 for s in shapes[:3]}, "3x3x3": 9 / 12}
    assert ce.cost_weights(ce.SHAPE_SETS["1D"]) == {s: 1.0 for s in SHAPES[:3]}
    space = SearchSpace.load(str(bars_space()))
    net = ce.CakesSuperNet(space, shapes, "cost", width=1.0)
    for layer in net.super_convs():
        layer.gamma.data.uniform_(-1, 1)
    beta = torch.tensor([3 / 12] * 3 + [9 / 12])
    by_hand = sum(float((beta[:, None] * layer.gamma.detach().abs()).sum()) for layer in net.super_convs())
    assert float(net.penalty().detach()) == pytest.approx(by_hand)


_SPACE: list[Path] = []


def bars_space() -> Path:
    if not _SPACE:
        import tempfile

        folder = Path(tempfile.mkdtemp())
        _SPACE.append(bars(folder))
    return _SPACE[0]


# ---------------------------------------------------------------------------------------- found architectures
def test_fit_allocation_moves_the_least_important_channels_to_cheaper_shapes_until_it_fits():
    hparams = dict(tiny_task.BarAxisTask.backbone_hparams)
    slots = get_backbone("resnet3d").slots(hparams)
    config = ArchConfig(
        "resnet3d", hparams, tuple(BlockChoice("cakes", {"allocation": {"3x3x3": s.out_channels}}) for s in slots)
    )
    spatial = (16, 16, 16)
    full = cost(config, spatial)
    # slot 0's 3D paths matter least, every other slot's most
    importance = [{"1x3x3": 1.0, "3x3x3": 0.1 if i == 0 else 5.0} for i in range(len(slots))]
    saving_0 = (
        full.params
        - cost(
            ArchConfig(
                "resnet3d",
                hparams,
                (BlockChoice("cakes", {"allocation": {"1x3x3": slots[0].out_channels}}), *config.blocks[1:]),
            ),
            spatial,
        ).params
    )
    limit = full.params - saving_0 // 2
    found, price, moved = ce.fit_allocation(config, importance, lambda c: c.params <= limit, spatial)
    assert price == cost(found, spatial) and price.params <= limit < full.params and moved > 0
    assert found.blocks[1:] == config.blocks[1:]  # only slot 0 gave up 3D channels
    allocation = found.blocks[0].args["allocation"]
    assert set(allocation) == {"1x3x3", "3x3x3"} and sum(allocation.values()) == slots[0].out_channels
    with pytest.raises(ValueError, match="no CAKES allocation over these shapes fits the budget"):
        ce.fit_allocation(config, importance, lambda c: c.params <= 1000, spatial)


@pytest.fixture(scope="module")
def bar_plan(tmp_path_factory):
    space = bars(tmp_path_factory.mktemp("space"))
    cheapest, _ = ce.cheapest_config(SearchSpace.load(str(space)), SHAPES)
    uniform = ce.base_config(SearchSpace.load(str(space)), SHAPES)
    low, high = cost(cheapest, (16, 16, 16)).params, cost(uniform, (16, 16, 16)).params
    budget = (low + high) // 2  # under the uniform allocation: the search must give up channels
    plan = plan_search(SearchSettings(task="bar_axis", space=str(space), budget=Budget(params=budget)))
    return plan, budget


@pytest.mark.parametrize("priority", ce.PRIORITIES)
def test_both_priorities_find_a_valid_cakes_architecture_within_the_budget(bar_plan, priority, tmp_path):
    plan, budget = bar_plan
    options = ce.parse_options({"steps": 3, "width": 1.0, "shapes": "1D+2D+3D"})
    found, training = ce.search_one(plan, options, priority, seed=0, data_dir=None, seconds=None, work_dir=tmp_path)
    config = psc_nas.validate(found.config)
    assert training.steps == 3 and len(training.losses) == 3
    assert found.cost == cost(config, (16, 16, 16)) and found.cost.params <= budget
    assert found.priority == priority
    for block, slot in zip(config.blocks, get_backbone(config.backbone).slots(config.hparams)):
        assert block.op == "cakes" and sum(block.args["allocation"].values()) == slot.out_channels
        assert set(block.args["allocation"]) <= set(SHAPES)
    assert config.hparams == plan.space.decide(lambda name, choices: choices[0]).hparams
    # the trained super-network is kept: the same search again reuses it and finds the same architecture
    (kept,) = tmp_path.glob("cakes-supernet-*.pt")
    again, _ = ce.search_one(plan, options, priority, seed=0, data_dir=None, seconds=None, work_dir=tmp_path)
    assert again.config == found.config and list(tmp_path.glob("cakes-supernet-*.pt")) == [kept]


def test_a_budget_no_allocation_meets_and_bad_options_are_refused_in_one_line(bar_plan):
    plan, _ = bar_plan
    tight = plan_search(SearchSettings(task="bar_axis", space=str(bars_space()), budget=Budget(params=60_000)))
    with pytest.raises(ValueError, match=r"no allocation of 1D sub-kernels fits params <= 60k: the cheapest"):
        ce.check_budget(tight, ce.parse_options({"shapes": "1D"}))
    ce.check_budget(plan, ce.parse_options({}))
    assert ce.parse_options({"shapes": "3d+2d"})["shapes"] == "2D+3D"
    for bad, message in [
        ({"shapes": "3D"}, "shapes must be one of 1D, 2D, 1D+2D, 2D+3D, 1D+2D+3D"),
        ({"priority": "speed"}, "priority must be performance, cost or both"),
        ({"steps": 0}, "option steps must be a positive int"),
        ({"width": "wide"}, "option width must be a number"),
        ({"lambda": 1}, "unknown option 'lambda'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ce.parse_options(bad)


# ---------------------------------------------------------------------------------------- the command line
def cakes_args(*extra: str) -> list[str]:
    return [
        "--task", "bar_axis", "--space", "bars.yaml", "--budget", "400k", "--engine", "cakes",
        "--engine-option", "epochs=1", "--out", "run", *extra,
    ]  # fmt: skip


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_psc_search_engine_cakes_writes_a_run_folder_that_psc_export_exports_and_resumes(tmp_path):
    bars(tmp_path)
    result = run_cli("psc-search", *cakes_args("--engine-option", "steps=4"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    for name in ("trials.csv", "pareto.json", "best.yaml", "dashboard.html", "search.log", "front"):
        assert (out / name).exists(), name
    table = rows(out / "trials.csv")
    assert [(r["state"], r["evaluator"]) for r in table] == [("COMPLETE", "cakes")] * 2
    assert "1D+2D+3D, performance priority (4 steps, width 0.25); retrained: 1 epoch" in table[0]["search_fidelity"]
    assert "cost priority" in table[1]["search_fidelity"]
    for row in table:
        assert row["error"] == row["retrained_error"] and int(row["params"]) <= 400_000
        shares = [Fraction(v).limit_denominator(64) for k, v in row.items() if k.startswith("conv2-block0.cakes.")]
        assert shares and sum(shares) == 1  # the per-layer allocation, as channel fractions
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["evaluator"] == "cakes" and len(study.trials) == 2

    exported = run_cli("psc-export", "run", "--pick", "trial 1", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    model = psc_nas.load_model(out / "export" / "trial-1.yaml")
    assert sum(p.numel() for p in model.parameters()) == int(table[1]["params"])
    assert (out / "export" / "trial-1.weights.pt").is_file()

    again = run_cli("psc-search", *cakes_args("--engine-option", "steps=4"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}").trials) == 2


@pytest.mark.slow
def test_unknown_engine_and_engine_errors_are_one_line(tmp_path):
    bars(tmp_path)
    for args, message in [
        (["--engine", "nosuch"], "unknown engine 'nosuch'; choose from optuna, nni, cakes"),
        (cakes_args("--engine-option", "shapes=4D"), "--engine cakes: shapes must be one of"),
        (cakes_args("--no-retrain"), "--engine cakes scores what it finds by retraining it"),
        (cakes_args("--budget", "60k"), "--engine cakes: no allocation of 1D+2D+3D sub-kernels fits params <= 60k"),
        (["--engine-option", "steps=3"], "--engine-option is for --engine cakes"),
        (cakes_args("--trials", "5"), "--trials apply to --engine optuna and nni only"),
        (cakes_args("--evaluator", "supernet"), "--evaluator apply to --engine optuna and nni only"),
    ]:
        result = run_cli("psc-search", *cakes_args()[:6], *args, "--out", "never", cwd=tmp_path)
        one_line(result, "psc-search", message, optuna_lines=False)
        assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_ctrl_c_during_the_super_network_training_exits_130_and_leaves_no_trial(tmp_path):
    bars(tmp_path)
    result = ctrl_c_when(
        "training the cakes super-network",
        "psc-search",
        *cakes_args("--engine-option", "steps=5000"),
        cwd=tmp_path,
        env=env(),
        settle=2,
    )
    stderr = result.stderr
    assert result.returncode == 130, stderr
    assert stderr.startswith("psc-search: interrupted") and stderr.count("\n") == 1, stderr
    out = tmp_path / "run"
    assert not list(out.glob("cakes-supernet-*.pt")) and not list(out.glob("*.tmp*"))
    assert optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}").trials == []

"""``psc-search --engine nni --strategy spos|darts|proxyless``: NNI's one-shot strategies on a ModelSpace of
LayerChoices made from the YAML space; the found architecture is priced, fits the budget, is retrained and
fills the same run folder psc-export exports; no port opens beyond loopback; bad combinations are one line."""

from __future__ import annotations

import csv
import subprocess
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import cli_process
import optuna
import pytest
import tiny_task
from cli_process import BIN, cli_env, ctrl_c_when, one_line

import psc_nas
from psc_nas.arch import ArchConfig
from psc_nas.nets import cost, get_backbone
from psc_nas.nets.budget import with_width
from psc_nas.search.budget import Budget
from psc_nas.search.runner import SearchSettings, plan_search
from psc_nas.space import SearchSpace

pytest.importorskip("nni")

from psc_nas.search import nni_oneshot as no  # noqa: E402  (needs NNI)

BUDGET = 400_000
env = partial(cli_env, plugins="tiny_task")
run_cli = partial(cli_process.run_cli, plugins="tiny_task")


def bars(tmp_path: Path) -> Path:
    path = tmp_path / "bars.yaml"
    path.write_text(tiny_task.SPACE_YAML)
    return path


def oneshot_args(strategy: str, *extra: str) -> list[str]:
    return [
        "--task", "bar_axis", "--space", "bars.yaml", "--budget", "400k", "--engine", "nni", "--strategy", strategy,
        "--engine-option", "steps=12", "--engine-option", "epochs=1", "--engine-option", "samples=4",
        *extra, "--out", "run",
    ]  # fmt: skip


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------- the candidates
def narrow_slots(space: SearchSpace, width: float = 0.25) -> list:
    first = space.decide(lambda name, choices: choices[0])
    narrow = with_width(first, float(first.hparams.get("width", 1.0)) * width)
    return get_backbone(narrow.backbone).slots(narrow.hparams)


def test_the_candidates_are_the_space_s_own_decisions_thinned_evenly_by_params_and_said_in_one_line():
    space = SearchSpace.load("ibsr_densenet3d")
    units = no.unit_candidates(space, narrow_slots(space), per_op=3)
    assert [u.label for u in units] == [u.label for u in space.units]
    for unit in units:
        ops = [c.answers[f"{unit.label}.op"] for c in unit.kept]
        assert {op: ops.count(op) for op in set(ops)} == {
            "conv3d": 1, "p3d": 3, "pmscn": 3, "cakes": 3, "csn_ip": 1, "csn_ir": 1
        }  # fmt: skip
        kept, total = unit.per_op["pmscn"]
        assert (kept, total) == (3, 42) and unit.per_op["cakes"][0] == 3 and unit.per_op["cakes"][1] > 100
        pmscn = [c.params for c in unit.kept if c.answers[f"{unit.label}.op"] == "pmscn"]
        assert pmscn == sorted(pmscn) and pmscn[0] < pmscn[-1]  # the cheapest and the costliest kept
    line = no.restriction_line(units, 3)
    assert "\n" not in line and "pmscn 3 of 42" in line and "cakes 3 of" in line and "candidates=N" in line
    # every sample is an architecture of the space: its answers replay through the space's own decide
    for index in range(len(units[0].kept)):
        sample = {u.label: min(index, len(u.kept) - 1) for u in units}
        config = no.config_of(space, units, sample)
        answers = no.answers_of(units, sample)
        assert space.decide(lambda name, choices: answers[name]).hash == config.hash
        psc_nas.validate(config)
    everything = no.unit_candidates(space, narrow_slots(space), per_op=1000)
    assert "every decision" not in line and everything[0].per_op["pmscn"] == (42, 42)


@pytest.fixture(scope="module")
def bar_plan(tmp_path_factory):
    space = bars(tmp_path_factory.mktemp("space"))
    return plan_search(SearchSettings(task="bar_axis", space=str(space), budget=Budget(params=BUDGET)))


def test_the_nni_model_space_has_one_layer_choice_per_slot_labelled_by_its_unit(bar_plan):
    search = no.OneShotSearch(bar_plan, "darts", no.parse_options("darts", {}), seed=0, data_dir=None)
    model = no.OneShotSpace(bar_plan.space, search.units, 0.25)
    mutables = model.simplify()
    assert sorted(mutables) == sorted(u.label for u in bar_plan.space.units)
    assert all(len(m.values) == len(u.kept) for u, m in zip(search.units, (mutables[u.label] for u in search.units)))
    # a frozen sample is the network of the ArchConfig it names, at the super-net's width
    sample = {u.label: len(u.kept) - 1 for u in search.units}
    config = no.config_of(bar_plan.space, search.units, sample)
    frozen = model.freeze(sample)
    narrow = psc_nas.build_model(with_width(config, 0.25 * config.hparams.get("width", 1.0)))
    assert sum(p.numel() for p in frozen.parameters()) == sum(p.numel() for p in narrow.parameters())


def test_an_over_budget_export_moves_units_to_cheaper_candidates_least_probability_lost_first(bar_plan):
    search = no.OneShotSearch(bar_plan, "darts", no.parse_options("darts", {}), seed=0, data_dir=None)
    costliest = {u.label: max(range(len(u.kept)), key=lambda i, u=u: u.kept[i].params) for u in search.units}
    assert not search.fits(costliest), "the tiny budget must exclude the costliest architecture"
    probs = {u.label: {i: (0.9 if i == costliest[u.label] else 0.1 / len(u.kept)) for i in range(len(u.kept))}
             for u in search.units}  # fmt: skip
    sample, moved = search._fit_budget(costliest, probs)
    assert search.fits(sample) and moved >= 1
    assert search.price(sample) == cost(no.config_of(bar_plan.space, search.units, sample), (16, 16, 16))
    assert sum(sample[label] != costliest[label] for label in sample) <= moved
    # a budget below every candidate (the space's own check refuses it first in psc-search: all of these
    # candidates are the space's whole, its cheapest included) is refused in one line
    tight = replace(bar_plan, pricing=replace(bar_plan.pricing, budget=Budget(params=10_000)))
    with pytest.raises(ValueError, match="no architecture of the one-shot candidates fits params <= 10k: the cheapest"):
        no.OneShotSearch(tight, "spos", no.parse_options("spos", {}), seed=0, data_dir=None).check_budget()


def test_bad_options_are_one_line():
    for bad, message in [
        ({"steps": 0}, "option steps must be a positive int"),
        ({"width": "wide"}, "option width must be a number"),
        ({"train_share": 1.5}, "option train_share must be below 1"),
        ({"shapes": "1D"}, "unknown --engine-option 'shapes'"),
    ]:
        with pytest.raises(ValueError, match=message):
            no.parse_options("spos", bad)


# ---------------------------------------------------------------------------------------- the command line
@pytest.mark.slow
@pytest.mark.parametrize("strategy", no.STRATEGIES)
def test_each_one_shot_strategy_fills_a_run_folder_psc_export_exports_and_load_model_loads(tmp_path, strategy):
    bars(tmp_path)
    result = run_cli("psc-search", *oneshot_args(strategy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    for name in ("trials.csv", "pareto.json", "best.yaml", "dashboard.html", "search.log", "nni.log", "front"):
        assert (out / name).exists(), name
    said = "NNI one-shot super-net: every decision of the space as a candidate (5 × 5 × 5 × 5 per unit)"
    assert said in result.stdout and said in (out / "search.log").read_text()
    [row] = rows(out / "trials.csv")
    assert row["state"] == "COMPLETE" and row["evaluator"] == f"nni-{strategy}"
    assert row["search_fidelity"].startswith(f"nni {strategy} one-shot super-net (12 steps, width 0.25")
    assert "retrained: 1 epoch" in row["search_fidelity"] and row["error"] == row["retrained_error"]
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    [trial] = study.trials
    config = ArchConfig.from_dict(trial.user_attrs["arch"])
    assert trial.user_attrs["params"] == cost(config, (16, 16, 16)).params <= BUDGET  # exact price, in budget
    space = SearchSpace.load(str(tmp_path / "bars.yaml"))
    answers = trial.user_attrs["built_params"]  # NNI's choice as the space's own answers (trials.csv columns)
    assert space.decide(lambda name, choices: answers[name]).hash == config.hash
    assert study.user_attrs["evaluator"] == f"nni-{strategy}"

    exported = run_cli("psc-export", "run", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    [yaml_file] = (out / "export").glob("*.yaml")
    assert ArchConfig.load(yaml_file).hash == config.hash
    model = psc_nas.load_model(yaml_file)
    assert sum(p.numel() for p in model.parameters()) == trial.user_attrs["params"]

    again = run_cli("psc-search", *oneshot_args(strategy), cwd=tmp_path)  # the same command: nothing left to do
    assert again.returncode == 0, again.stderr
    assert len(optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}").trials) == 1


@pytest.mark.slow
def test_bad_combinations_are_one_line_and_write_nothing(tmp_path):
    bars(tmp_path)
    for args, message in [
        (oneshot_args("darts", "--trials", "5"), "--engine nni --strategy darts trains one super-net"),
        (oneshot_args("spos", "--evaluator", "supernet"), "--evaluator apply to the multi-trial strategies"),
        (oneshot_args("proxyless", "--no-retrain"), "--strategy proxyless scores what it finds by retraining it"),
        (oneshot_args("spos", "--engine-option", "shapes=1D"), "unknown --engine-option 'shapes'"),
        (oneshot_args("spos", "--budget", "10k"), "no architecture in space 'bar_axis_resnet3d' meets params <= 10k"),
        (
            oneshot_args("enas"),
            "unknown NNI strategy 'enas'; choose from evolution, random, tpe, spos, darts, proxyless",
        ),
        (oneshot_args("evolution"), "--engine-option is for --engine cakes and NNI's one-shot strategies"),
    ]:
        result = run_cli("psc-search", *args[:-2], "--out", "never", cwd=tmp_path)
        one_line(result, "psc-search", message, optuna_lines=False)
        assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_ctrl_c_during_the_super_net_training_exits_130_and_leaves_no_trial(tmp_path):
    bars(tmp_path)
    args = oneshot_args("darts")
    args[args.index("steps=12")] = "steps=100000"
    result = ctrl_c_when(
        "training NNI's DARTS one-shot super-net", "psc-search", *args, cwd=tmp_path, env=env(), settle=3
    )
    stderr = result.stderr
    assert result.returncode == 130, stderr
    assert stderr.startswith("psc-search: interrupted") and stderr.count("\n") == 1, stderr
    out = tmp_path / "run"
    assert not list(out.glob("*.tmp*")) and not list(out.glob("front/*"))
    assert optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}").trials == []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="reads sockets from Linux's /proc")
def test_a_one_shot_search_opens_no_port_beyond_loopback(tmp_path):
    """The real psc-search (spos, real training): its process tree's sockets are listed every 0.2 s from the
    moment NNI's log opens until the search ends (the lister is tested in tests/test_nni_engine.py)."""
    from test_nni_engine import beyond_loopback, open_ports

    bars(tmp_path)
    args = oneshot_args("spos")
    args[args.index("steps=12")] = "steps=150"
    search = subprocess.Popen(
        [str(BIN / "psc-search"), *args], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    looks, exposed = 0, []
    deadline = time.monotonic() + 600
    while search.poll() is None and time.monotonic() < deadline:
        if (tmp_path / "run" / "nni.log").exists():
            exposed += beyond_loopback(open_ports(search.pid))
            looks += 1
        time.sleep(0.2)
    stdout, stderr = search.communicate(timeout=60)
    assert search.returncode == 0, stderr.decode()
    assert b"GPU available" not in stdout + stderr, "Lightning's per-trainer lines stay quiet"
    assert looks >= 10, f"only {looks} looks while NNI trained"
    assert exposed == []

"""The run folder's tables read as a user reads them: trials.csv with pandas, pareto.json as JSON.

A real search (the real engine and SQLite study, a stand-in evaluator that reports per-class Dice and
fails some architectures) on the IBSR space, with a budget that some samples exceed: every kind of row.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from fractions import Fraction

import optuna
import pandas as pd
import pytest
import search_standin
from optuna.trial import TrialState
from rich.console import Console

from psc_nas.evaluators import Evaluation, EvaluationFailed, Fidelity
from psc_nas.pareto import hypervolume, normalize, to_minimization
from psc_nas.presets import preset_config
from psc_nas.search.budget import Budget
from psc_nas.search.outputs import decision_columns, trials_table, write_outputs
from psc_nas.search.record import Objective, Retrained, StudyRecord, TrialRecord, read_trials
from psc_nas.search.runner import SearchSettings, run_search
from psc_nas.space import SearchSpace

BUDGET = 2_500_000  # a good share of the space's random samples are over it
CLASSES = {"dice_csf": -0.05, "dice_gm": 0.0, "dice_wm": 0.05}


class PerClassEvaluator(search_standin.StandinEvaluator):
    """The stand-in's score as the mean of three per-class Dice scores; any network with a CSN-ir
    block fails, as a diverged training does."""

    def evaluate(self, config, fidelity, *, seconds_left):
        if any(block.op == "csn_ir" for block in config.blocks):
            raise EvaluationFailed("training loss became nan")
        result = super().evaluate(config, fidelity, seconds_left=seconds_left)
        dice = result.metrics["dice_mean"]
        return replace(result, metrics={**{name: dice + shift for name, shift in CLASSES.items()}, "dice_mean": dice})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    settings = SearchSettings(
        task="ibsr",
        budget=Budget(params=BUDGET),
        trials=8,
        out=out,
        retrain=False,
        sampler="random",
        budget_sampling="reject",
        seed=3,
        prescreen="none",
    )
    run_search(settings, evaluator=PerClassEvaluator(), console=Console(quiet=True))
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    return out, study, {r.number: r for r in read_trials(study)}


def _readable(name: str, space: SearchSpace, value: str | None = None) -> set[str]:
    """The trials.csv columns of one of the space's Optuna parameters (of one answer to it)."""
    unit, op, *rest = name.split(".")
    if rest == ["allocation"]:  # CAKES: a channel fraction per shape (those of the answer, or any)
        shapes = next(u for u in space.units if u.label == unit).domains[op].shapes
        return (
            {f"{unit}.{op}.{part.split('=')[0]}" for part in value.split(",")}
            if value
            else {f"{unit}.{op}.{s}" for s in shapes}
        )
    if len(rest) == 2 and rest[0].startswith("m") and rest[1] == "orientations":
        return {f"{unit}.{op}.orientations"}
    return {name}


def test_trials_csv_has_a_column_per_search_decision(run):
    out, study, records = run
    table = pd.read_csv(out / "trials.csv")
    space = SearchSpace.load("ibsr_densenet3d")
    possible = set().union(*(_readable(name, space) for name in space.parameters()))
    decisions = [c for c in table.columns if c.split(".")[0] in {u.label for u in space.units}]
    assert {f"{u.label}.op" for u in space.units} <= set(decisions) <= possible
    # every parameter a trial was asked is in its row, under its readable name
    for trial in study.trials:
        row = table.set_index("number").loc[trial.number]
        asked = set().union(*(_readable(name, space, value) for name, value in trial.params.items()))
        assert asked and all(not pd.isna(row[column]) for column in asked), (trial.number, trial.params)

    # ... and says what the trial's network is, checked against its ArchConfig
    for row in table.itertuples(index=False):
        config = records[row.number].config()
        values = dict(zip(table.columns, row))
        for unit in space.units:
            block, slot = config.blocks[unit.slots[0]], space.slots[unit.slots[0]]
            assert values[f"{unit.label}.op"] == block.op
            if block.op == "pmscn":
                assert (values[f"{unit.label}.pmscn.m"], values[f"{unit.label}.pmscn.n"]) == (
                    block.args["m"],
                    block.args["n"],
                )
                orientations = values[f"{unit.label}.pmscn.orientations"]
                if block.args["m"] < 3:
                    assert orientations == "+".join(block.args["orientations"])
                else:  # all three: one possible answer, never asked
                    assert pd.isna(orientations)
            if block.op == "p3d":
                assert values[f"{unit.label}.p3d.orientation"] == block.args["orientation"]
            shares = {c.rsplit(".", 1)[1]: values[c] for c in decisions if c.startswith(f"{unit.label}.cakes.")}
            if block.op == "cakes":  # fractions of the slot's channels, 0 for shapes left out, summing to 1
                assert sum(shares.values()) == pytest.approx(1.0)
                for shape, count in block.args["allocation"].items():
                    assert abs(shares[shape] * slot.out_channels - count) < 1
                assert all(shares[s] == 0 for s in shares if s not in block.args["allocation"])
            else:
                assert all(math.isnan(v) for v in shares.values())


def test_trials_csv_scores_only_what_was_trained(run):
    out, _, records = run
    table = pd.read_csv(out / "trials.csv").set_index("number")
    states = table.state.value_counts()
    assert states["COMPLETE"] >= 2 and states["PRUNED"] >= 1 and states["FAIL"] >= 1
    scores = ["dice_mean", *CLASSES, "search_fidelity", "evaluator", "train_s", "fwd_bwd_s", "val_forward_s"]
    for number, row in table.iterrows():
        record = records[number]
        assert row.params == record.params and row.macs == record.macs  # priced, trained or not
        assert row.arch_hash == record.arch_hash and row.over_budget == record.over_budget
        if record.state == TrialState.COMPLETE:
            assert row.dice_mean == pytest.approx(record.values[0]) and row.search_fidelity == record.fidelity.words
            for name in CLASSES:  # per-class metrics of the fidelity the score comes from
                assert row[name] == pytest.approx(record.metrics[name])
            assert pd.isna(row.fail_reason)
        else:  # over budget (never trained) or failed: NaN, never 0
            assert all(pd.isna(row[column]) for column in scores), (number, row[scores].to_dict())
        if record.state == TrialState.FAIL:
            assert row.fail_reason == "at 1 stand-in epochs: training loss became nan"
        if record.state == TrialState.PRUNED:
            assert row.over_budget and row.params > BUDGET and pd.isna(row.fail_reason)
        assert pd.isna(row.retrained_dice_mean) and pd.isna(row.retrained_fidelity)  # retrain=False
    assert table.fail_reason.dropna().map(type).eq(str).all()


def test_pareto_json_states_its_hypervolume_box_costs_and_fidelity(run):
    out, _, records = run
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["input_shape"] == [1, 32, 32, 32] and summary["task"] == "ibsr"
    assert "fidelity" in summary["fields"] and "epochs" in summary["fields"]["fidelity"]
    assert "input_shape" in summary["fields"]["macs"]
    definition = summary["hypervolume_definition"]
    assert definition["objectives"] == ["dice_mean", "params"]
    assert definition["reference_point"] == {"dice_mean": 0.0, "params": BUDGET}
    assert definition["ideal_point"] == {"dice_mean": 1.0, "params": 0.0}
    assert "params budget" in definition["normalisation"]
    # the stated box gives the stated hypervolume, from the feasible trials' scores
    points = [(r.values[0], r.params) for r in records.values() if r.feasible]
    ideal, reference = (
        (p["dice_mean"], p["params"]) for p in (definition["ideal_point"], definition["reference_point"])
    )
    points, (ideal, reference) = (
        to_minimization(points, [True, False]),
        to_minimization([ideal, reference], [True, False]),
    )
    assert (
        hypervolume(normalize(points, ideal, reference), (1.0, 1.0)) == pytest.approx(summary["hypervolume"])
        and summary["hypervolume"] > 0
    )
    for entry in summary["front"]:
        record = records[entry["number"]]
        assert (entry["params"], entry["macs"], entry["latency_ms"]) == (record.params, record.macs, None)
        assert entry["fidelity"] == record.fidelity.words
        assert entry["metrics"] == pytest.approx(record.metrics) and set(CLASSES) <= set(entry["metrics"])


# ------------------------------------------------------------------------------ without a search
HPARAMS = {"init_channels": 8, "growth_rate": 6, "side_channels": 4, "num_blocks": 2, "layers_per_block": 2}
OBJECTIVES = (Objective("dice_mean", maximize=True), Objective("params", maximize=False))


def _evaluated(number: int, decisions: dict, dice: float, **fields) -> TrialRecord:
    result = Evaluation("train", Fidelity(2, "2 epochs × 8 samples"), {"dice_mean": dice, "dice_gm": dice - 0.1}, [])
    return TrialRecord(
        number,
        TrialState.COMPLETE,
        (dice, 1000.0 + number),
        params=1000 + number,
        macs=9000,
        evaluations=(replace(result, wall_s=3.0, evaluated_by=number),),
        decisions=decisions,
        **fields,
    )


def test_decisions_are_readable_columns_in_the_spaces_order():
    records = [
        _evaluated(0, {"b0.op": "cakes", "b0.cakes.allocation": "1x3x3=1/4,3x3x3=3/4", "b1.op": "conv3d"}, 0.5),
        _evaluated(
            1,
            {
                "b0.op": "pmscn",
                "b0.pmscn.m": 2,
                "b0.pmscn.n": 1,
                "b0.pmscn.m2.orientations": "1x3x3+3x1x3",
                "b0.pmscn.width": 0.5,
                "b1.op": "cakes",
                "b1.cakes.allocation": "3x1x1=4/4",
            },
            0.6,
        ),
        _evaluated(2, {"b0.op": "pmscn", "b0.pmscn.m": 1, "b0.pmscn.n": 3, "b0.pmscn.m1.orientations": "3x3x1"}, 0.4),
    ]
    table = decision_columns(records)
    assert list(table.columns) == [
        "b0.op",
        "b0.cakes.1x3x3",
        "b0.cakes.3x3x3",
        "b0.pmscn.m",
        "b0.pmscn.n",
        "b0.pmscn.orientations",
        "b0.pmscn.width",
        "b1.op",
        "b1.cakes.3x1x1",
    ]
    assert table.loc[0, ["b0.cakes.1x3x3", "b0.cakes.3x3x3"]].tolist() == [0.25, 0.75]
    assert table["b0.pmscn.orientations"].tolist()[1:] == ["1x3x3+3x1x3", "3x3x1"]
    assert table["b1.cakes.3x1x1"].tolist()[1] == 1.0 and math.isnan(table["b1.cakes.3x1x1"][0])
    assert math.isnan(table["b0.pmscn.m"][0]) and math.isnan(table["b0.pmscn.width"][2])
    assert float(Fraction("3/4")) == table["b0.cakes.3x3x3"][0]


def test_the_retrained_score_stands_beside_the_search_score(tmp_path):
    config = preset_config("csn_ip", "densenet3d", **HPARAMS)
    retrained = Retrained(
        config.hash,
        Evaluation(
            "retrain",
            Fidelity(20, "retrained: 20 epochs × 32 samples, one-cycle, full width"),
            {"dice_mean": 0.8, "dice_gm": 0.75},
            [],
            wall_s=60.0,
        ),
        seed=1,
        trial=0,
    )
    records = [
        _evaluated(0, {"b0.op": "csn_ip"}, 0.5, arch=config.to_dict(), arch_hash=config.hash, retrained=retrained),
        _evaluated(1, {"b0.op": "conv3d"}, 0.4),
        TrialRecord(2, TrialState.PRUNED, violations={"params": 0.5}, params=3000, macs=5, decisions={"b0.op": "p3d"}),
    ]
    table = trials_table(records, OBJECTIVES)
    at = list(table.columns).index("dice_mean")
    assert list(table.columns[at - 1 : at + 3]) == [
        "search_fidelity",
        "dice_mean",
        "retrained_dice_mean",
        "retrained_fidelity",
    ]
    assert table.loc[0, ["dice_mean", "retrained_dice_mean", "dice_gm", "retrained_dice_gm"]].tolist() == [
        0.5,
        0.8,
        0.4,
        0.75,
    ]
    assert table.loc[0, "retrained_fidelity"].startswith("retrained: 20 epochs")
    assert table.loc[0, "search_fidelity"] == "2 epochs × 8 samples"
    assert table.loc[1, ["retrained_dice_mean", "retrained_dice_gm"]].isna().all()
    assert table.loc[2, ["dice_mean", "dice_gm", "train_s", "search_fidelity"]].isna().all()

    write_outputs(tmp_path, StudyRecord("ibsr", None, Budget(params=2000), OBJECTIVES), records[:1])
    section = json.loads((tmp_path / "pareto.json").read_text())["retrained"]
    assert section["hypervolume_definition"]["scores"] == "the retrained scores (`retrained_score`)"
    assert section["hypervolume_definition"]["reference_point"] == {"dice_mean": 0.0, "params": 2000}


def test_a_projected_trial_reads_the_decisions_that_built_it(tmp_path):
    """Under --budget-sampling project the network built can differ from the sampler's answers."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    trial = study.ask()
    trial.suggest_categorical("b0.op", ["conv3d", "p3d"])
    study.tell(trial, 1.0)
    other = study.ask()
    other.suggest_categorical("b0.op", ["conv3d", "p3d"])
    other.set_user_attr("built_params", {"b0.op": "p3d", "b0.p3d.orientation": "3x1x3"})
    study.tell(other, 1.0)
    first, second = read_trials(study)
    assert first.decisions == study.trials[0].params == {"b0.op": first.decisions["b0.op"]}
    assert second.decisions == {"b0.op": "p3d", "b0.p3d.orientation": "3x1x3"}


def test_without_a_budget_the_hypervolume_says_its_cost_bound_is_the_largest_cost_seen(tmp_path):
    configs = [preset_config(name, "densenet3d", **HPARAMS) for name in ("csn_ip", "csn_ir")]
    records = [
        _evaluated(n, {"b0.op": c.blocks[0].op}, d, arch=c.to_dict()) for n, c, d in zip((0, 1), configs, (0.5, 0.7))
    ]
    write_outputs(tmp_path, StudyRecord("ibsr", None, Budget(), OBJECTIVES), records)
    summary = json.loads((tmp_path / "pareto.json").read_text())
    definition = summary["hypervolume_definition"]
    assert definition["reference_point"] == {"dice_mean": 0.0, "params": 1001}  # trial 1's params, the largest
    assert "no params budget" in definition["normalisation"] and "compare directly" not in definition["normalisation"]
    # (0.5, 1000/1001) and (0.7, 1) in the unit box: only the first dominates any area
    assert summary["hypervolume"] == pytest.approx(0.5 * (1 - 1000 / 1001))

"""The study record on a real SQLite study: what is written reads back the same, and every reader
(pareto.json, best.yaml, the dashboard, psc-export) finds the same front and knee."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import optuna
import pytest
from optuna.trial import TrialState

import psc_nas
from psc_nas.costs import Cost
from psc_nas.dashboard import payload
from psc_nas.evaluators import Evaluation, Fidelity
from psc_nas.export import export
from psc_nas.presets import preset_config
from psc_nas.results import Run
from psc_nas.search.budget import Budget
from psc_nas.search.front import find_front, quality_hypervolume
from psc_nas.search.outputs import write_outputs
from psc_nas.search.record import (
    Objective,
    Retrained,
    StudyRecord,
    TrialRecord,
    read_trials,
    save_retrained,
    set_violations,
    tell_evaluated,
    tell_over_budget,
)

HPARAMS = {"init_channels": 8, "growth_rate": 6, "side_channels": 4, "num_blocks": 2, "layers_per_block": 2}
CONFIG = preset_config("csn_ip", "densenet3d", **HPARAMS)
OBJECTIVES = (Objective("dice_mean", maximize=True), Objective("params", maximize=False))


def new_study(tmp_path, name: str = "run") -> optuna.Study:
    (tmp_path / name).mkdir()
    return optuna.create_study(
        study_name=name, storage=f"sqlite:///{tmp_path / name / 'study.db'}", directions=["maximize", "minimize"]
    )


def evaluation(fidelity: int, dice: float, by: int) -> Evaluation:
    return Evaluation(
        "train",
        Fidelity(fidelity, f"{fidelity} epochs × 8 samples"),
        {"dice_mean": dice},
        [{"epoch": e + 1, "dice_mean": dice} for e in range(fidelity)],
        wall_s=1.5 * fidelity,
        fwd_bwd_s=fidelity,
        val_forward_s=0.25,
        evaluated_by=by,
    )


def test_a_record_reads_back_as_written(tmp_path):
    study = new_study(tmp_path)
    trial = study.ask()
    written = (
        TrialRecord(trial.number, preset="csn_ip")
        .priced(CONFIG, Cost(1234, 56789))
        .with_evaluation(evaluation(2, math.nan, by=0))
        .with_evaluation(evaluation(1, 0.5, by=7))
    )
    written = replace(written, latency_ms=3.5, fail_reason="at 2 epochs: diverged")
    written.save(trial)
    written.save(trial)  # unchanged, NaN included: nothing to write, nothing breaks
    study.tell(trial, state=TrialState.FAIL)
    # a retraining after the search belongs to the architecture, stored on the study (the trial is finished)
    retrained = Retrained(
        CONFIG.hash, evaluation(20, 0.8, by=0), seed=3, trial=trial.number, weights="front/0.weights.pt"
    )
    save_retrained(study, retrained)
    written = replace(written, retrained=retrained)
    read = read_trials(study)[0]
    assert read.state == TrialState.FAIL and read.completed_at is not None
    for field in ("arch", "arch_hash", "params", "macs", "preset", "latency_ms", "fail_reason", "retrained"):
        assert getattr(read, field) == getattr(written, field), field
    assert read.retrained.epochs == 20 and study.user_attrs[f"retrained:{CONFIG.hash}"]["seed"] == 3
    assert read.retrained.weights == "front/0.weights.pt"  # which file holds the retrained network
    assert [e.fidelity.key for e in read.evaluations] == [1, 2]  # cheap to expensive, whatever the order told
    assert read.evaluations[0] == written.evaluations[0]
    assert math.isnan(read.metrics["dice_mean"]) and read.fidelity == Fidelity(2, "2 epochs × 8 samples")
    assert read.own_evaluations() == [read.evaluations[1]]  # the 1-epoch result was another trial's
    assert read.config() == CONFIG
    attrs = study.trials[0].user_attrs  # the top result is repeated as plain columns for Optuna's own tools
    assert attrs["fidelity"] == 2 and attrs["fidelity_words"] == "2 epochs × 8 samples"


def test_over_budget_is_pruned_never_feasible(tmp_path):
    study = new_study(tmp_path)
    budget = Budget(params=1000)
    trial = study.ask()
    TrialRecord(trial.number).priced(CONFIG, Cost(1500, 10)).save(trial)
    set_violations(trial, budget.violations(Cost(1500, 10)))
    tell_over_budget(study, trial)
    record = read_trials(study)[0]
    assert record.state == TrialState.PRUNED and record.values is None
    assert record.over_budget and not record.feasible and record.violations == {"params": 0.5}


def test_study_record_round_trip_and_what_a_resume_must_match(tmp_path):
    study = new_study(tmp_path)
    ranged = (Objective("dice_mean", True, range=(0.0, 100.0)), Objective("params", False))
    record = StudyRecord("ibsr", "ibsr_densenet3d", Budget(params=5_000_000), ranged, "train")
    record.write(study)
    read = StudyRecord.read(study)
    assert read == record and study.metric_names == ["dice_mean", "params"]
    other = StudyRecord("ibsr", "ibsr_densenet3d", Budget(params=4_000_000), ranged, "supernet")
    assert read.changes(other) == {"budget_params": (5_000_000, 4_000_000), "evaluator": ("train", "supernet")}


def test_hypervolume_normalizes_the_metric_by_its_recorded_range():
    done = [TrialRecord(0, TrialState.COMPLETE, values=(50.0, 0.0))]
    study = StudyRecord(
        "t", "s", Budget(params=10), (Objective("score", True, range=(0.0, 100.0)), Objective("params", False))
    )
    assert quality_hypervolume(done, study) == pytest.approx(0.5)
    lower_is_better = StudyRecord(
        "t", "s", Budget(params=10), (Objective("error", False, range=(0.0, 4.0)), Objective("params", False))
    )
    assert quality_hypervolume([TrialRecord(0, TrialState.COMPLETE, values=(1.0, 5.0))], lower_is_better) == 0.375


def test_every_reader_names_the_same_knee_when_completion_order_differs_from_numbers(tmp_path):
    """Three collinear trade-offs tie for the knee; they finish in reverse order. The knee is the
    earliest trial for pareto.json, best.yaml, the dashboard's Run and psc-export alike."""
    study = new_study(tmp_path)
    record = StudyRecord("ibsr", "ibsr_densenet3d", Budget(params=10_000_000), OBJECTIVES, "train")
    record.write(study)
    configs = [preset_config(name, "densenet3d", **HPARAMS) for name in ("csn_ip", "cakes_uniform", "csn_ir")]
    prices = [psc_nas.cost(c, (32, 32, 32)) for c in configs]
    low, high = prices[0].params, prices[-1].params
    assert low < prices[1].params < high
    trials = [study.ask() for _ in configs]
    values = []
    for trial, config, price in zip(trials, configs, prices):
        dice = 0.6 + 0.2 * (price.params - low) / (high - low)  # collinear in (dice, params)
        priced = TrialRecord(trial.number).priced(config, price)
        priced.with_evaluation(evaluation(1, dice, by=trial.number)).save(trial)
        values.append((dice, price.params))
    for trial, told in reversed(list(zip(trials, values))):
        tell_evaluated(study, trial, told)
    records = read_trials(study)
    assert [r.completed_at for r in records] == sorted((r.completed_at for r in records), reverse=True)

    front = write_outputs(tmp_path / "run", record, records)
    run = Run.open(tmp_path / "run")
    assert front.knee.number == json.loads((tmp_path / "run" / "pareto.json").read_text())["knee"] == 0
    assert run.knee() == payload(run)["knee"] == find_front(records, record).knee.number == 0
    assert export(tmp_path / "run", out_dir=tmp_path / "export").record.number == 0

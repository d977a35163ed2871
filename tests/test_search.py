"""The search engine end to end on a real SQLite study, with a cheap stand-in for training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

import search_standin
from psc_nas import cost
from psc_nas.arch import ArchConfig
from psc_nas.search.budget import Budget
from psc_nas.search.profiles import PROFILES
from psc_nas.search.runner import SearchSettings, run_search
from psc_nas.train import TrainingFailed

SPATIAL = search_standin.SPATIAL


def search(tmp_path: Path, name: str = "run", *, trainer=search_standin.train, **overrides) -> tuple[optuna.Study, Path]:
    settings = SearchSettings(**{"task": "ibsr", "budget": Budget(params=5_000_000), "trials": 8,
                                 "out": tmp_path / name, **overrides})
    run_search(settings, trainer=trainer, console=Console(quiet=True))
    storage = f"sqlite:///{tmp_path / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=storage), tmp_path / name


def trained(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == TrialState.COMPLETE and t.user_attrs["fidelity"] > 0]


def test_search_records_the_schema_and_writes_front_and_knee(tmp_path):
    study, out = search(tmp_path)
    assert study.user_attrs["task"] == "ibsr"
    assert study.user_attrs["budget_params"] == 5_000_000
    assert study.user_attrs["objectives"] == [{"name": "dice_mean", "direction": "maximize", "range": [0.0, 1.0]},
                                              {"name": "params", "direction": "minimize", "range": [0.0, 5_000_000.0]}]
    done = trained(study)
    assert len(done) == 8
    for trial in done:
        config = ArchConfig.from_dict(trial.user_attrs["arch"])
        assert trial.user_attrs["arch_hash"] == config.hash
        assert trial.user_attrs["params"] == cost(config, SPATIAL).params == trial.values[1]
        assert trial.values[0] == trial.user_attrs["metrics"]["dice_mean"]
        assert trial.user_attrs["fidelity"] == max(r["fidelity"] for r in trial.user_attrs["rungs"])
    # the papers' designs that fit 5M and are in the space come first, marked
    presets = {t.user_attrs["preset"]: t for t in study.trials if t.user_attrs.get("preset")}
    assert set(presets) == {"csn_ip", "csn_ir"}  # conv3d (5.16M) and p2sc* are over, cakes_uniform not in the space
    assert all(t.number < 2 for t in presets.values())

    summary = json.loads((out / "pareto.json").read_text())
    front_numbers = {entry["number"] for entry in summary["front"]}
    values = {t.number: t.values for t in done}
    for number in front_numbers:  # nothing trained dominates a front point
        d, p = values[number]
        assert not any(d2 >= d and p2 <= p and (d2, p2) != (d, p) for d2, p2 in values.values())
    assert summary["knee"] in front_numbers
    assert ArchConfig.load(out / "best.yaml").hash == study.trials[summary["knee"]].user_attrs["arch_hash"]
    assert {p.name for p in (out / "front").iterdir()} == {f"{n}.yaml" for n in front_numbers}
    # every search leaves the offline dashboard behind, showing this study
    page = (out / "dashboard.html").read_text()
    embedded = page.split('<script type="application/json" id="run-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded)["knee"] == summary["knee"]
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 1 + len(study.trials)
    assert 0 < summary["hypervolume"] < 1


def test_over_budget_candidates_are_recorded_but_never_trained(tmp_path, monkeypatch):
    log = tmp_path / "trained.log"
    monkeypatch.setenv("PSC_TRAIN_LOG", str(log))
    budget = 2_500_000  # a good share of the space's random samples are over
    study, out = search(tmp_path, budget=Budget(params=budget), sampler="random")
    over = [t for t in study.trials if t.user_attrs["params"] > budget]
    assert over, "the budget should reject some samples"
    for trial in over:
        assert trial.state == TrialState.COMPLETE and trial.user_attrs["fidelity"] == 0
        assert trial.constraints["params"] == pytest.approx(trial.user_attrs["params"] / budget - 1)
        assert trial.constraints["params"] > 0
    trained_hashes = {line.split()[0] for line in log.read_text().splitlines()}
    assert trained_hashes.isdisjoint(t.user_attrs["arch_hash"] for t in over)
    assert len(trained(study)) == 8  # over-budget samples were replaced: --trials counts trained ones
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert all(entry["values"]["params"] <= budget for entry in front)


def test_nothing_trains_twice_at_one_fidelity_and_promotions_are_front_members(tmp_path, monkeypatch):
    log = tmp_path / "trained.log"
    monkeypatch.setenv("PSC_TRAIN_LOG", str(log))
    study, _ = search(tmp_path, trials=12)
    lines = Counter(" ".join(line.split()[:2]) for line in log.read_text().splitlines())
    assert max(lines.values()) == 1
    fidelities = Counter(t.user_attrs["fidelity"] for t in trained(study) if not t.user_attrs["preset"])
    low, high = PROFILES["quick"].schedule.rungs
    assert fidelities[low] > 0 and fidelities[high] > 0  # some promoted, not all
    assert fidelities[high] <= -(-fidelities[low] // 3) * 2  # at most ceil(n/eta) per bracket of 6


def test_impossible_budget_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="no architecture in space 'ibsr_densenet3d' meets params <= 100k"):
        search(tmp_path, budget=Budget(params=100_000))
    assert not (tmp_path / "run").exists()


def test_same_seed_gives_the_same_sequence(tmp_path):
    first, _ = search(tmp_path, "a", seed=3, trials=6)
    second, _ = search(tmp_path, "b", seed=3, trials=6)
    other, _ = search(tmp_path, "c", seed=4, trials=6)
    hashes = [[t.user_attrs["arch_hash"] for t in s.trials] for s in (first, second, other)]
    assert hashes[0] == hashes[1]
    assert hashes[0] != hashes[2]


def test_a_failing_candidate_is_recorded_and_the_search_goes_on(tmp_path):
    def flaky(config, epochs, max_seconds):
        kind = int(config.hash, 16) % 3
        if kind == 0:
            raise TrainingFailed("training loss became nan at epoch 0, step 3")
        if kind == 1 and epochs > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return search_standin.train(config, epochs, max_seconds)

    study, _ = search(tmp_path, trainer=flaky, trials=10)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all("training failed: training loss became nan" in t.user_attrs["fail_reason"] for t in failed)
    oom = [t for t in study.trials if "out of memory" in (t.user_attrs.get("fail_reason") or "")]
    # a promotion that ran out of memory keeps the trial's lower-fidelity result
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["fidelity"] == 1 for t in oom)
    assert oom
    assert len(failed) + len(trained(study)) == 10


def test_latency_objective_is_measured_once_per_architecture(tmp_path):
    study, out = search(tmp_path, trials=2, objectives=("metric", "params", "latency"))
    assert [o["name"] for o in study.user_attrs["objectives"]] == ["dice_mean", "params", "latency_ms"]
    for trial in trained(study):
        assert trial.values[2] == trial.user_attrs["latency_ms"] > 0
    assert "latency_ms" in json.loads((out / "pareto.json").read_text())["front"][0]["values"]


def test_journal_storage_is_a_file_based_alternative(tmp_path):
    journal = tmp_path / "study.log"
    settings = SearchSettings(task="ibsr", budget=Budget(params=5_000_000), trials=3, out=tmp_path / "run",
                              storage=f"journal:{journal}", study_name="j")
    run_search(settings, trainer=search_standin.train, console=Console(quiet=True))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    assert len(trained(optuna.load_study(study_name="j", storage=storage))) == 3

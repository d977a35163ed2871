"""The search engine end to end on a real SQLite study, with a cheap stand-in evaluator."""

from __future__ import annotations

import io
import json
import wsgiref.util
from collections import Counter
from pathlib import Path

import optuna
import pytest
import search_standin
from optuna.trial import TrialState
from rich.console import Console

from psc_nas import cost
from psc_nas.arch import ArchConfig
from psc_nas.evaluators import EvaluationFailed
from psc_nas.search.budget import Budget
from psc_nas.search.events import Evaluated, FrontChanged, OverBudget, describe
from psc_nas.search.optuna_adapter import storage_of, study_id
from psc_nas.search.profiles import PROFILES
from psc_nas.search.record import StudyRecord, TrialRecord, read_trials
from psc_nas.search.runner import SearchSettings, plan_search, run_search

SPATIAL = search_standin.SPATIAL


def search(tmp_path: Path, name: str = "run", *, evaluator=None, **overrides) -> tuple[optuna.Study, Path]:
    settings = SearchSettings(
        **{
            "task": "ibsr",
            "budget": Budget(params=5_000_000),
            "trials": 8,
            "out": tmp_path / name,
            "retrain": False,
            "prescreen": "none",  # IBSR's quick profile screens 300 real networks first; tested in test_prescreen
            **overrides,
        }
    )
    run_search(settings, evaluator=evaluator or search_standin.StandinEvaluator(), console=Console(quiet=True))
    storage = f"sqlite:///{tmp_path / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=storage), tmp_path / name


def evaluated(study: optuna.Study) -> list[TrialRecord]:
    return [r for r in read_trials(study) if r.state == TrialState.COMPLETE]


def test_search_records_the_schema_and_writes_front_and_knee(tmp_path):
    study, out = search(tmp_path)
    recorded = StudyRecord.read(study)
    assert recorded.task == "ibsr" and recorded.budget == Budget(params=5_000_000)
    assert recorded.evaluator == "standin" and recorded.planned_trials == 8
    assert [o.to_dict() for o in recorded.objectives] == [
        {"name": "dice_mean", "direction": "maximize", "range": [0.0, 1.0]},
        {"name": "params", "direction": "minimize", "range": [0.0, 5_000_000.0]},
    ]
    assert recorded.input_shape == (1, 32, 32, 32)
    assert study.metric_names == ["dice_mean", "params"]
    done = evaluated(study)
    assert len(done) == 8
    for record in done:
        config = record.config()
        assert record.arch_hash == config.hash
        assert record.params == cost(config, SPATIAL).params == record.values[1]
        assert record.values[0] == record.metrics["dice_mean"]
        assert record.fidelity == max((e.fidelity for e in record.evaluations), key=lambda f: f.key)
        assert record.fidelity.words.endswith("stand-in epochs") and record.result.evaluator == "standin"
    # each field is its own user attribute, as optuna-dashboard and trials_dataframe show them
    columns = set(study.trials_dataframe().columns)
    assert {"user_attrs_params", "user_attrs_fidelity_words", "user_attrs_metrics", "user_attrs_evaluations"} <= columns
    # the papers' designs that fit 5M and are in the space come first, marked
    presets = {r.preset: r for r in read_trials(study) if r.preset}
    assert set(presets) == {"csn_ip", "csn_ir"}  # conv3d (5.16M) and p2sc* are over, cakes_uniform not in the space
    assert all(r.number < 2 for r in presets.values())

    summary = json.loads((out / "pareto.json").read_text())
    front_numbers = {entry["number"] for entry in summary["front"]}
    values = {r.number: r.values for r in done}
    for number in front_numbers:  # nothing evaluated dominates a front point
        d, p = values[number]
        assert not any(d2 >= d and p2 <= p and (d2, p2) != (d, p) for d2, p2 in values.values())
    assert summary["knee"] in front_numbers
    assert ArchConfig.load(out / "best.yaml").hash == next(r.arch_hash for r in done if r.number == summary["knee"])
    assert {p.name for p in (out / "front").iterdir()} == {f"{n}.yaml" for n in front_numbers}
    # every search leaves the offline dashboard behind, showing this study
    page = (out / "dashboard.html").read_text()
    embedded = page.split('<script type="application/json" id="run-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded)["knee"] == summary["knee"]
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 1 + len(study.trials)
    assert 0 < summary["hypervolume"] < 1


def test_over_budget_candidates_are_pruned_never_evaluated_and_no_optuna_tool_counts_them(tmp_path, monkeypatch):
    log = tmp_path / "trained.log"
    monkeypatch.setenv("PSC_TRAIN_LOG", str(log))
    budget = 2_500_000  # a good share of the space's random samples are over
    study, out = search(tmp_path, budget=Budget(params=budget), sampler="random", budget_sampling="reject")
    records = read_trials(study)
    over = [r for r in records if r.params > budget]
    assert over, "the budget should reject some samples"
    for record in over:
        assert record.state == TrialState.PRUNED and record.over_budget and not record.evaluations
        assert record.violations["params"] == pytest.approx(record.params / budget - 1)
    trained_hashes = {line.split()[0] for line in log.read_text().splitlines()}
    assert trained_hashes.isdisjoint(r.arch_hash for r in over)
    assert len(evaluated(study)) == 8  # over-budget samples were replaced: --trials counts evaluated ones
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert all(entry["values"]["params"] <= budget for entry in front)

    # Optuna's own readers: the best trials, the Pareto-front plot, and optuna-dashboard's API
    over_numbers = {r.number for r in over}
    assert {t.number for t in study.best_trials} == {e["number"] for e in front}
    plotted = optuna.visualization.plot_pareto_front(study, include_dominated_trials=True)
    assert {n for trace in plotted.data for n in _trial_numbers(trace)} == {r.number for r in records if r.feasible}
    served = _dashboard_api(study)
    assert {t["number"] for t in served["best_trials"]} == {e["number"] for e in front}
    assert {t["number"] for t in served["trials"] if t["state"] == "Pruned"} == over_numbers
    assert all("values" not in t for t in served["trials"] if t["number"] in over_numbers)


def _trial_numbers(trace) -> list[int]:
    # plot_pareto_front writes "Trial": N as the first entry of each point's hover JSON
    return [json.loads(text.replace("<br>", ""))["number"] for text in (trace.hovertext or trace.text or [])]


def _dashboard_api(study: optuna.Study) -> dict:
    """optuna-dashboard's own JSON for the study (its WSGI app, no server)."""
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    app = optuna_dashboard.wsgi(storage_of(study))
    environ: dict = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ["PATH_INFO"] = f"/api/studies/{study_id(study)}"
    environ["wsgi.input"] = io.BytesIO()
    status = []
    body = b"".join(app(environ, lambda code, headers, *rest: status.append(code)))
    assert status[0].startswith("200"), body[:300]
    return json.loads(body)


def test_nothing_is_evaluated_twice_at_one_fidelity_and_promotions_are_front_members(tmp_path, monkeypatch):
    log = tmp_path / "trained.log"
    monkeypatch.setenv("PSC_TRAIN_LOG", str(log))
    study, _ = search(tmp_path, trials=12)
    lines = Counter(" ".join(line.split()[:2]) for line in log.read_text().splitlines())
    assert max(lines.values()) == 1
    fidelities = Counter(r.fidelity.key for r in evaluated(study) if not r.preset)
    low, high = PROFILES["quick"].epochs
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
    hashes = [[r.arch_hash for r in read_trials(s)] for s in (first, second, other)]
    assert hashes[0] == hashes[1]
    assert hashes[0] != hashes[2]


class FlakyEvaluator(search_standin.StandinEvaluator):
    """Diverges on a third of the architectures, runs out of memory above 1 epoch on another third."""

    def evaluate(self, config, fidelity, *, seconds_left):
        kind = int(config.hash, 16) % 3
        if kind == 0:
            raise EvaluationFailed("training failed: training loss became nan at epoch 0, step 3")
        if kind == 1 and fidelity.key > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().evaluate(config, fidelity, seconds_left=seconds_left)


def test_a_failing_candidate_is_recorded_and_the_search_goes_on(tmp_path):
    study, _ = search(tmp_path, evaluator=FlakyEvaluator(), trials=10)
    records = read_trials(study)
    failed = [r for r in records if r.state == TrialState.FAIL]
    assert failed and all("training failed: training loss became nan" in r.fail_reason for r in failed)
    assert all(r.fail_reason.startswith("at 1 stand-in epochs: ") for r in failed)
    oom = [r for r in records if "out of memory" in (r.fail_reason or "")]
    # a promotion that ran out of memory keeps the trial's lower-fidelity result
    assert all(r.state == TrialState.COMPLETE and r.fidelity.key == 1 for r in oom)
    assert oom
    assert len(failed) + len(evaluated(study)) == 10


def test_latency_objective_is_measured_once_per_architecture(tmp_path):
    study, out = search(tmp_path, trials=2, objectives=("metric", "params", "latency"))
    assert [o.name for o in StudyRecord.read(study).objectives] == ["dice_mean", "params", "latency_ms"]
    for record in evaluated(study):
        assert record.values[2] == record.latency_ms > 0
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert "latency_ms" in front[0]["values"]
    measured = {r.number: r.latency_ms for r in evaluated(study)}
    assert all(entry["latency_ms"] == entry["values"]["latency_ms"] == measured[entry["number"]] for entry in front)


def test_journal_storage_is_a_file_based_alternative(tmp_path):
    journal = tmp_path / "study.log"
    settings = SearchSettings(
        task="ibsr",
        budget=Budget(params=5_000_000),
        trials=3,
        out=tmp_path / "run",
        retrain=False,
        prescreen="none",
        storage=f"journal:{journal}",
        study_name="j",
    )
    run_search(settings, evaluator=search_standin.StandinEvaluator(), console=Console(quiet=True))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    assert len(evaluated(optuna.load_study(study_name="j", storage=storage))) == 3


def test_events_report_every_evaluation_and_over_budget_sample(tmp_path):
    """The engine's progress events, with what a one-line report needs, match the study."""
    from psc_nas.search.engine import Engine
    from psc_nas.search.storage import open_storage, open_study

    settings = SearchSettings(
        task="ibsr",
        budget=Budget(params=2_500_000),
        trials=5,
        out=tmp_path / "run",
        retrain=False,
        prescreen="none",
        sampler="random",
        budget_sampling="reject",
    )
    plan = plan_search(settings, search_standin.StandinEvaluator())
    plan.out_dir.mkdir()
    storage = open_storage(f"sqlite:///{plan.out_dir / 'study.db'}", heartbeat_interval=10)
    study, created = open_study(storage, "run", record=plan.record, sampler=optuna.samplers.RandomSampler(seed=0))
    events = []
    engine = Engine(plan, study, on_event=events.append)
    engine.fill_queue(created)
    front = engine.run()

    records = {r.number: r for r in read_trials(study)}
    fresh = [e for e in events if isinstance(e, Evaluated) and not e.reused]
    assert sorted((e.number, e.fidelity.key) for e in fresh) == sorted(
        (r.number, e.fidelity.key) for r in records.values() for e in r.own_evaluations()
    )
    for event in fresh:
        assert event.score == records[event.number].evaluation_at(event.fidelity.key).metrics["dice_mean"]
        assert event.summary == records[event.number].summary()
    assert {e.number for e in events if isinstance(e, OverBudget)} == {n for n, r in records.items() if r.over_budget}
    assert events[-1].done == events[-1].planned == 5
    last = [e for e in events if isinstance(e, FrontChanged)][-1]  # sent only when the front moved
    assert [m.number for m in last.front.members] == [m.number for m in front.members]
    assert all(describe(e).count("\n") == 0 for e in events)


class UnpreparedEvaluator(search_standin.StandinEvaluator):
    def prepare(self, work_dir, *, seconds_left):
        raise RuntimeError("the super-network's loss became nan\nat step 3")


def test_an_evaluator_that_cannot_prepare_ends_the_search_in_one_line(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^evaluator standin could not prepare: RuntimeError: the super-network's "
        r"loss became nan$",
    ):
        search(tmp_path, evaluator=UnpreparedEvaluator(), trials=2, retrain=False)

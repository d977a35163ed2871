"""Retraining the front after the search, on real SQLite studies.

The end-to-end test trains for real (psc_nas.train.fit) on the tiny bar-axis task of
tests/tiny_task.py; the others use the search tests' stand-in evaluator and count retrainings.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
import pytest
import search_standin
import tiny_task
from rich.console import Console

import psc_nas
from psc_nas import memory
from psc_nas.arch import ArchConfig
from psc_nas.dashboard import payload
from psc_nas.evaluators import Evaluation, Fidelity
from psc_nas.pareto import knee_point, to_minimization
from psc_nas.results import Run
from psc_nas.search import retrain
from psc_nas.search.budget import Budget
from psc_nas.search.events import Retrained as RetrainedEvent
from psc_nas.search.events import RetrainPlanned, describe
from psc_nas.search.front import find_front
from psc_nas.search.profiles import PROFILES, RetrainPolicy
from psc_nas.search.record import Retrained, StudyRecord, read_retrained, read_trials
from psc_nas.search.runner import SearchSettings, run_search

TINY_POLICY = RetrainPolicy(count=2, epochs=3, samples_per_epoch=16, batch_size=8, lr_schedule="onecycle")


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


class Counting:
    """Wraps ``retrain.train_member`` (still training for real, or a stand-in) and counts its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, train=None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.train = train or retrain.train_member
        monkeypatch.setattr(retrain, "train_member", self)

    def __call__(self, job, record, epochs, *, seconds_left):
        self.calls.append((record.number, epochs))
        return self.train(job, record, epochs, seconds_left=seconds_left)


# ------------------------------------------------------------------------------ end to end, real training
@pytest.mark.slow
def test_a_tiny_search_retrains_its_front_and_every_output_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(PROFILES, "tiny", tiny_task.retraining_profile(TINY_POLICY, timeout=600.0))
    (tmp_path / "bars.yaml").write_text(tiny_task.SPACE_YAML)
    out = tmp_path / "bars"
    settings = SearchSettings(
        task="bar_axis",
        space=str(tmp_path / "bars.yaml"),
        budget=Budget(params=400_000),
        profile="tiny",
        out=out,
        seed=1,
    )
    counting = Counting(monkeypatch)
    run_search(settings, console=Console(quiet=True))

    study = load(out)
    retrained = read_retrained(study)
    records = read_trials(study)
    front = find_front(records, StudyRecord.read(study))
    assert 1 <= len(retrained) <= TINY_POLICY.count
    # the knee is retrained first, then its neighbours; every retrained architecture is a front member's
    assert counting.calls[0][1] == 1  # the probe: one timed epoch of the costliest member
    assert front.knee.arch_hash in retrained
    front_hashes = {r.arch_hash for r in front.members}
    assert set(retrained) <= front_hashes
    epochs = {r.epochs for r in retrained.values()}
    assert len(epochs) == 1 and 1 <= epochs.pop() <= TINY_POLICY.epochs  # one schedule for all, fitted to time
    for result in retrained.values():
        assert result.seed == 1 and result.evaluation.evaluator == "retrain"
        assert result.fidelity.words.startswith(f"retrained: {result.epochs} epoch")
        assert len(result.evaluation.curve) == result.epochs and result.evaluation.wall_s > 0
        assert 0.0 <= result.metrics["error"] <= 1.0
        assert records[result.trial].arch_hash == result.arch_hash
        # its final weights (those its metrics score) kept beside its config, loadable as they are
        assert result.weights == f"front/{result.trial}.weights.pt"
        assert psc_nas.load_model(out / "front" / f"{result.trial}.yaml").training is False
    assert sorted(p.name for p in (out / "front").glob("*.weights.pt")) == sorted(
        f"{r.trial}.weights.pt" for r in retrained.values()
    )  # nothing else: a probe that trains again leaves no file of its own

    # best.yaml: the knee rule over the retrained members scored by their retrained error
    members = [r for r in front.members if r.arch_hash in retrained]
    points = to_minimization([(retrained[r.arch_hash].metrics["error"], r.values[1]) for r in members], [False, False])
    knee = members[knee_point(points)]
    assert front.retrained_knee.number == knee.number
    assert ArchConfig.load(out / "best.yaml").hash == knee.arch_hash

    summary = json.loads((out / "pareto.json").read_text())
    assert summary["best"] == knee.number and summary["knee"] == front.knee.number
    section = summary["retrained"]
    assert section["knee"] == knee.number and section["metric"] == "error"
    assert {m["arch_hash"] for m in section["members"]} == set(retrained)
    for member in section["members"]:
        result = retrained[member["arch_hash"]]
        assert member["retrained_score"] == result.metrics["error"]
        assert member["retrained_fidelity"] == result.fidelity.words and member["epochs"] == result.epochs
        assert member["search_score"] == records[member["number"]].values[0]
        assert member["search_fidelity"] == "1 epoch × 8 samples"
        assert member["weights"] == result.weights

    table = pd.read_csv(out / "trials.csv")
    # the retrained score beside the search's, each with its fidelity in words
    assert list(table.columns[table.columns.get_loc("search_fidelity") :][:4]) == [
        "search_fidelity",
        "error",
        "retrained_error",
        "retrained_fidelity",
    ]
    for row in table.itertuples():
        result = retrained.get(row.arch_hash) if isinstance(row.arch_hash, str) else None
        if result is None:
            assert math.isnan(row.retrained_error) and not isinstance(row.retrained_fidelity, str)
        else:
            assert row.retrained_error == pytest.approx(result.metrics["error"])
            assert row.retrained_fidelity == result.fidelity.words

    run = Run.open(out)  # psc-export and the dashboard
    assert run.knee() == knee.number and run.search_knee() == front.knee.number
    page = payload(run)
    assert page["knee"] == knee.number and page["search_knee"] == front.knee.number
    shown = {row["number"]: row for row in page["trials"]}
    assert shown[knee.number]["retrained_fidelity"] == retrained[knee.arch_hash].fidelity.words
    log = (out / "search.log").read_text()
    assert log.count("retrained: ") >= len(retrained)  # a line per retrained network

    # a resume retrains nothing twice
    before = {h: r.evaluation.wall_s for h, r in retrained.items()}
    calls = len(counting.calls)
    run_search(settings, console=Console(quiet=True))
    assert len(counting.calls) == calls
    assert {h: r.evaluation.wall_s for h, r in read_retrained(load(out)).items()} == before


# ------------------------------------------------------------------------------ choosing and fitting to time
SETUP_S = 0.5  # the stand-in training's set-up, paid once per run


def stand_in_train(clock: list[float], epoch_s: dict[int, float]):
    """A training that takes ``SETUP_S`` plus ``epoch_s[trial]`` seconds per epoch on a fake clock, and
    times its epochs in the curve as ``psc_nas.train.fit`` does."""

    def train(job, record, epochs, *, seconds_left):
        seconds = SETUP_S + epoch_s[record.number] * epochs
        clock[0] += seconds
        evaluation = Evaluation(
            "retrain",
            Fidelity(epochs, retrain.fidelity_words(job.policy, epochs)),
            {"dice_mean": 0.5 + 0.01 * record.number},
            [{"epoch": e + 1, "epoch_s": epoch_s[record.number]} for e in range(epochs)],
            wall_s=seconds,
        )
        return Retrained(record.arch_hash, evaluation, job.seed, record.number)

    return train


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A stand-in search without retraining: a real study and front to retrain."""
    out = tmp_path_factory.mktemp("searched") / "run"
    run_search(
        SearchSettings(
            task="ibsr", budget=Budget(params=5_000_000), trials=10, out=out, retrain=False, prescreen="none"
        ),
        evaluator=search_standin.StandinEvaluator(),
        console=Console(quiet=True),
    )
    study = load(out)
    return out, find_front(read_trials(study), StudyRecord.read(study))


def test_no_retrain_leaves_the_search_knee_as_best_yaml(searched):
    out, front = searched
    assert read_retrained(load(out)) == {}
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["retrained"] is None and summary["best"] == summary["knee"] == front.knee.number
    assert ArchConfig.load(out / "best.yaml").hash == front.knee.arch_hash
    assert pd.read_csv(out / "trials.csv").retrained_dice_mean.isna().all()


def test_the_retrained_fidelity_names_its_schedule_and_optimiser():
    words = retrain.fidelity_words
    assert words(RetrainPolicy(lr=1e-3), 1) == "retrained: 1 epoch × 32 samples, one-cycle, Adam lr 0.001, full width"
    tuned = RetrainPolicy(lr=2e-3, weight_decay=1e-4, lr_schedule="constant", samples_per_epoch=8)
    assert words(tuned, 32) == "retrained: 32 epochs × 8 samples, AdamW lr 0.002 (weight decay 0.0001), full width"


def test_members_are_the_knee_then_its_nearest_neighbours_by_cost(searched):
    _, front = searched
    assert len(front.members) >= 3, "the stand-in search should leave a front of several trials"
    ordered = sorted(front.members, key=lambda r: r.values[1:])
    at = [r.number for r in ordered].index(front.knee.number)
    chosen = retrain.choose_members(front, 3)
    assert chosen[0].number == front.knee.number
    positions = sorted([r.number for r in ordered].index(c.number) for c in chosen)
    assert positions == list(range(positions[0], positions[0] + 3)) and positions[0] <= at <= positions[-1]
    assert len(retrain.choose_members(front, 100)) == len({r.arch_hash for r in front.members})


def test_the_schedule_is_the_longest_that_fits_the_time_left(searched):
    _, front = searched
    members = retrain.choose_members(front, 3)
    costliest = max(members, key=lambda m: (m.macs, m.params))  # the probe times the costliest by MACs
    epoch_s = {r.number: 1.0 + r.macs / costliest.macs for r in members}  # ... the slowest here, 2 s an epoch
    clock, saved, plans = [0.0], [], []
    job = retrain.RetrainJob(RetrainPolicy(count=3, epochs=50), task=None, seed=4)
    results = retrain.retrain_front(
        front,
        job,
        done=set,
        seconds_left=lambda: 200.0 - clock[0],
        save=saved.append,
        on_plan=plans.append,
        train=stand_in_train(clock, epoch_s),
    )
    # one probe epoch of each member (its set-up apart, paid once per training), then the longest schedule whose
    # sum over the members fits what is left; sized by the costliest alone it would be shorter
    probes_s = sum(SETUP_S + epoch_s[m.number] for m in members)
    expected = math.floor((200.0 - probes_s - 3 * SETUP_S) / sum(epoch_s.values()))
    by_costliest = math.floor(((200.0 - SETUP_S - epoch_s[costliest.number]) / 3 - SETUP_S) / epoch_s[costliest.number])
    assert plans[0].probe_s == pytest.approx(sum(epoch_s.values()) / 3) and plans[0].setup_s == pytest.approx(SETUP_S)
    assert plans[0].timings == tuple((epoch_s[m.number], pytest.approx(SETUP_S)) for m in members)
    assert plans[0].epochs == expected > by_costliest
    assert [r.epochs for r in results] == [expected] * 3 and saved == results
    assert [r.trial for r in results] == [m.number for m in members]
    assert clock[0] <= 200.0  # the schedule chosen fits the time left

    # no time limit: the policy's longest schedule, no probe
    clock[0], plans[:] = 0.0, []
    results = retrain.retrain_front(
        front,
        job,
        done=set,
        seconds_left=lambda: None,
        save=lambda r: None,
        on_plan=plans.append,
        train=stand_in_train(clock, epoch_s),
    )
    assert plans[0].probe_s is None and [r.epochs for r in results] == [50] * 3

    # one epoch fits: the probes are the members' results
    clock[0], plans[:] = 0.0, []
    results = retrain.retrain_front(
        front,
        job,
        done=set,
        seconds_left=lambda: 8.0 - clock[0],
        save=lambda r: None,
        on_plan=plans.append,
        train=stand_in_train(clock, epoch_s),
    )
    assert plans[0].epochs == 1 and [r.trial for r in results] == [m.number for m in members]
    assert [r.epochs for r in results] == [1, 1, 1]

    # less time left than one epoch of the search's own training of the costliest member: nothing starts
    slow = [
        replace(r, evaluations=tuple(replace(e, wall_s=30.0 * e.fidelity.key) for e in r.evaluations))
        for r in front.members
    ]
    slow_front = replace(front, members=tuple(slow), knee=next(r for r in slow if r.number == front.knee.number))
    clock[0], plans[:] = 0.0, []
    assert (
        retrain.retrain_front(
            slow_front,
            job,
            done=set,
            seconds_left=lambda: 29.0,
            save=saved.append,
            on_plan=plans.append,
            train=stand_in_train(clock, epoch_s),
        )
        == []
    )
    assert clock[0] == 0.0 and plans == []
    assert (
        retrain.retrain_front(
            slow_front,
            job,
            done=set,
            seconds_left=lambda: 31.0 - clock[0],
            save=lambda r: None,
            train=stand_in_train(clock, epoch_s),
        )
        != []
    )

    # architectures already retrained (a resume) are not trained again
    clock[0] = 0.0
    done = {m.arch_hash for m in members}
    assert (
        retrain.retrain_front(
            front,
            job,
            done=lambda: done,
            seconds_left=lambda: 200.0,
            save=saved.append,
            train=stand_in_train(clock, epoch_s),
        )
        == []
    )
    assert clock[0] == 0.0


def test_a_probe_splits_its_wall_time_into_one_epoch_and_a_set_up_paid_once():
    # the curve's epoch time is the epoch; the rest of the wall time is the set-up
    assert retrain.probe_timing(30.0, [{"epoch": 0, "epoch_s": 24.0}]) == (24.0, 6.0)
    # without a timed curve, or with an epoch time the wall time cannot hold, the whole wall time is an epoch
    for curve in (None, [], [{"epoch": 0}], [{"epoch_s": 0.0}], [{"epoch_s": -1.0}], [{"epoch_s": 31.0}]):
        assert retrain.probe_timing(30.0, curve) == (30.0, 0.0)
    assert retrain.probe_timing(0.0, None) == (1e-3, 0.0)  # never a zero epoch to divide by
    # the schedule: set-up once, then whole epochs, capped by the policy's longest
    assert retrain.epochs_that_fit(100.0, 10.0, 6.0, 50) == 9
    assert retrain.epochs_that_fit(100.0, 10.0, 6.0, 5) == 5
    assert retrain.epochs_that_fit(15.0, 10.0, 6.0, 50) == 0  # not even one epoch after the set-up


def test_retraining_events_read_as_one_line_each(searched):
    _, front = searched
    knee = front.knee
    planned = RetrainPlanned(numbers=(knee.number, 3), epochs=12, epoch_s=4.25, done=10, planned=10)
    assert describe(planned) == (
        f"retraining 2 front trials ({knee.number}, 3) from scratch, 12 epochs, 4.2s per epoch measured"
    )
    line = describe(
        RetrainedEvent(
            number=knee.number,
            metric="dice_mean",
            score=0.61,
            fidelity="retrained: 12 epochs",
            search_score=0.3,
            search_fidelity="2 stand-in epochs",
            seconds=50.0,
            summary="x",
            done=10,
            planned=10,
        )
    )
    assert line == (
        f"trial {knee.number} retrained: 12 epochs (50.0s): dice_mean = 0.6100 (search: 0.3000 at 2 stand-in epochs; x)"
    )


class Interrupting(search_standin.StandinEvaluator):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def evaluate(self, config, fidelity, *, seconds_left):
        self.calls += 1
        if self.calls == 4:
            raise KeyboardInterrupt
        return super().evaluate(config, fidelity, seconds_left=seconds_left)


def test_a_search_stopped_by_ctrl_c_skips_retraining(tmp_path, monkeypatch):
    counting = Counting(monkeypatch, train=lambda *a, **k: pytest.fail("retrained after Ctrl-C"))
    settings = SearchSettings(
        task="ibsr", budget=Budget(params=5_000_000), trials=8, out=tmp_path / "run", retrain=True, prescreen="none"
    )
    with pytest.raises(KeyboardInterrupt):
        run_search(settings, evaluator=Interrupting(), console=Console(quiet=True))
    assert counting.calls == [] and read_retrained(load(tmp_path / "run")) == {}


# ------------------------------------------------------------------------------ memory
FAULTS = """
import resource, sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from psc_nas.memory import keep_freed_memory
    assert keep_freed_memory() is True and keep_freed_memory() is True
net = torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(16, 16, 3, padding=1))
x = torch.randn(2, 1, 32, 32, 32)
for _ in range(2):  # warm-up: the first steps' allocations are faults in either mode
    net(x).sum().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # the churn grows with the steps; freed memory kept does not fault again
    net(x).sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_the_page_fault_churn_of_training_steps():
    root = str(Path(__file__).resolve().parents[1])

    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", FAULTS, mode],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONPATH": root, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        return int(done.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert kept * 3 < default, (kept, default)


def test_keep_freed_memory_is_idempotent_and_does_nothing_without_glibc(monkeypatch):
    def no_glibc(*args):
        raise OSError("libc.so.6: cannot open shared object file")  # what ctypes says on musl, macOS, Windows

    monkeypatch.setattr(memory, "_done", False)
    monkeypatch.setattr(memory.ctypes, "CDLL", no_glibc)
    assert memory.keep_freed_memory() is False and memory.keep_freed_memory() is False
    monkeypatch.undo()
    monkeypatch.setattr(memory, "_done", False)
    if sys.platform.startswith("linux"):
        assert memory.keep_freed_memory() is True and memory.keep_freed_memory() is True

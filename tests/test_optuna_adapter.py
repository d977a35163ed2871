"""The Optuna adapter on real storages: every internal it reaches for, used the way the search uses it.

When an Optuna upgrade moves one of them, these tests fail with OptunaInternalsMoved naming it.
"""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState

from psc_nas.search import optuna_adapter as adapter
from psc_nas.search.optuna_adapter import OptunaInternalsMoved
from psc_nas.search.record import enqueue, read_trials
from psc_nas.search.storage import open_storage


def make_study(tmp_path, *, heartbeat_interval: int = 60, name: str = "s") -> optuna.Study:
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=heartbeat_interval)
    return optuna.create_study(
        storage=storage, study_name=name, directions=["maximize", "minimize"], load_if_exists=True
    )


def test_claims_take_queued_trials_in_order_each_once_and_never_create_one(tmp_path):
    study = make_study(tmp_path)
    other_worker = make_study(tmp_path)  # a second process's view of the same study
    for _ in range(4):
        enqueue(study, {})
    claimed = [
        adapter.claim_waiting(study),
        adapter.claim_waiting(other_worker),
        adapter.claim_waiting(study),
        adapter.claim_waiting(other_worker),
    ]
    assert [t.number for t in claimed] == [0, 1, 2, 3]
    assert adapter.claim_waiting(study) is None and adapter.claim_waiting(other_worker) is None
    assert [r.state for r in read_trials(study)] == [TrialState.RUNNING] * 4


@pytest.mark.slow
def test_a_silent_worker_s_trial_is_failed_and_retried_with_what_it_stored(tmp_path):
    study = make_study(tmp_path, heartbeat_interval=1)
    enqueue(study, {}, preset="csn_ip")
    trial = adapter.claim_waiting(study)
    trial.set_user_attr("arch_hash", "abc")
    with adapter.Heartbeat(study) as heartbeat:
        heartbeat.hold(trial)
        assert heartbeat.held == [adapter.trial_id(trial)]
        time.sleep(2.5)  # beating: not stale
        adapter.fail_stale(study)
        assert read_trials(study)[0].state == TrialState.RUNNING
    time.sleep(3.5)  # silent for longer than the grace period (3 intervals)
    adapter.fail_stale(study)
    original, retry = read_trials(study)
    assert original.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING and retry.retry_of == original.number
    assert (retry.preset, retry.arch_hash) == ("csn_ip", "abc")


def test_release_fails_held_trials_and_queues_their_retries_at_once(tmp_path):
    study = make_study(tmp_path)
    enqueue(study, {})
    trial = adapter.claim_waiting(study)
    adapter.release(study, [adapter.trial_id(trial)])
    assert [(r.state, r.retry_of) for r in read_trials(study)] == [(TrialState.FAIL, None), (TrialState.WAITING, 0)]
    assert adapter.snapshot(study, adapter.claim_waiting(study)).number == 1


def test_heartbeat_interval_is_the_storage_s_or_none_without_heartbeats(tmp_path):
    assert adapter.heartbeat_interval(make_study(tmp_path, heartbeat_interval=7)) == 7
    journal = open_storage(f"journal:{tmp_path / 'journal.log'}", heartbeat_interval=7)
    assert adapter.heartbeat_interval(optuna.create_study(storage=journal)) is None


def test_metric_names_are_optuna_s_own(tmp_path):
    study = make_study(tmp_path)
    adapter.name_metrics(study, ["dice_mean", "params"])
    study.add_trial(optuna.trial.create_trial(values=[0.8, 1000]))
    assert study.metric_names == ["dice_mean", "params"]
    assert {"values_dice_mean", "values_params"} <= set(study.trials_dataframe().columns)


def test_a_moved_internal_is_named_in_the_error(tmp_path, monkeypatch):
    study = make_study(tmp_path)
    enqueue(study, {})
    frozen = study.get_trials()[0]
    monkeypatch.delattr(frozen, "_trial_id")
    with pytest.raises(OptunaInternalsMoved, match=r"FrozenTrial._trial_id"):
        adapter.trial_id(frozen)
    monkeypatch.delattr(study, "_storage")
    with pytest.raises(OptunaInternalsMoved, match=r"optuna .*: Study._storage .* moved .*optuna_adapter.py"):
        adapter.claim_waiting(study)
    import optuna.storages._heartbeat as heartbeat_module

    monkeypatch.delattr(heartbeat_module, "BaseHeartbeat")
    with pytest.raises(OptunaInternalsMoved, match=r"optuna.storages._heartbeat.BaseHeartbeat"):
        adapter.heartbeat_interval(make_study(tmp_path, name="t"))

"""Every use of Optuna beyond its stable public API, in one place.

psc-search works off a queue of WAITING trials with many workers and a heartbeat per held trial;
Optuna's public API has no "take a queued trial, or nothing" (``Study.ask`` creates one when the
queue is empty) and no heartbeat for trials run outside ``Study.optimize``. What that takes:

    Study._storage, Study._study_id       the study's own (cached) storage and its id
    Trial._trial_id                       a trial's storage id
    BaseStorage.set_trial_state_values    atomic WAITING -> RUNNING claim, FAIL on release,
                                          RUNNING -> WAITING when Ctrl-C hands a trial back
    BaseStorage.set_trial_user_attr       a failed trial's reason, written just before it fails
    optuna.storages._heartbeat            BaseHeartbeat: record_heartbeat, get_heartbeat_interval
    RDBStorage._get_stale_trial_ids       trials whose worker went silent (fail_stale_trials, with reasons)
    experimental: fail_stale_trials, RetryHeartbeatStaleTrialCallback, Study.set_metric_names
    FrozenTrial.system_attrs["fixed_params"]  the parameters enqueue_trial fixed (a preset's, a retry's)

Each accessor raises :class:`OptunaInternalsMoved` naming the internal it misses, and
tests/test_optuna_adapter.py runs every function here on a real storage, so an Optuna upgrade that
breaks the adapter fails loudly, in one place, instead of deep inside a search.
"""

from __future__ import annotations

import copy
import importlib
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

MAX_RETRIES = 2  # a trial that kills its worker every time is given up after this many retries


class OptunaInternalsMoved(RuntimeError):
    """An Optuna internal psc-nas relies on is not where it was."""


def _moved(what: str, why: str) -> OptunaInternalsMoved:
    return OptunaInternalsMoved(
        f"optuna {optuna.__version__}: {what} moved or changed ({why}); psc_nas/search/optuna_adapter.py must follow it"
    )


def _internal(owner: Any, name: str, what: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        raise _moved(what, f"no attribute {name!r} on {type(owner).__name__}") from None


def _heartbeat_base() -> type:
    try:
        return importlib.import_module("optuna.storages._heartbeat").BaseHeartbeat
    except (ImportError, AttributeError) as error:
        raise _moved("optuna.storages._heartbeat.BaseHeartbeat", str(error)) from None


@contextmanager
def experimental_ok() -> Iterator[None]:
    """Optuna marks heartbeats, stale-trial retries and metric names experimental; we rely on them knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage_of(study: optuna.Study) -> BaseStorage:
    # The study's own (cached) view of the storage: claiming a trial behind its back would leave
    # the study's cache unaware of the trial, as ``Study.ask`` itself claims through it.
    return _internal(study, "_storage", "Study._storage (a study's storage)")


def study_id(study: optuna.Study) -> int:
    return _internal(study, "_study_id", "Study._study_id (a study's storage id)")


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return _internal(trial, "_trial_id", f"{type(trial).__name__}._trial_id (a trial's storage id)")


def snapshot(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """The trial as stored now (its user attributes, constraints and, for a retry, its origin)."""
    return storage_of(study).get_trial(trial_id(trial))


def fixed_params(trial: FrozenTrial) -> dict[str, Any] | None:
    """The parameters ``enqueue_trial`` fixed for this trial (a preset's, a retry's), or None."""
    return trial.system_attrs.get("fixed_params") or None


def claim_waiting(study: optuna.Study) -> optuna.Trial | None:
    """Atomically take one queued (WAITING) trial, or None when the queue is empty.

    ``Study.ask`` would create a fresh trial when the queue is empty; a search run only ever works
    off its queue, which is what keeps the number of trials exact with many workers.
    """
    storage = storage_of(study)
    for frozen in storage.get_all_trials(study_id(study), deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(trial_id(frozen), state=TrialState.RUNNING):
                return optuna.Trial(study, trial_id(frozen))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker took and finished it between our read and our claim
    return None


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Queues a copy of a trial whose worker died, with its parameters, user and system attributes."""
    with experimental_ok():
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def retry_of(trial: FrozenTrial) -> int | None:
    """Number of the trial a retry continues (None for an original)."""
    with experimental_ok():
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def fail_stale(study: optuna.Study, attrs: Mapping[str, Any] | None = None) -> None:
    """Fail trials whose worker stopped beating, with ``attrs`` (the reason) written on them first,
    and queue their retries (up to MAX_RETRIES). ``optuna.storages.fail_stale_trials`` does the same
    without the reason, which a finished trial no longer accepts."""
    storage = storage_of(study)
    if heartbeat_interval(study) is None:
        return
    stale = _internal(storage, "_get_stale_trial_ids", "RDBStorage._get_stale_trial_ids (stale trials)")
    fail_and_retry(study, stale(study_id(study)), attrs or {})


def fail_and_retry(study: optuna.Study, trial_ids: Iterable[int], attrs: Mapping[str, Any]) -> None:
    """Fail ``trial_ids`` with user attributes ``attrs`` (why) and queue a retry of each (its parameters
    and other attributes, not ``attrs``: a retry starts without its original's failure)."""
    storage = storage_of(study)
    retry = retry_callback()
    for held in trial_ids:
        try:
            for key, value in attrs.items():
                storage.set_trial_user_attr(held, key, value)
            if storage.set_trial_state_values(held, state=TrialState.FAIL):
                failed = copy.deepcopy(storage.get_trial(held))
                for key in attrs:
                    failed.user_attrs.pop(key, None)
                retry(study, failed)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed or finished it first


def release(study: optuna.Study, trial_ids: Iterable[int], attrs: Mapping[str, Any] | None = None) -> None:
    """Fail trials this worker holds but will not finish (it is crashing) and queue their retries now."""
    fail_and_retry(study, trial_ids, attrs or {})


def requeue(study: optuna.Study, trial_ids: Iterable[int]) -> list[int]:
    """Put trials this worker holds back in the queue (RUNNING -> WAITING), as they are: an interrupt is
    no crash, so no retry is used; what they stored (evaluations) is reused when they are claimed again.
    Returns the numbers of the trials put back."""
    storage = storage_of(study)
    numbers = []
    for held in trial_ids:
        try:
            if storage.set_trial_state_values(held, state=TrialState.WAITING):
                numbers.append(storage.get_trial(held).number)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # told between the interrupt and here
    return numbers


def heartbeat_interval(study: optuna.Study) -> int | None:
    """Seconds between heartbeats, None for storages without them (JournalStorage)."""
    storage = storage_of(study)
    if not isinstance(storage, _heartbeat_base()):
        return None
    return _internal(storage, "get_heartbeat_interval", "BaseHeartbeat.get_heartbeat_interval")()


def name_metrics(study: optuna.Study, names: list[str]) -> None:
    with experimental_ok():
        study.set_metric_names(names)


class Heartbeat:
    """Beats for every trial this worker holds, from one background thread."""

    def __init__(self, study: optuna.Study) -> None:
        self._storage = storage_of(study)
        self._interval = heartbeat_interval(study)
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="psc-search-heartbeat", daemon=True)

    def hold(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._held.add(trial_id(trial))
        self._beat([trial_id(trial)])

    def drop(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._held.discard(trial_id(trial))

    def drop_all(self) -> None:
        with self._lock:
            self._held.clear()

    @property
    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def _beat(self, trial_ids: Iterable[int]) -> None:
        if self._interval:
            record = _internal(self._storage, "record_heartbeat", "BaseHeartbeat.record_heartbeat")
            for held in trial_ids:
                record(held)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._beat(self.held)

    def __enter__(self) -> Heartbeat:
        if self._interval:
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

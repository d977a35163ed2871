"""Where a search keeps its study, how workers share it, and how a crashed worker's trials come back.

    --storage (none)              runs/<name>/study.db, SQLite (one machine; waits on locks)
    --storage postgresql://...    any SQLAlchemy URL (many workers on many machines)
    --storage journal:PATH        Optuna's JournalStorage on a shared file (no database server)

RDB storages run with a heartbeat: a worker beats for every trial it holds; a trial whose worker
went silent for ``grace`` seconds (kill -9, power loss) is failed by the next worker that looks,
and ``RetryHeartbeatStaleTrialCallback`` queues a copy with the same parameters *and user
attributes*, so the rung results the dead worker had stored are reused, not retrained.
JournalStorage has no heartbeat in Optuna: there a worker killed mid-trial leaves it RUNNING.

The study is a plain Optuna study: ``optuna.load_study`` and optuna-dashboard read it as-is.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Iterable

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

STUDY_FILE = "study.db"
JOURNAL_PREFIX = "journal:"
SCHEMA_ATTEMPTS = 5  # concurrent first opens of one database (see open_storage)
MAX_RETRIES = 2  # a trial that kills its worker every time is given up after this many retries


def storage_url(storage: str | None, out_dir: Path) -> str:
    return storage if storage else f"sqlite:///{(out_dir / STUDY_FILE).resolve()}"


def open_storage(url: str, *, heartbeat_interval: int) -> BaseStorage:
    """The storage behind ``url``; raises ``ValueError`` with one clear line for a bad URL or server."""
    if url.startswith(JOURNAL_PREFIX):
        return JournalStorage(JournalFileBackend(url[len(JOURNAL_PREFIX):]))
    if "://" not in url:
        raise ValueError(f"--storage must be a database URL (sqlite:///..., postgresql://...) or journal:PATH, got {url!r}")
    # SQLite serializes writers; waiting for the lock beats failing a trial on "database is locked".
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8; we rely on them knowingly
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=3 * heartbeat_interval,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
                )
        except sqlalchemy.exc.IntegrityError:
            # Workers started together on an empty database race to create Optuna's tables; the
            # loser sees a duplicate-key error and finds the tables there on its next try.
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
        except Exception as err:  # SQLAlchemy raises driver-specific types for "cannot connect"
            raise ValueError(f"cannot open storage {url!r}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def claim_waiting(study: optuna.Study, storage: BaseStorage, study_id: int) -> optuna.Trial | None:
    """Atomically take one queued (WAITING) trial, or None when the queue is empty.

    ``Study.ask`` would create a fresh trial when the queue is empty; a search run only ever works
    off its queue, which is what keeps the number of trials exact with many workers.
    """
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker took and finished it between our read and our claim
    return None


def fail_stale(study: optuna.Study) -> None:
    """Fail trials whose worker stopped beating; the storage's callback queues their retries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def release(study: optuna.Study, storage: BaseStorage, trial_ids: Iterable[int]) -> None:
    """Fail trials this worker holds but will not finish (Ctrl-C) and queue retries right away."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    for trial_id in trial_ids:
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue


def heartbeat_interval(storage: BaseStorage) -> int | None:
    """Seconds between heartbeats, None for storages without them (JournalStorage)."""
    return storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) else None


class Heartbeat:
    """Beats for every trial this worker holds, from one background thread."""

    def __init__(self, storage: BaseStorage) -> None:
        self._storage = storage
        self._interval = heartbeat_interval(storage)
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="psc-search-heartbeat", daemon=True)

    def hold(self, trial_id: int) -> None:
        with self._lock:
            self._held.add(trial_id)
        self._beat([trial_id])

    def drop(self, trial_id: int) -> None:
        with self._lock:
            self._held.discard(trial_id)

    @property
    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def _beat(self, trial_ids: Iterable[int]) -> None:
        if self._interval:
            for trial_id in trial_ids:
                self._storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]

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


def wait_for_study_attr(study: optuna.Study, key: str, *, timeout: float = 120.0) -> None:
    """Wait until the worker that created the study has finished setting it up."""
    deadline = time.monotonic() + timeout
    while key not in study.user_attrs:
        if time.monotonic() > deadline:
            raise ValueError(f"study {study.study_name!r} exists but was never set up (no {key!r}); use another --study-name")
        time.sleep(0.5)


def open_study(
    storage: BaseStorage, name: str, *, directions: list[str], sampler: optuna.samplers.BaseSampler,
    attrs: dict[str, object],
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it to resume; True when this worker created it.

    ``attrs`` (task, space, budgets, objectives) describe what the study searches; a resume with
    different ones is refused rather than mixing two searches' trials in one front.
    """
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        wait_for_study_attr(study, "slots")
        recorded = {key: study.user_attrs.get(key) for key in attrs}
        if recorded != attrs:
            changed = [key for key in attrs if recorded[key] != attrs[key]]
            raise ValueError(
                f"study {name!r} searches {', '.join(f'{k}={recorded[k]!r}' for k in changed)}, not "
                f"{', '.join(f'{k}={attrs[k]!r}' for k in changed)}; resume with the same options or use another --out/--study-name"
            ) from None
        return study, False
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study, True

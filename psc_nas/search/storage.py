"""Where a search keeps its study, how workers share it, and how a crashed worker's trials come back.

    --storage (none)              runs/<name>/study.db, SQLite (one machine; waits on locks)
    --storage postgresql://...    any SQLAlchemy URL (many workers on many machines)
    --storage journal:PATH        Optuna's JournalStorage on a shared file (no database server)

RDB storages run with a heartbeat: a worker beats for every trial it holds; a trial whose worker
went silent for ``grace`` seconds (kill -9, power loss) is failed by the next worker that looks,
and a retry callback queues a copy with the same parameters *and user attributes*, so the
evaluations the dead worker had stored are reused, not recomputed (psc_nas.search.optuna_adapter).
JournalStorage has no heartbeat in Optuna: there a worker killed mid-trial leaves it RUNNING.

The study is a plain Optuna study: ``optuna.load_study`` and optuna-dashboard read it as-is.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from psc_nas.search.optuna_adapter import experimental_ok, retry_callback
from psc_nas.search.record import StudyRecord, wait_until_set_up

STUDY_FILE = "study.db"
JOURNAL_PREFIX = "journal:"
SCHEMA_ATTEMPTS = 5  # concurrent first opens of one database (see open_storage)


def storage_url(storage: str | None, out_dir: Path) -> str:
    return storage if storage else f"sqlite:///{(out_dir / STUDY_FILE).resolve()}"


def open_storage(url: str, *, heartbeat_interval: int) -> BaseStorage:
    """The storage behind ``url``; raises ``ValueError`` with one clear line for a bad URL or server."""
    if url.startswith(JOURNAL_PREFIX):
        return JournalStorage(JournalFileBackend(url[len(JOURNAL_PREFIX) :]))
    if "://" not in url:
        raise ValueError(
            f"--storage must be a database URL (sqlite:///..., postgresql://...) or journal:PATH, got {url!r}"
        )
    # SQLite serializes writers; waiting for the lock beats failing a trial on "database is locked".
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            with experimental_ok():  # heartbeats since Optuna 2.8
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=3 * heartbeat_interval,
                    heartbeat_stale_trial_callback=retry_callback(),
                )
        except sqlalchemy.exc.DatabaseError as err:
            # Workers started together on an empty database (or a worker and a reader such as
            # ``optuna.load_study``) race to create Optuna's tables; the loser sees a duplicate key in
            # pg_type (IntegrityError), 'relation/type ... already exists' (PostgreSQL's DuplicateTable
            # and DuplicateObject are ProgrammingErrors) or "table ... already exists" (SQLite's
            # OperationalError), and finds the tables on its next try.
            if not _schema_race(err) or attempt == SCHEMA_ATTEMPTS - 1:
                raise ValueError(redact(f"cannot open storage {url!r}: {_first_line(err)}", url)) from None
            time.sleep(0.5 * (attempt + 1))
        except Exception as err:  # SQLAlchemy raises driver-specific types for "cannot connect"
            raise ValueError(redact(f"cannot open storage {url!r}: {_first_line(err)}", url)) from None
    raise AssertionError("unreachable")


def _schema_race(err: Exception) -> bool:
    return isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)


def _first_line(err: Exception) -> str:
    reason = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {reason}"


_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]*)@")


def redact(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (``scheme://user:password@host``) replaced by ``***``,
    wherever it appears: the URL itself, or a driver's message quoting it."""
    match = _PASSWORD.search(url)
    if match and match.group("password"):
        text = text.replace(match.group("password"), "***")
    return _PASSWORD.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", text)


def open_study(
    storage: BaseStorage,
    name: str,
    *,
    record: StudyRecord,
    sampler: optuna.samplers.BaseSampler,
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it to resume; True when this worker created it.

    ``record`` says what the study searches (task, space, budgets, objectives, evaluator); a resume
    with different ones is refused rather than mixing two searches' trials in one front.
    """
    directions = [o.direction for o in record.objectives]
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        wait_until_set_up(study)
        recorded = StudyRecord.read(study)
        if recorded.other_data(record):
            raise ValueError(
                f"study {name!r} was searched on {recorded.describe_data()}, not on "
                f"{record.describe_data()}; resume on the same data or use another --out/--study-name"
            ) from None
        changed = recorded.changes(record)
        if changed:
            raise ValueError(
                f"study {name!r} searches {', '.join(f'{k}={old!r}' for k, (old, _) in changed.items())}, not "
                f"{', '.join(f'{k}={new!r}' for k, (_, new) in changed.items())}; resume with the same options "
                "or use another --out/--study-name"
            ) from None
        return study, False
    record.write(study)
    return study, True

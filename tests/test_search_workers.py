"""Search workers as separate processes: resume after kill -9, and many workers on one PostgreSQL study."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from psc_nas.search.record import TrialRecord, read_trials

STANDIN = Path(__file__).with_name("search_standin.py")


def start_worker(settings: dict, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(STANDIN), json.dumps(settings)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(worker: subprocess.Popen) -> None:
    output, _ = worker.communicate(timeout=170)
    assert worker.returncode == 0, output


def evaluated(study: optuna.Study) -> list[TrialRecord]:
    return [r for r in read_trials(study) if r.state == TrialState.COMPLETE]


_OPEN_AT = """
import sys, time
from psc_nas.search.storage import open_storage
start = float(sys.argv[2])
while time.time() < start:
    pass
open_storage(sys.argv[1], heartbeat_interval=60)
"""


def open_together(url: str, processes: int = 6) -> None:
    """``processes`` interpreters open the empty database at ``url`` in the same instant; all must get it."""
    start = time.time() + 5  # after every interpreter has imported psc_nas.search.storage (torch too)
    openers = [
        subprocess.Popen([sys.executable, "-c", _OPEN_AT, url, str(start)], stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    errors = [opener.communicate(timeout=120)[1] for opener in openers]
    assert [opener.returncode for opener in openers] == [0] * processes, "\n".join(errors)
    optuna.create_study(storage=url, study_name="after")  # the schema is whole


def test_processes_opening_one_empty_sqlite_database_together_all_get_it(tmp_path):
    # Two workers, or a worker and a reader (optuna.load_study), race to create Optuna's tables;
    # SQLite's loser sees "table ... already exists" and must find the tables, not fail.
    open_together(f"sqlite:///{tmp_path / 'study.db'}")


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_without_losing_or_repeating(tmp_path):
    log = tmp_path / "trained.log"
    settings = {
        "task": "ibsr",
        "budget": {"params": 5_000_000},
        "trials": 9,
        "out": str(tmp_path / "run"),
        "heartbeat_interval": 1,
    }
    env = {"PSC_TRAIN_SECONDS": "0.4", "PSC_TRAIN_LOG": str(log)}
    worker = start_worker(settings, env)
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    deadline = time.monotonic() + 150
    while True:  # kill in the middle: some trials told, others held
        if worker.poll() is not None:
            raise AssertionError(f"the search ended before it could be killed:\n{worker.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline
        try:
            before = evaluated(optuna.load_study(study_name="run", storage=storage))
        except Exception:  # the run folder, the database or the study is still being created
            before = []
        held = (
            [
                r
                for r in read_trials(optuna.load_study(study_name="run", storage=storage))
                if r.state == TrialState.RUNNING and r.evaluations
            ]
            if before
            else []
        )
        if held:
            break
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = evaluated(optuna.load_study(study_name="run", storage=storage))
    held = [
        r for r in read_trials(optuna.load_study(study_name="run", storage=storage)) if r.state == TrialState.RUNNING
    ]
    assert held, "kill -9 should leave trials running"

    finish(start_worker(settings, env))

    records = read_trials(optuna.load_study(study_name="run", storage=storage))
    after = [r for r in records if r.state == TrialState.COMPLETE]
    assert len(after) == 9
    assert not [r for r in records if r.state in (TrialState.RUNNING, TrialState.WAITING)]
    survivors = {r.number: (r.values, r.arch_hash) for r in after}
    assert all(survivors[r.number] == (r.values, r.arch_hash) for r in before)  # none lost or redone
    # held trials came back as retries with their parameters and what they had evaluated
    retries = {r.retry_of: r for r in records if r.retry_of is not None}
    assert {r.number for r in held} <= set(retries)
    # a held trial killed before it sampled has no architecture to keep; one that had sampled keeps its own
    kept = [(r.number, r.arch_hash, retries[r.number].arch_hash) for r in held]
    assert all(retry == hash_ for _, hash_, retry in kept if hash_ is not None), kept
    # results the killed worker had stored were reused; at most the training cut by the kill ran again
    trainings = Counter(" ".join(line.split()[:2]) for line in log.read_text().splitlines())
    repeats = [line for line, count in trainings.items() if count > 1]
    assert len(repeats) <= 1


# ---------------------------------------------------------------------- PostgreSQL
def _postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1, run as the postgres user when we are root."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed (pip install psycopg2-binary)")
    binaries = _postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    # Not under pytest's tmp dirs: those are private to us, and the server may run as another user.
    root = Path(tempfile.mkdtemp(prefix="psc-search-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(binaries / "initdb"), "-D", str(data), "-U", "psc", "--auth=trust")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    run(str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        yield f"postgresql+psycopg2://psc@127.0.0.1:{port}/postgres"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_processes_opening_one_empty_postgres_database_together_all_get_it(postgres_url):
    # PostgreSQL's loser of the same race sees a duplicate key in pg_type (IntegrityError) or
    # 'relation "studies"' / 'type "studydirection" already exists' (ProgrammingErrors: DuplicateTable,
    # DuplicateObject); each must be retried.
    open_together(postgres_url, processes=12)


@pytest.mark.slow
def test_four_workers_on_one_postgres_study_finish_exactly_the_queue(tmp_path, postgres_url):
    per_worker, workers = 3, 4
    log = tmp_path / "trained.log"
    settings = {
        "task": "ibsr",
        "budget": {"params": 50_000_000},
        "trials": per_worker * workers,
        "out": str(tmp_path / "run"),
        "storage": postgres_url,
        "study_name": "shared",
        "multi_fidelity": False,
    }
    env = {"PSC_TRAIN_SECONDS": "0.3", "PSC_TRAIN_LOG": str(log)}
    procs = [start_worker(settings, env) for _ in range(workers)]
    for proc in procs:
        finish(proc)
    records = read_trials(optuna.load_study(study_name="shared", storage=postgres_url))
    assert len(records) == per_worker * workers
    assert [(r.state, r.fail_reason) for r in records] == [(TrialState.COMPLETE, None)] * len(records)
    assert len({r.number for r in records}) == per_worker * workers
    lines = log.read_text().splitlines()
    # every trial's architecture was evaluated, and no more evaluations ran than there are queue entries
    # (a trial whose architecture another worker had already evaluated reuses that result)
    assert {line.split()[0] for line in lines} == {r.arch_hash for r in records}
    assert len(lines) <= per_worker * workers
    assert len({line.split()[2] for line in lines}) > 1  # the work was shared

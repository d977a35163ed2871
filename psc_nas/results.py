"""Reading a search run (finished or still running) back from its Optuna study.

``runs/<name>/study.db`` is the source of truth, read through psc_nas.search.record (schema in
``docs/architecture.md``). The dashboard and ``psc-export`` look at a run through :class:`Run`,
which finds the front and its knee with psc-search's own function (psc_nas.search.front), so
"feasible", the knee and the hypervolume mean the same on the page, on the command line and in the
run's pareto.json / best.yaml.

    Run.open("runs/ibsr-5M") ─► .records (TrialRecord) ─► .table() (pandas, one row per trial)
                                                       ├► .front() (members, knee, hypervolume, retrained knee)
                                                       └► .config(number) (ArchConfig)
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import optuna
import pandas as pd
import sqlalchemy.exc
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from psc_nas.arch import ArchConfig
from psc_nas.search.front import Front, find_front
from psc_nas.search.outputs import RETRAINED, trials_table
from psc_nas.search.record import Objective, StudyRecord, TrialRecord, read_trials
from psc_nas.search.storage import JOURNAL_PREFIX, STUDY_FILE, redact


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost cause (sqlite3's "file is not a database", not the wrappers')."""
    while err.__cause__ is not None:
        err = err.__cause__
    err = getattr(err, "orig", None) or err
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_only_sqlite(db: Path) -> str:
    """SQLite's own read-only mode (a URI filename): no schema is created, nothing is written."""
    return f"sqlite:///file:{urllib.parse.quote(str(db.resolve()))}?mode=ro&uri=true"


class Run:
    """One search run folder and the study inside it."""

    def __init__(self, path: Path, study: optuna.Study) -> None:
        self.path = path
        self.study = study
        self.record = StudyRecord.read(study)
        if not self.record.objectives:
            raise ValueError(f"{path}: the study records no objectives (was it written by psc-search?)")
        self.records: list[TrialRecord] = []
        self.refresh()

    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        *,
        writable: bool = False,
        storage: str | None = None,
        study_name: str | None = None,
    ) -> Run:
        """Open ``run_dir/study.db``, read-only unless ``writable``: a reader never changes a study (an
        empty or damaged file is reported, not given Optuna's tables). A folder without a study, a file
        that is no Optuna study or cannot be read raise ``ValueError`` with one line saying so.

        ``storage`` reads the study from where psc-search's ``--storage`` put it instead (a database URL
        or ``journal:PATH``); ``study_name`` defaults, as psc-search's does, to the run folder's name.
        """
        path = Path(run_dir)
        if storage is not None:
            return cls._open_storage(path, storage, study_name, writable=writable)
        db = path / STUDY_FILE
        if not db.is_file():
            raise ValueError(f"{path} is not a search run: no {STUDY_FILE} in it")
        if not writable and db.stat().st_size == 0:
            raise ValueError(f"{db} is empty (0 bytes): no study was written to it")
        # SQLite's own read-only mode (a URI filename): no schema is created, nothing is written.
        url = f"sqlite:///{db.resolve()}" if writable else _read_only_sqlite(db)
        try:
            storage_ = optuna.storages.RDBStorage(url, skip_table_creation=not writable)
            names = optuna.study.get_all_study_names(storage_)
            if not names:
                raise ValueError(f"{db} holds no study")
            if study_name is not None and study_name not in names:
                raise ValueError(f"{db} holds no study {study_name!r} (it holds {', '.join(map(repr, names))})")
            # psc-search names the study after the folder unless told otherwise (--study-name).
            name = study_name or (path.resolve().name if path.resolve().name in names else names[-1])
            return cls(path, optuna.load_study(study_name=name, storage=storage_))
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.OptunaError, RuntimeError) as err:
            raise ValueError(f"{db} cannot be read as an Optuna study ({_root_cause(err)})") from None

    @classmethod
    def _open_storage(cls, path: Path, url: str, study_name: str | None, *, writable: bool) -> Run:
        """The study ``study_name`` (default: the folder's name) in psc-search's ``--storage`` ``url``."""
        if not url.strip():
            raise ValueError("--storage is empty; leave it out to read RUN_DIR/study.db")
        shown = redact(url, url)
        try:
            if url.startswith(JOURNAL_PREFIX):
                journal = Path(url[len(JOURNAL_PREFIX) :])
                if not journal.is_file():  # Optuna would create an empty journal
                    raise ValueError(f"--storage {shown}: no journal file {journal}")
                storage: optuna.storages.BaseStorage = JournalStorage(JournalFileBackend(str(journal)))
            elif "://" not in url:
                raise ValueError(
                    f"--storage must be a database URL (sqlite:///..., postgresql://...) or journal:PATH, got {shown!r}"
                )
            else:
                if url.startswith("sqlite:///") and not writable:
                    db = Path(url[len("sqlite:///") :])
                    if not db.is_file():  # SQLite would create an empty database
                        raise ValueError(f"--storage {shown}: no database file {db}")
                    url = _read_only_sqlite(db)
                storage = optuna.storages.RDBStorage(url, skip_table_creation=not writable)
            names = optuna.study.get_all_study_names(storage)
        except ValueError:
            raise
        except Exception as err:  # SQLAlchemy and the drivers raise their own types for "cannot connect"
            raise ValueError(redact(f"cannot open storage {shown!r}: {_root_cause(err)}", url)) from None
        name = study_name or path.resolve().name
        if name not in names:
            if study_name is None and len(names) == 1:
                name = names[0]  # the only study there: no name needed
            else:
                held = ", ".join(map(repr, names)) if names else "no study"
                hint = "" if study_name else " (pick one with --study-name)"
                raise ValueError(f"storage {shown} holds no study {name!r}; it holds {held}{hint}")
        return cls(path, optuna.load_study(study_name=name, storage=storage))

    def refresh(self) -> None:
        """Re-read the trials (a running search keeps adding them)."""
        self.records = read_trials(self.study)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def task(self) -> str | None:
        return self.record.task

    @property
    def objectives(self) -> tuple[Objective, ...]:
        return self.record.objectives

    @property
    def quality(self) -> Objective:
        """The accuracy objective (Dice, top-1, ...): psc-search puts the task's metric first."""
        return self.objectives[0]

    def trial(self, number: int) -> TrialRecord:
        for record in self.records:
            if record.number == number:
                return record
        raise ValueError(f"{self.path} has no trial {number} (trials 0..{len(self.records) - 1})")

    def config(self, number: int) -> ArchConfig:
        return self.trial(number).config()

    def completed(self) -> list[TrialRecord]:
        """Trials evaluated to the end within budget, in completion order: the candidates."""
        return sorted((r for r in self.records if r.feasible), key=lambda r: (r.completed_at, r.number))

    def front(self) -> Front:
        return find_front(self.records, self.record)

    def knee(self) -> int | None:
        """Number of the trial best.yaml holds, if any: the knee of the front members retrained after the
        search by their retrained scores, or, before any retraining, the knee by the search's scores."""
        best = self.front().best
        return best.number if best else None

    def search_knee(self) -> int | None:
        """Number of the knee by the search's own scores (over all the study's objectives)."""
        knee = self.front().knee
        return knee.number if knee else None

    def quality_of(self, record: TrialRecord) -> float | None:
        """The measured accuracy; None for a trial that failed or was never evaluated (over budget)."""
        return float(record.values[0]) if record.feasible and record.values else None

    def table(self) -> pd.DataFrame:
        """psc-search's trials.csv table with ``quality`` added: measured accuracy or missing. The dashboard
        page reads two columns under their former names too: ``fidelity_words`` (trials.csv's
        ``search_fidelity``) and ``retrained`` (``retrained_<metric>``)."""
        table = trials_table(self.records, self.objectives)
        if table.empty:  # a search that has not started a trial: the columns, no rows
            return pd.DataFrame(
                columns=["number", "state", "feasible", "over_budget", "quality", "params", "macs", "latency_ms"]
            )
        return table.assign(
            quality=table[self.quality.name].where(table.feasible),
            fidelity_words=table["search_fidelity"],
            retrained=table[RETRAINED + self.quality.name],
        )

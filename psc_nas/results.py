"""Reading a search run (finished or still running) back from its Optuna study.

``runs/<name>/study.db`` is the source of truth (schema in ``docs/architecture.md``). The dashboard
and ``psc-export`` look at a run through :class:`Run`, which judges trials with psc-search's own
rules (``psc_nas.search.outputs``), so "feasible", the knee and the hypervolume mean the same on
the page, on the command line and in the run's pareto.json / best.yaml.

    Run.open("runs/ibsr-5M") ─► .trials (FrozenTrial) ─► .table() (pandas, one row per trial)
                                                      └► .config(number) (ArchConfig)
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from psc_nas.arch import ArchConfig
from psc_nas.nets import validate
from psc_nas.pareto import knee_point, to_minimization
from psc_nas.search.outputs import Objective, feasible, trials_table
from psc_nas.search.storage import STUDY_FILE


class Run:
    """One search run folder and the study inside it."""

    def __init__(self, path: Path, study: optuna.Study) -> None:
        self.path = path
        self.study = study
        attrs = study.user_attrs
        self.task: str | None = attrs.get("task")
        self.space: str | None = attrs.get("space")
        self.budget_params: int | None = attrs.get("budget_params")
        self.budget_macs: int | None = attrs.get("budget_macs")
        self.objectives = [
            Objective(o["name"], o["direction"] == "maximize", tuple(o["range"]) if o.get("range") else None)
            for o in attrs.get("objectives", [])
        ]
        if not self.objectives:
            raise ValueError(f"{path}: the study records no objectives (was it written by psc-search?)")
        self.trials: list[FrozenTrial] = []
        self.refresh()

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        """Open ``run_dir/study.db``; a folder without one raises ``ValueError`` saying so."""
        path = Path(run_dir)
        db = path / STUDY_FILE
        if not db.is_file():
            raise ValueError(f"{path} is not a search run: no {STUDY_FILE} in it")
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        names = optuna.study.get_all_study_names(storage)
        if not names:
            raise ValueError(f"{db} holds no study")
        # psc-search names the study after the folder unless told otherwise (--study-name).
        name = path.resolve().name if path.resolve().name in names else names[-1]
        return cls(path, optuna.load_study(study_name=name, storage=storage))

    def refresh(self) -> None:
        """Re-read the trials (a running search keeps adding them)."""
        self.trials = self.study.get_trials(deepcopy=False)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def quality(self) -> Objective:
        """The accuracy objective (Dice, top-1, ...): psc-search puts the task's metric first."""
        return self.objectives[0]

    def trial(self, number: int) -> FrozenTrial:
        for trial in self.trials:
            if trial.number == number:
                return trial
        raise ValueError(f"{self.path} has no trial {number} (trials 0..{len(self.trials) - 1})")

    def config(self, number: int) -> ArchConfig:
        return validate(ArchConfig.from_dict(self.trial(number).user_attrs["arch"]))

    def completed(self) -> list[FrozenTrial]:
        """Trials trained to the end within budget, in completion order: the candidates."""
        return sorted(filter(feasible, self.trials), key=lambda t: (t.datetime_complete, t.number))

    def knee(self) -> int | None:
        """Number of the knee trial over all the study's objectives (what best.yaml holds), if any."""
        done = self.completed()
        if not done:
            return None
        points = to_minimization([t.values for t in done], [o.maximize for o in self.objectives])
        return done[knee_point(points)].number

    def quality_of(self, trial: FrozenTrial) -> float | None:
        """The measured accuracy; None for a trial that failed or was never trained (over budget)."""
        return float(trial.values[0]) if feasible(trial) else None

    def table(self) -> pd.DataFrame:
        """psc-search's trials.csv table with ``quality`` added: measured accuracy or missing."""
        table = trials_table(self.study, self.objectives)
        if table.empty:  # a search that has not started a trial: the columns, no rows
            return pd.DataFrame(columns=["number", "state", "feasible", "quality", "params", "macs", "latency_ms"])
        return table.assign(quality=table[self.quality.name].where(table.feasible))

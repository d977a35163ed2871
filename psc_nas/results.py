"""Reading a search run (finished or still running) back from its Optuna study.

``runs/<name>/study.db`` is the source of truth (schema in ``docs/architecture.md``); the dashboard
and ``psc-export`` both look at a run through :class:`Run`, so "feasible", "quality" and "front"
mean the same thing on the page and on the command line.

    Run.open("runs/ibsr-5M") ─► .trials (FrozenTrial) ─► .table() (pandas, one row per trial)
                                                      └► .config(number) (ArchConfig)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from psc_nas.arch import ArchConfig
from psc_nas.pareto import knee_point, to_minimization

STUDY_FILE = "study.db"
COST_NAMES = ("params", "macs", "latency_ms")


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" | "minimize"

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


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
        self.objectives = [Objective(o["name"], o["direction"]) for o in attrs.get("objectives", [])]
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
        # A run folder holds one study; if a resume left several, the one named after the folder wins.
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
        """The objective that measures accuracy (the first that is not a cost); Dice, top-1, ..."""
        for objective in self.objectives:
            if objective.name not in COST_NAMES:
                return objective
        raise ValueError(f"{self.path}: the study records no accuracy objective (objectives: {self.objectives})")

    def trial(self, number: int) -> FrozenTrial:
        for trial in self.trials:
            if trial.number == number:
                return trial
        raise ValueError(f"{self.path} has no trial {number} (trials 0..{len(self.trials) - 1})")

    def config(self, number: int) -> ArchConfig:
        return ArchConfig.from_dict(self.trial(number).user_attrs["arch"])

    @staticmethod
    def feasible(trial: FrozenTrial) -> bool:
        """Within the run's budgets: psc-search records each budget's excess as an Optuna constraint."""
        return all(excess <= 0 for excess in trial.constraints.values())

    def completed(self) -> list[FrozenTrial]:
        """Trials that finished training within budget, in completion order: the candidates.

        The same set ``psc-search`` takes its front and knee (best.yaml) from."""
        done = [t for t in self.trials if t.state == TrialState.COMPLETE and self.feasible(t)]
        return sorted(done, key=lambda t: (t.datetime_complete, t.number))

    def minimization_points(self, trials: list[FrozenTrial]) -> list[tuple[float, ...]]:
        """The trials' objective values with maximized objectives negated, as psc_nas.pareto wants."""
        return to_minimization([t.values for t in trials], [o.maximize for o in self.objectives])

    def knee(self) -> int | None:
        """Number of the knee trial of the front over all the study's objectives, if any finished."""
        done = self.completed()
        return done[knee_point(self.minimization_points(done))].number if done else None

    def quality_of(self, trial: FrozenTrial) -> float | None:
        """The measured accuracy; None for a trial never trained (over budget) or that failed first."""
        if trial.state == TrialState.COMPLETE and self.feasible(trial):
            return float(trial.values[self.objectives.index(self.quality)])
        value = (trial.user_attrs.get("metrics") or {}).get(self.quality.name)
        return None if value is None else float(value)

    def table(self) -> pd.DataFrame:
        """One row per trial: what the trial table, the plots and the picks are made from."""
        rows = [self._row(trial) for trial in self.trials]
        columns = ["number", "state", "feasible", "quality", "params", "macs", "latency_ms", "fidelity", "preset",
                   "arch_hash", "summary", "fail_reason", "start", "complete", "duration_s"]
        return pd.DataFrame(rows, columns=columns)

    def _row(self, trial: FrozenTrial) -> dict[str, Any]:
        attrs = trial.user_attrs
        arch = attrs.get("arch")
        return {
            "number": trial.number,
            "state": trial.state.name,
            "feasible": self.feasible(trial),
            "quality": self.quality_of(trial),
            "params": attrs.get("params"),
            "macs": attrs.get("macs"),
            "latency_ms": attrs.get("latency_ms"),
            "fidelity": attrs.get("fidelity"),
            "preset": attrs.get("preset"),
            "arch_hash": attrs.get("arch_hash"),
            "summary": ArchConfig.from_dict(arch, validate=False).summary() if arch else None,
            "fail_reason": attrs.get("fail_reason"),
            "start": trial.datetime_start,
            "complete": trial.datetime_complete,
            "duration_s": trial.duration.total_seconds() if trial.duration else None,
        }

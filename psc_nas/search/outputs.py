"""What a search leaves in runs/<name>/ besides the study: a table, the front, the knee config.

    trials.csv       one row per trial (pandas), every state
    pareto.json      the feasible front: objectives, normalized hypervolume, knee, one entry per point
    front/<n>.yaml   the config of every front trial n (ArchConfig.save)
    best.yaml        the knee of the front (see psc_nas.pareto.knee_point)

Rewritten after every bracket, each file atomically, so a killed search leaves readable files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from psc_nas.arch import ArchConfig
from psc_nas.files import write_text_atomic
from psc_nas.ops import summary as arch_summary
from psc_nas.pareto import hypervolume, knee_point, normalize, pareto_front, to_minimization


@dataclass(frozen=True)
class Objective:
    name: str
    maximize: bool
    range: tuple[float, float] | None = None  # (low, high) for scaling: the task's metric range, [0, budget]

    @property
    def direction(self) -> str:
        return "maximize" if self.maximize else "minimize"

    def to_attr(self) -> dict[str, object]:
        """The study attribute entry: ``{"name", "direction", "range"}`` (range a list or None)."""
        return {"name": self.name, "direction": self.direction, "range": list(self.range) if self.range else None}


@dataclass(frozen=True)
class Front:
    trials: list[FrozenTrial]  # the feasible non-dominated trials, by trial number
    knee: FrozenTrial | None
    hypervolume: float  # of (metric, params) in the unit box, see ``quality_hypervolume``


def feasible(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and all(v <= 0 for v in trial.constraints.values())


def find_front(study: optuna.Study, objectives: Sequence[Objective], params_budget: int | None) -> Front:
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    if not trials:
        return Front([], None, 0.0)
    points = to_minimization([t.values for t in trials], [o.maximize for o in objectives])
    members = [trials[i] for i in pareto_front(points)]
    knee = trials[knee_point(points)]
    return Front(members, knee, quality_hypervolume(trials, objectives, params_budget))


def quality_hypervolume(trials: Sequence[FrozenTrial], objectives: Sequence[Objective], params_budget: int | None) -> float:
    """Hypervolume of (metric, params), both scaled to [0, 1]: the metric over its task's range
    (default [0, 1]: Dice and accuracy are fractions), params over [0, budget] (or the largest seen).
    Fixed bounds make runs of the same task and budget comparable; 1.0 would be a perfect score at
    zero parameters."""
    metric, params = objectives[0], _index(objectives, "params")
    if params is None or not trials:
        return 0.0
    points = [(t.values[0], t.values[params]) for t in trials]
    upper_params = params_budget or max(p for _, p in points)
    low, high = metric.range or (0.0, 1.0)
    best, worst = (-high, -low) if metric.maximize else (low, high)  # the metric's bounds once minimized
    scaled = normalize(to_minimization(points, [metric.maximize, False]), (best, 0.0), (worst, upper_params))
    return hypervolume(scaled, (1.0, 1.0))


def _index(objectives: Sequence[Objective], name: str) -> int | None:
    return next((i for i, o in enumerate(objectives) if o.name == name), None)


def trials_table(study: optuna.Study, objectives: Sequence[Objective]) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        rungs = attrs.get("rungs", [])
        own = [r for r in rungs if r.get("trained_by") == trial.number]  # reused results cost this trial nothing
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "feasible": feasible(trial),
            "preset": attrs.get("preset"),
            "arch_hash": attrs.get("arch_hash"),
            "fidelity": attrs.get("fidelity"),
        }
        for index, objective in enumerate(objectives):
            row[objective.name] = trial.values[index] if trial.values else None
        row.update({
            "params": attrs.get("params"),
            "macs": attrs.get("macs"),
            "latency_ms": attrs.get("latency_ms"),
            "train_s": sum(r["wall_s"] for r in own),
            "fwd_bwd_s": sum(r["fwd_bwd_s"] for r in own),
            "val_forward_s": sum(r.get("val_forward_s", 0.0) for r in own),
            "duration_s": trial.duration.total_seconds() if trial.duration else None,
            "fail_reason": attrs.get("fail_reason"),
            "summary": arch_summary(ArchConfig.from_dict(attrs["arch"])) if "arch" in attrs else None,
        })
        rows.append(row)
    return pd.DataFrame(rows)


def write_outputs(out_dir: Path, study: optuna.Study, objectives: Sequence[Objective], params_budget: int | None) -> Front:
    front = find_front(study, objectives, params_budget)
    write_text_atomic(out_dir / "trials.csv", trials_table(study, objectives).to_csv(index=False))
    front_dir = out_dir / "front"
    front_dir.mkdir(exist_ok=True)
    entries, keep = [], set()
    for trial in front.trials:
        path = ArchConfig.from_dict(trial.user_attrs["arch"]).save(front_dir / f"{trial.number}.yaml")
        keep.add(path.name)
        entries.append({
            "number": trial.number,
            "arch_hash": trial.user_attrs["arch_hash"],
            "preset": trial.user_attrs.get("preset"),
            "fidelity": trial.user_attrs.get("fidelity"),
            "values": {o.name: _json_number(v) for o, v in zip(objectives, trial.values)},
            "config": f"front/{path.name}",
        })
    for stale in front_dir.glob("*.yaml"):  # trials that left the front since the last write
        if stale.name not in keep:
            stale.unlink()
    if front.knee is not None:
        ArchConfig.from_dict(front.knee.user_attrs["arch"]).save(out_dir / "best.yaml")
    summary = {
        "objectives": [{"name": o.name, "direction": o.direction} for o in objectives],
        "hypervolume": front.hypervolume,
        "knee": front.knee.number if front.knee else None,
        "front": entries,
    }
    write_text_atomic(out_dir / "pareto.json", json.dumps(summary, indent=2) + "\n")
    return front


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None



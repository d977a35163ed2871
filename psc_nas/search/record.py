"""The study record: the one reader and writer of what a search stores in its Optuna study.

Every field is its own Optuna user attribute, so ``study.trials_dataframe()`` and optuna-dashboard
show them as they are; this module alone names them (schema: docs/architecture.md, "What a study
stores"). Code elsewhere reads a trial as a :class:`TrialRecord` and a study as a
:class:`StudyRecord`, and writes through them.

Outcomes, as Optuna's own tools read them:

    evaluated     COMPLETE, values = the objectives of the highest fidelity reached
    over budget   PRUNED (never evaluated), no values; the budget constraints > 0 say by how much
    failed        FAIL, ``fail_reason`` says why; the results of lower fidelities are kept

An over-budget trial is PRUNED rather than COMPLETE with a stand-in score. Optuna's own readers
(``study.best_trials``, ``plot_pareto_front``) honour Optuna 5's ``constraints:<name>`` and read
it as infeasible either way, but optuna-dashboard (0.21) reads feasibility only from the old list-valued
``constraints`` system attribute and puts every COMPLETE trial into its best trials and Pareto
front: it showed a feasible zero. PRUNED without values is "not evaluated" to all of them.
Samplers: NSGA-II breeds from COMPLETE trials only (over-budget samples are rejected, and
replaced in the queue); TPE ranks PRUNED trials with constraints > 0 among its infeasible ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from psc_nas.arch import ArchConfig
from psc_nas.costs import Cost
from psc_nas.evaluators.base import Evaluation, Fidelity
from psc_nas.nets import validate as check_config
from psc_nas.ops import summary as summarize
from psc_nas.search.budget import Budget
from psc_nas.search.optuna_adapter import name_metrics, retry_of

COST_FIELDS = ("params", "macs", "latency_ms")  # objectives read from the trial's own fields


@dataclass(frozen=True)
class Objective:
    name: str
    maximize: bool
    range: tuple[float, float] | None = None  # where its values lie (a metric's), to normalize hypervolumes

    @property
    def direction(self) -> str:
        return "maximize" if self.maximize else "minimize"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "direction": self.direction}
        if self.range is not None:
            data["range"] = list(self.range)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Objective:
        span = data.get("range")
        return cls(data["name"], data["direction"] == "maximize", None if span is None else (span[0], span[1]))


# ---------------------------------------------------------------------------------------- trials
def _evaluation_to_json(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "evaluator": evaluation.evaluator,
        "fidelity": evaluation.fidelity.key,
        "fidelity_words": evaluation.fidelity.words,
        "metrics": evaluation.metrics,
        "curve": evaluation.curve,
        "wall_s": evaluation.wall_s,
        "fwd_bwd_s": evaluation.fwd_bwd_s,
        "val_forward_s": evaluation.val_forward_s,
        "evaluated_by": evaluation.evaluated_by,
    }


def _evaluation_from_json(data: Mapping[str, Any]) -> Evaluation:
    return Evaluation(
        data["evaluator"],
        Fidelity(data["fidelity"], data["fidelity_words"]),
        data["metrics"],
        data["curve"],
        data["wall_s"],
        data["fwd_bwd_s"],
        data["val_forward_s"],
        data["evaluated_by"],
    )


@dataclass(frozen=True)
class TrialRecord:
    """One trial: what Optuna knows of it (number, state, values, constraints) and what the search
    stored (architecture, exact cost, evaluations, latency, failure)."""

    number: int
    state: TrialState = TrialState.RUNNING
    values: tuple[float, ...] | None = None  # in the order of the study's objectives
    violations: Mapping[str, float] = field(default_factory=dict)  # budget -> relative excess; feasible iff <= 0
    retry_of: int | None = None  # the trial a dead worker held, which this one continues
    completed_at: datetime | None = None
    duration_s: float | None = None
    arch: Mapping[str, Any] | None = None  # ArchConfig.to_dict()
    arch_hash: str | None = None
    params: int | None = None
    macs: int | None = None  # at the task's input size
    preset: str | None = None  # a hand-designed network the search seeded
    prescreen: str | None = None  # why a pre-screen queued it: its proxy score and rank (psc_nas.search.prescreen)
    evaluations: tuple[Evaluation, ...] = ()  # every fidelity's result, cheap to expensive
    latency_ms: float | None = None
    fail_reason: str | None = None
    retrained: Retrained | None = None  # its architecture trained again after the search (a study attribute)
    # the space's answers that built it (``b3.op``, ``b3.pmscn.m``): Optuna's trial parameters, or
    # ``built_params`` where the budget projection built other answers than the sampler asked (read only)
    decisions: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, trial: FrozenTrial, retrained: Mapping[str, Retrained] | None = None) -> TrialRecord:
        """``retrained``: the study's retrainings by architecture hash (``read_retrained``)."""
        attrs = trial.user_attrs
        return cls(
            number=trial.number,
            state=trial.state,
            values=tuple(trial.values) if trial.values is not None else None,
            violations=dict(trial.constraints),
            retry_of=retry_of(trial),
            completed_at=trial.datetime_complete,
            duration_s=trial.duration.total_seconds() if trial.duration is not None else None,
            arch=attrs.get("arch"),
            arch_hash=attrs.get("arch_hash"),
            params=attrs.get("params"),
            macs=attrs.get("macs"),
            preset=attrs.get("preset"),
            prescreen=attrs.get("prescreen"),
            evaluations=tuple(_evaluation_from_json(e) for e in attrs.get("evaluations", [])),
            latency_ms=attrs.get("latency_ms"),
            fail_reason=attrs.get("fail_reason"),
            retrained=(retrained or {}).get(attrs.get("arch_hash", "")),
            decisions=dict(attrs.get("built_params") or trial.params),
        )

    def attrs(self) -> dict[str, Any]:
        """The user attributes this record stands for; the highest fidelity's result is repeated
        at the top level (``fidelity``, ``metrics``, ``curve``) for tools that show attributes as columns."""
        result = self.result
        found = {
            "arch": self.arch,
            "arch_hash": self.arch_hash,
            "params": self.params,
            "macs": self.macs,
            "preset": self.preset,
            "prescreen": self.prescreen,
            "evaluator": result and result.evaluator,
            "fidelity": result and result.fidelity.key,
            "fidelity_words": result and result.fidelity.words,
            "metrics": result and result.metrics,
            "curve": result and result.curve,
            "evaluations": [_evaluation_to_json(e) for e in self.evaluations] or None,
            "latency_ms": self.latency_ms,
            "fail_reason": self.fail_reason,
        }
        return {key: value for key, value in found.items() if value is not None}

    def save(self, trial: optuna.Trial) -> None:
        """Write the attributes that differ from what the trial holds (each write is a storage round trip)."""
        stored = trial.user_attrs
        for key, value in self.attrs().items():
            if key not in stored or not _same(stored[key], value):
                trial.set_user_attr(key, value)

    # ------------------------------------------------------------------ updates
    def priced(self, config: ArchConfig, price: Cost) -> TrialRecord:
        return replace(self, arch=config.to_dict(), arch_hash=config.hash, params=price.params, macs=price.macs)

    def with_evaluation(self, evaluation: Evaluation) -> TrialRecord:
        kept = [e for e in self.evaluations if e.fidelity.key != evaluation.fidelity.key]
        return replace(self, evaluations=tuple(sorted([*kept, evaluation], key=lambda e: e.fidelity.key)))

    # ------------------------------------------------------------------ reading
    @property
    def result(self) -> Evaluation | None:
        """The highest fidelity's result: the one the trial's values come from."""
        return self.evaluations[-1] if self.evaluations else None

    @property
    def fidelity(self) -> Fidelity | None:
        return self.result.fidelity if self.result else None

    @property
    def metrics(self) -> dict[str, float]:
        return self.result.metrics if self.result else {}

    @property
    def curve(self) -> list[dict[str, float]]:
        return self.result.curve if self.result else []

    def evaluation_at(self, fidelity_key: int) -> Evaluation | None:
        return next((e for e in self.evaluations if e.fidelity.key == fidelity_key), None)

    def own_evaluations(self) -> list[Evaluation]:
        """The evaluations this trial computed itself (reused ones cost it nothing)."""
        return [e for e in self.evaluations if e.evaluated_by == self.number]

    def measure(self, objective: str) -> float | None:
        """An objective's value: a cost field (``COST_FIELDS``) or a metric of the highest fidelity."""
        if objective in COST_FIELDS:
            return getattr(self, objective)
        return self.metrics.get(objective)

    @property
    def over_budget(self) -> bool:
        return any(v > 0 for v in self.violations.values())

    @property
    def feasible(self) -> bool:
        """Evaluated to the end within budget: a candidate for the front."""
        return self.state == TrialState.COMPLETE and not self.over_budget

    @property
    def cost(self) -> Cost | None:
        return None if self.params is None or self.macs is None else Cost(self.params, self.macs)

    def config(self, *, validate: bool = True) -> ArchConfig:
        if self.arch is None:
            raise ValueError(f"trial {self.number} recorded no architecture")
        config = ArchConfig.from_dict(self.arch)
        return check_config(config) if validate else config

    def summary(self) -> str | None:
        return summarize(self.config(validate=False)) if self.arch is not None else None


def _same(stored: Any, value: Any) -> bool:
    """Equal as stored: NaN in a diverged run's metrics equals itself, tuples equal lists (JSON)."""
    if isinstance(stored, float) and isinstance(value, float):
        return stored == value or (math.isnan(stored) and math.isnan(value))
    if isinstance(stored, dict) and isinstance(value, dict):
        return stored.keys() == value.keys() and all(_same(stored[k], value[k]) for k in stored)
    if isinstance(stored, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(stored) == len(value) and all(_same(a, b) for a, b in zip(stored, value))
    return stored == value


def read_trials(study: optuna.Study, states: Sequence[TrialState] | None = None) -> list[TrialRecord]:
    """Every trial of the study (or those in ``states``) as records, by trial number, each with the
    retraining of its architecture if there was one."""
    retrained = read_retrained(study)
    return [TrialRecord.read(t, retrained) for t in study.get_trials(deepcopy=False, states=states)]


# ---------------------------------------------------------------------------------------- retrained
RETRAINED_PREFIX = "retrained:"


@dataclass(frozen=True)
class Retrained:
    """A front member's architecture trained again from scratch after the search, at a longer schedule
    than the search scored it: the score a user of that network can expect, beside the search's.

    Stored once per architecture as the study attribute ``retrained:<arch_hash>`` (a finished trial's
    own attributes cannot change), so a resumed or finished search, psc-export and the dashboard
    read it back and a resume never retrains an architecture twice.
    """

    arch_hash: str
    evaluation: Evaluation  # evaluator "retrain"; fidelity key = epochs, words e.g. "retrained: 12 epochs × 32 samples"
    seed: int
    trial: int  # the trial whose architecture was retrained (every trial of that architecture shares it)
    weights: str | None = None  # its trained state dict, relative to the run folder (front/<trial>.weights.pt)

    @property
    def metrics(self) -> dict[str, float]:
        return self.evaluation.metrics

    @property
    def fidelity(self) -> Fidelity:
        return self.evaluation.fidelity

    @property
    def epochs(self) -> int:
        return len(self.evaluation.curve) or self.evaluation.fidelity.key

    def to_json(self) -> dict[str, Any]:
        data = {**_evaluation_to_json(self.evaluation), "seed": self.seed, "trial": self.trial, "epochs": self.epochs}
        return {**data, "weights": self.weights} if self.weights else data

    @classmethod
    def from_json(cls, arch_hash: str, data: Mapping[str, Any]) -> Retrained:
        return cls(arch_hash, _evaluation_from_json(data), data["seed"], data["trial"], data.get("weights"))


def save_retrained(study: optuna.Study, retrained: Retrained) -> None:
    study.set_user_attr(RETRAINED_PREFIX + retrained.arch_hash, retrained.to_json())


def read_retrained(study: optuna.Study) -> dict[str, Retrained]:
    """The study's retrainings by architecture hash."""
    return {
        key[len(RETRAINED_PREFIX) :]: Retrained.from_json(key[len(RETRAINED_PREFIX) :], value)
        for key, value in study.user_attrs.items()
        if key.startswith(RETRAINED_PREFIX)
    }


def enqueue(
    study: optuna.Study, answers: Mapping[str, Any], *, preset: str | None = None, why: str | None = None
) -> None:
    """Queue one architecture to evaluate: fixed trial parameters (a preset's, or one a pre-screen chose: ``why``
    says how it ranked), or none (the sampler's)."""
    attrs = {**({"preset": preset} if preset else {}), **({"prescreen": why} if why else {})}
    study.enqueue_trial(dict(answers), user_attrs=attrs or None)


def set_violations(trial: optuna.Trial, violations: Mapping[str, float]) -> None:
    """Record the budget constraints (feasible iff all <= 0); a retry keeps its original's."""
    for name, excess in violations.items():
        if name not in trial.constraints:
            trial.set_constraint(name, excess)


def tell_evaluated(study: optuna.Study, trial: optuna.Trial, values: Sequence[float]) -> None:
    study.tell(trial, list(values))


def tell_over_budget(study: optuna.Study, trial: optuna.Trial) -> None:
    study.tell(trial, state=TrialState.PRUNED)


def tell_failed(study: optuna.Study, trial: optuna.Trial) -> None:
    study.tell(trial, state=TrialState.FAIL)


def failure_attrs(reason: str) -> dict[str, str]:
    """The user attributes that say why a trial failed, for writers that fail it without a record
    (a worker that went silent, a crashing worker: ``optuna_adapter.fail_and_retry``)."""
    return {"fail_reason": reason}


# ---------------------------------------------------------------------------------------- study
@dataclass(frozen=True)
class StudyRecord:
    """What a study searches; a resume must search the same (``identity``)."""

    task: str | None
    space: str | None
    budget: Budget
    objectives: tuple[Objective, ...]
    evaluator: str | None = None
    input_shape: tuple[int, ...] | None = None  # the task's (C, D, H, W), at which params/MACs were priced
    planned_trials: int | None = None  # architectures the study is to evaluate, over all workers
    data_source: str | None = None  # the --data-dir searched (resolved); None: the task's own data
    data_fingerprint: str | None = None  # files.folder_fingerprint of it; a resume on other data is refused

    def identity(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "space": self.space,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "budget_params": self.budget.params,
            "budget_macs": self.budget.macs,
            "objectives": [o.to_dict() for o in self.objectives],
            "evaluator": self.evaluator,
        }

    @classmethod
    def read(cls, study: optuna.Study) -> StudyRecord:
        attrs = study.user_attrs
        return cls(
            task=attrs.get("task"),
            space=attrs.get("space"),
            budget=Budget(attrs.get("budget_params"), attrs.get("budget_macs")),
            objectives=tuple(Objective.from_dict(o) for o in attrs.get("objectives", [])),
            evaluator=attrs.get("evaluator"),
            input_shape=tuple(attrs["input_shape"]) if attrs.get("input_shape") else None,
            planned_trials=attrs.get("planned_trials"),
            data_source=attrs.get("data_source"),
            data_fingerprint=attrs.get("data_fingerprint"),
        )

    def write(self, study: optuna.Study) -> None:
        """Describe a new study; the objectives also name Optuna's values (``study.metric_names``)."""
        for key, value in self.identity().items():
            study.set_user_attr(key, value)
        study.set_user_attr("data_source", self.data_source)
        study.set_user_attr("data_fingerprint", self.data_fingerprint)
        name_metrics(study, [o.name for o in self.objectives])

    def describe_data(self) -> str:
        if self.data_fingerprint is None:
            return "the task's own data" if self.data_source is None else f"data {self.data_source}"
        return f"data {self.data_source} (content {self.data_fingerprint[:12]})"

    def other_data(self, wanted: StudyRecord) -> bool:
        """True when ``wanted`` searches other data than this study did: another folder content, or a
        folder where the study used the task's own data (a moved folder with the same files is the same)."""
        return (self.data_fingerprint, self.data_source is None) != (
            wanted.data_fingerprint,
            wanted.data_source is None,
        )

    def changes(self, wanted: StudyRecord) -> dict[str, tuple[Any, Any]]:
        """Identity fields that differ: name -> (recorded here, wanted)."""
        mine, theirs = self.identity(), wanted.identity()
        return {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}


PRESCREEN = "prescreen"  # the study attribute holding a pre-screen (psc_nas.search.prescreen.record writes it)


def read_prescreen(study: optuna.Study) -> dict[str, Any] | None:
    """The study's pre-screen (every architecture scored, ``psc_nas.search.prescreen``), or None when it had none."""
    value = study.user_attrs.get(PRESCREEN)
    return value if isinstance(value, dict) else None


SETUP_PROGRESS = "setup_progress"  # a study attribute its creator advances while it sets up (a pre-screen)


def set_planned_trials(study: optuna.Study, count: int) -> None:
    study.set_user_attr("planned_trials", count)


def wait_until_set_up(study: optuna.Study, *, timeout: float = 120.0) -> None:
    """Wait until the worker that created the study has queued its trials (it sets ``planned_trials`` last)."""
    deadline, progress = time.monotonic() + timeout, None
    while StudyRecord.read(study).planned_trials is None:
        now = study.user_attrs.get(SETUP_PROGRESS)  # a creator that screens architectures first advances it
        if now != progress:
            deadline, progress = time.monotonic() + timeout, now
        if time.monotonic() > deadline:
            raise ValueError(f"study {study.study_name!r} exists but was never set up; use another --study-name")
        time.sleep(0.5)

"""The search loop: claim queued trials, price, train in rungs, tell, write outputs.

    claim WAITING trial ─► sample ArchConfig ─► price ─┬─ over budget: tell at once (constraints > 0),
                                                       │  queue a replacement, never train
                                                       └─ feasible: train rungs[0]
    bracket full ─► promote within epsilon of the front, train next rung ... ─► tell: values of the
    highest rung reached ─► trials.csv, pareto.json, front/, best.yaml

A study holds a *queue*: ``trials`` slots are enqueued once (the papers' presets that fit the
budget first, marked with user attribute ``preset``; they climb the rungs by the same rule as
every candidate), and every worker only takes trials from it. That makes ``--trials`` the study's total, exact with any number of workers, and a re-run
of the same command a resume: it finds the remaining slots, plus retries of trials a dead worker
held. Over-budget candidates get a replacement slot, so ``--trials`` counts trained architectures.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from psc_nas.arch import ArchConfig
from psc_nas.costs import Cost
from psc_nas.nets import cost
from psc_nas.ops import summary
from psc_nas.search.budget import Budget
from psc_nas.search.catalog import Catalog
from psc_nas.search.evaluate import RungResult, Trainer, failure_reason, forward_latency_ms
from psc_nas.search.fidelity import Schedule, Scored
from psc_nas.search.outputs import Front, Objective, write_outputs
from psc_nas.search.profiles import Profile
from psc_nas.search.storage import Heartbeat, claim_waiting, fail_stale, heartbeat_interval, release

log = logging.getLogger("psc_nas.search")

MAX_REPLACEMENTS_PER_SLOT = 20  # over-budget samples replaced before the sampler is deemed lost


@dataclass
class Candidate:
    trial: optuna.Trial
    config: ArchConfig
    cost: Cost
    preset: str | None
    rungs: dict[int, RungResult] = field(default_factory=dict)
    latency_ms: float | None = None
    fail_reason: str | None = None

    @property
    def best(self) -> RungResult | None:
        return self.rungs[max(self.rungs)] if self.rungs else None


@dataclass(frozen=True)
class Plan:
    """Everything the loop needs, resolved and checked before any work."""

    task: Any
    space: Any
    catalog: Catalog
    budget: Budget
    objectives: tuple[Objective, ...]
    profile: Profile
    schedule: Schedule
    trainer: Trainer
    out_dir: Path
    trials: int
    timeout: float | None
    seed_presets: bool


class Engine:
    def __init__(self, plan: Plan, study: optuna.Study,
                 on_progress: Callable[[int, Front], None] = lambda done, front: None) -> None:
        self.plan = plan
        self.study = study
        # The study's own (cached) view of the storage: claiming a trial behind its back would
        # leave the study's cache unaware of the trial, as ``Study.ask`` itself claims through it.
        self.storage = study._storage
        self.study_id = self.storage.get_study_id_from_name(study.study_name)
        self.spatial = tuple(plan.task.input_shape[1:])
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.front = Front([], None, 0.0)

    # ------------------------------------------------------------------ queue
    def fill_queue(self, created: bool) -> None:
        """Enqueue the study's slots: presets first on creation, then blank ones up to ``trials``."""
        slots = self.study.user_attrs.get("slots", 0)
        if created and self.plan.seed_presets:
            for name, config in self.plan.space.presets().items():
                answers = self.plan.catalog.answers_for(config)
                if answers is None:
                    log.info("preset %s is not in space %s; not seeded", name, self.plan.space.name)
                elif not self.plan.budget.fits(cost(config, self.spatial)):
                    log.info("preset %s is over budget; not seeded", name)
                elif slots < self.plan.trials:
                    self.study.enqueue_trial(answers, user_attrs={"preset": name})
                    slots += 1
        for _ in range(self.plan.trials - slots):
            self.study.enqueue_trial({})
        self.study.set_user_attr("slots", max(slots, self.plan.trials))

    # ------------------------------------------------------------------ loop
    def time_left(self) -> bool:
        return self.plan.timeout is None or time.monotonic() - self.started < self.plan.timeout

    def seconds_left(self) -> float | None:
        return None if self.plan.timeout is None else max(1.0, self.plan.timeout - (time.monotonic() - self.started))

    def run(self) -> Front:
        with Heartbeat(self.storage) as heartbeat:
            try:
                while self.time_left():
                    fail_stale(self.study)
                    if self._bracket(heartbeat):
                        self._publish()
                    elif not self._wait_for_others():
                        break
            except BaseException:
                release(self.study, self.storage, heartbeat.held)  # Ctrl-C: queue retries right now
                raise
        self._publish()
        return self.front

    def _publish(self) -> None:
        params_budget = self.plan.budget.params
        self.front = write_outputs(self.plan.out_dir, self.study, self.plan.objectives, params_budget)
        self._report()

    def _report(self) -> None:
        """Architectures evaluated so far: slots neither waiting nor claimed-but-untrained."""
        pending = sum(1 for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
                      if not t.user_attrs.get("rungs"))
        self.on_progress(self.study.user_attrs["slots"] - pending, self.front)

    def _wait_for_others(self) -> bool:
        """True while other workers hold trials that may yet come back to the queue as retries."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        interval = heartbeat_interval(self.storage)
        if not running or not interval:
            return False
        time.sleep(interval)
        return True

    # ------------------------------------------------------------------ one bracket
    def _bracket(self, heartbeat: Heartbeat) -> bool:
        """Run one bracket; False when the queue was empty."""
        members: list[Candidate] = []
        claimed = False
        rungs = self.plan.schedule.rungs
        while len(members) < self.plan.profile.bracket and self.time_left():
            trial = claim_waiting(self.study, self.storage, self.study_id)
            if trial is None:
                break
            claimed = True
            heartbeat.hold(trial._trial_id)
            candidate = self._prepare(trial)
            if candidate is None:
                heartbeat.drop(trial._trial_id)
                continue
            self._train(candidate, rungs[0])
            members.append(candidate)
        for low, high in zip(rungs, rungs[1:]):
            contenders = [c for c in members if c.best is not None and c.best.fidelity == low]
            if not contenders:
                continue
            for index in self.plan.schedule.promote([self._scored(c, i) for i, c in enumerate(contenders)],
                                                     self._pool(low)):
                if not self.time_left():
                    break
                self._train(contenders[index], high)
        for candidate in members:
            self._finish(candidate)
            heartbeat.drop(candidate.trial._trial_id)
        return claimed

    def _prepare(self, trial: optuna.Trial) -> Candidate | None:
        """Sample and price; over-budget candidates are told here and replaced in the queue."""
        try:
            config = self.plan.space.sample(trial)
        except Exception as error:  # a space/sampler bug must not end the search
            self._fail(trial, f"sampling failed: {failure_reason(error)}")
            return None
        priced = cost(config, self.spatial)
        preset = trial.user_attrs.get("preset")
        for key, value in {"arch": config.to_dict(), "arch_hash": config.hash, "params": priced.params,
                           "macs": priced.macs, "preset": preset}.items():
            trial.set_user_attr(key, value)
        for name, excess in self.plan.budget.violations(priced).items():
            if name not in trial.constraints:  # a retry inherits its original's constraints
                trial.set_constraint(name, excess)
        if not self.plan.budget.fits(priced):
            trial.set_user_attr("fidelity", 0)
            self.study.tell(trial, self._unmeasured_values(priced))
            self._replace_slot()
            log.info("trial %d over budget (%s): %s", trial.number, self.plan.budget.describe(), summary(config))
            return None
        candidate = Candidate(trial, config, priced, preset)
        for data in trial.user_attrs.get("rungs", []):  # a retry inherits what its dead worker stored
            candidate.rungs[data["fidelity"]] = RungResult.from_dict(data)
        if any(o.name == "latency_ms" for o in self.plan.objectives):
            candidate.latency_ms = self._latency(candidate)
        return candidate

    def _replace_slot(self) -> None:
        infeasible = sum(1 for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                         if t.user_attrs.get("fidelity") == 0)
        if infeasible <= MAX_REPLACEMENTS_PER_SLOT * self.plan.trials:
            self.study.enqueue_trial({})
        else:
            log.warning("%d over-budget samples so far; not replacing more (is the budget near the space's minimum?)",
                        infeasible)

    def _train(self, candidate: Candidate, epochs: int) -> None:
        if epochs in candidate.rungs:
            return
        result = self._cached(candidate.config.hash, epochs)
        if result is None:
            try:
                result = self.plan.trainer(candidate.config, epochs, self.seconds_left())
                result = replace(result, trained_by=candidate.trial.number)
            except Exception as error:  # one candidate's NaN, OOM or bug is its own failure only
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                candidate.fail_reason = f"at {epochs} epochs: {failure_reason(error)}"
                log.warning("trial %d failed %s", candidate.trial.number, candidate.fail_reason)
                return
            if result.fidelity in candidate.rungs:  # --timeout cut a promotion back to a rung it had
                log.info("trial %d: promotion to %d epochs cut by --timeout", candidate.trial.number, epochs)
                return
            log.info("trial %d trained %d epochs in %.1fs: %s = %.4f (%s)", candidate.trial.number, result.fidelity,
                     result.wall_s, self.plan.task.metric, result.metrics.get(self.plan.task.metric, math.nan),
                     summary(candidate.config))
        candidate.rungs[result.fidelity] = result  # fewer epochs than asked when --timeout cut it
        trial = candidate.trial
        trial.set_user_attr("rungs", [candidate.rungs[f].to_dict() for f in sorted(candidate.rungs)])
        trial.set_user_attr("fidelity", result.fidelity)
        trial.set_user_attr("metrics", result.metrics)
        trial.set_user_attr("curve", result.curve)
        self._report()

    def _cached(self, arch_hash: str, epochs: int) -> RungResult | None:
        """A result for this architecture at this fidelity from any trial of the study, any worker."""
        for trial in self._study_trials_with(arch_hash):
            for data in trial.user_attrs.get("rungs", []):
                if data["fidelity"] == epochs:
                    return RungResult.from_dict(data)
        return None

    def _latency(self, candidate: Candidate) -> float:
        for trial in self._study_trials_with(candidate.config.hash):
            if trial.user_attrs.get("latency_ms") is not None:
                latency = trial.user_attrs["latency_ms"]
                break
        else:
            latency = forward_latency_ms(candidate.config, self.plan.task.input_shape,
                                         repeats=self.plan.profile.latency_repeats)
        candidate.trial.set_user_attr("latency_ms", latency)
        return latency

    def _study_trials_with(self, arch_hash: str) -> list[FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("arch_hash") == arch_hash]

    def _pool(self, epochs: int) -> list[Scored]:
        """Every result of the study at ``epochs``, one per architecture, for the promotion rule."""
        pool: dict[str, Scored] = {}
        for trial in self.study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            for data in attrs.get("rungs", []):
                if data["fidelity"] == epochs and attrs["arch_hash"] not in pool:
                    metric = data["metrics"].get(self.plan.task.metric, math.nan)
                    if not math.isnan(metric):
                        pool[attrs["arch_hash"]] = Scored(attrs["arch_hash"], self._score(metric), self._costs(attrs))
        return list(pool.values())

    def _costs(self, attrs: dict[str, Any]) -> tuple[float, ...]:
        return tuple(float(attrs.get(o.name, math.inf)) for o in self.plan.objectives[1:])

    def _scored(self, candidate: Candidate, key: int) -> Scored:
        metric = candidate.best.metrics.get(self.plan.task.metric, math.nan)  # type: ignore[union-attr]
        score = -math.inf if math.isnan(metric) else self._score(metric)
        return Scored(key, score, self._costs(candidate.trial.user_attrs))

    def _score(self, metric: float) -> float:
        """The metric as the promotion rule takes it, higher is better, whatever the task's direction."""
        return metric if self.plan.objectives[0].maximize else -metric

    # ------------------------------------------------------------------ telling
    def _finish(self, candidate: Candidate) -> None:
        trial = candidate.trial
        if candidate.fail_reason:
            trial.set_user_attr("fail_reason", candidate.fail_reason)
        best = candidate.best
        metric = None if best is None else best.metrics.get(self.plan.task.metric)
        if metric is None or math.isnan(metric):
            self.study.tell(trial, state=TrialState.FAIL)
            return
        values = []
        for objective in self.plan.objectives:
            if objective.name == "latency_ms":
                values.append(float(candidate.latency_ms))  # type: ignore[arg-type]
            elif objective is self.plan.objectives[0]:
                values.append(float(metric))
            else:
                values.append(float(getattr(candidate.cost, objective.name)))
        self.study.tell(trial, values)

    def _unmeasured_values(self, priced: Cost) -> list[float]:
        """Values of a never-trained (over-budget) trial: its exact cost, the worst for the rest.

        Samplers rank infeasible trials by constraint violation, not by these; they exist because
        Optuna needs values on a COMPLETE trial. Never on a front: fronts hold feasible trials only.
        """
        values = [0.0 if self.plan.objectives[0].maximize else math.inf]
        for objective in self.plan.objectives[1:]:
            values.append(float(getattr(priced, objective.name)) if objective.name in ("params", "macs") else math.inf)
        return values

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason)
        self.study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d %s", trial.number, reason)

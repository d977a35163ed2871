"""The search loop: claim queued trials, price, evaluate as the promotion policy says, tell.

    claim a queued trial ─► sample an ArchConfig ─► price ─┬─ over budget: PRUNED at once, replaced
                                                           │  in the queue, never evaluated
                                                           └─ evaluate at the cheapest fidelity
    bracket full ─► the policy promotes, evaluate at the next fidelity ... ─► tell the values of the
    highest fidelity reached ─► the run folder (trials.csv, pareto.json, front/, best.yaml)
    loop over (queue empty or --timeout) ─► retrain the front's knee and neighbours (``retrain``)
    ─► the run folder again, best.yaml = the retrained knee

The parts live apart: the queue (``queue``), pricing (``pricing``), the study-wide result cache
(``cache``), latency (``latency``), the promotion rule (``promotion``), the evaluator
(``psc_nas.evaluators``) and progress (``events``). Everything stored goes through
``record``, everything Optuna keeps private through ``optuna_adapter``, and the run folder is
written from the study alone (``outputs``), so another engine that fills a study through the record
gets the same folder.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from psc_nas.arch import ArchConfig
from psc_nas.evaluators.base import Evaluator, Fidelity, failure_reason
from psc_nas.ops import summary
from psc_nas.search import prescreen as prescreening
from psc_nas.search import retrain as retraining
from psc_nas.search.cache import StudyView, costs, merit
from psc_nas.search.events import (
    Evaluated,
    Evaluating,
    Event,
    Failed,
    FrontChanged,
    Listener,
    OverBudget,
    Preparing,
    Promoting,
    Retraining,
    RetrainPlanned,
    Started,
)
from psc_nas.search.events import Retrained as RetrainedEvent
from psc_nas.search.front import Front, find_front
from psc_nas.search.interrupt import INTERRUPTS
from psc_nas.search.latency import forward_latency_ms
from psc_nas.search.optuna_adapter import Heartbeat, fail_stale, heartbeat_interval, release, requeue, snapshot
from psc_nas.search.outputs import write_outputs
from psc_nas.search.prescreen import Prescreen
from psc_nas.search.pricing import Pricing
from psc_nas.search.profiles import Profile
from psc_nas.search.promotion import Scored
from psc_nas.search.queue import StudyQueue
from psc_nas.search.record import (
    SETUP_PROGRESS,
    Retrained,
    StudyRecord,
    TrialRecord,
    failure_attrs,
    read_prescreen,
    save_retrained,
    set_violations,
    tell_evaluated,
    tell_failed,
    tell_over_budget,
)
from psc_nas.search.retrain import Plan, RetrainJob, retrain_front, retrained_hashes

log = logging.getLogger("psc_nas.search")


class EvaluatorUnavailable(ValueError):
    """The evaluator's one-time preparation (training a super-network) failed: nothing can be scored."""


@dataclass(frozen=True)
class SearchPlan:
    """Everything a search needs, resolved and checked before any work."""

    task: Any
    space: Any
    pricing: Pricing
    record: StudyRecord  # what the study searches: task, space, budget, objectives, evaluator
    profile: Profile
    evaluator: Evaluator
    fidelities: tuple[Fidelity, ...]  # the evaluator's, climbed by the policy; only the top one without multi-fidelity
    out_dir: Path
    trials: int
    timeout: float | None  # seconds after which the search loop starts no evaluation
    seed_presets: bool
    retrain: RetrainJob | None = None  # retrain the front after the loop (None: don't)
    retrain_timeout: float | None = None  # seconds after the start by which retraining ends (None: no limit)
    prescreen: Prescreen | None = None  # rank many architectures by a zero-cost proxy before the queue fills


@dataclass
class Candidate:
    trial: optuna.Trial
    config: ArchConfig
    record: TrialRecord


class Engine:
    def __init__(self, plan: SearchPlan, study: optuna.Study, on_event: Listener = lambda event: None) -> None:
        self.plan = plan
        self.study = study
        self.on_event = on_event
        self.objectives = plan.record.objectives
        self.queue = StudyQueue(study, plan.trials)
        self.view = StudyView(study)
        self.heartbeat_interval = heartbeat_interval(study)
        self.started = time.monotonic()
        self.front = Front((), None, 0.0)
        self.shown = _summary(self.front)  # the front last sent as FrontChanged
        self.members: dict[int, Candidate] = {}  # this worker's bracket, not told yet
        self.requeued: list[int] = []  # trials an interrupt put back in the queue
        self.created = True  # a new study (``fill_queue`` says)
        self.screen: dict[str, Any] | None = None  # pareto.json's account of the study's pre-screen, if any

    def fill_queue(self, created: bool) -> None:
        self.created = created
        presets = self.plan.pricing.presets() if created and self.plan.seed_presets else {}
        screened = []
        ask = self.plan.prescreen
        tell = log.warning if ask is not None and ask.asked else log.info  # the profile's screen is no news
        if created and ask is not None:
            if self.plan.trials > len(presets):
                screened = self._prescreen(presets)
            else:
                tell("--prescreen skipped: the %d presets fill all %d trials", len(presets), self.plan.trials)
        if not created and ask is not None and read_prescreen(self.study) is None:
            tell(
                "--prescreen ignored: study %r exists; a pre-screen runs only when a study is created",
                self.study.study_name,
            )
        self.queue.fill(presets, screened)
        self.screen = prescreening.summary(read_prescreen(self.study))  # fixed once the queue is filled

    def _prescreen(self, presets: dict[str, Any]) -> list[tuple[Any, str]]:
        """Rank ``plan.prescreen.size`` architectures by its proxy; the best go to the queue's free entries."""
        ask = self.plan.prescreen
        assert ask is not None
        pricing = self.plan.pricing
        avoid = {config.hash for name, config in pricing.catalog.space.presets().items() if name in presets}
        self.on_event(Preparing(f"pre-screen: scoring {ask.size} architectures by {ask.proxy} at initialisation"))

        def progress(done: int, total: int) -> None:
            self.study.set_user_attr(SETUP_PROGRESS, done)  # workers that join wait while it moves
            if done % 10 == 0 or done == total:
                self.on_event(Preparing(f"pre-screen: {done}/{total} architectures scored by {ask.proxy}"))

        costs = [o.name for o in self.objectives[1:] if o.name in prescreening.SCREEN_COSTS] or ["params"]
        rows, seconds, batch = prescreening.screen(
            ask,
            pricing,
            self.plan.task,
            keep=self.plan.trials - len(presets),
            avoid=avoid,
            costs=costs,
            progress=progress,
        )
        data = prescreening.record(self.study, ask, rows, seconds, batch)
        prescreening.write_csv(self.plan.out_dir, data)
        self.on_event(Preparing(prescreening.describe(data)))
        ranked = sorted((r for r in rows if r.queued), key=lambda r: -r.score)
        return [
            (r.answers, f"{ask.proxy} {r.score:.6g}, {i + 1} of the {len(ranked)} queued, {len(rows)} scored")
            for i, r in enumerate(ranked)
        ]

    # ------------------------------------------------------------------ loop
    def time_left(self) -> bool:
        return self.plan.timeout is None or time.monotonic() - self.started < self.plan.timeout

    def seconds_left(self) -> float | None:
        return None if self.plan.timeout is None else max(1.0, self.plan.timeout - (time.monotonic() - self.started))

    def run(self) -> Front:
        evaluator = self.plan.evaluator
        if type(evaluator).prepare is not Evaluator.prepare:
            self.on_event(Preparing(f"evaluator {evaluator.name}: preparing"))
        try:
            evaluator.prepare(self.plan.out_dir, seconds_left=self.seconds_left())
        except INTERRUPTS:
            raise
        except Exception as error:  # e.g. a super-network that cannot train: no trial can be scored
            raise EvaluatorUnavailable(
                f"evaluator {self.plan.evaluator.name} could not prepare: {failure_reason(error)}"
            ) from error
        self.view.refresh()
        self._emit(
            Started,
            created=self.created,
            loop_s=None if self.plan.timeout is None else max(0.0, self.plan.timeout - self._elapsed()),
            end_s=None if self.plan.retrain_timeout is None else max(0.0, self.plan.retrain_timeout - self._elapsed()),
            retrain=self.plan.retrain.policy.count if self.plan.retrain is not None else 0,
        )
        self._live_front()  # a resumed study already has one
        with Heartbeat(self.study) as heartbeat:
            try:
                self._loop(heartbeat)
            except INTERRUPTS:
                self.requeued = requeue(self.study, heartbeat.held)  # Ctrl-C: back in the queue, no retry used
                heartbeat.drop_all()
                raise
            except BaseException as error:
                release(self.study, heartbeat.held, failure_attrs(f"the worker crashed: {failure_reason(error)}"))
                heartbeat.drop_all()
                raise
        self._publish()
        if self.plan.retrain is not None:  # not after Ctrl-C: that ends the run above
            self._retrain(self.plan.retrain)
        return self.front

    def _loop(self, heartbeat: Heartbeat) -> None:
        """Brackets until the queue is empty or --timeout; another engine (``nni_engine``) replaces this."""
        while self.time_left():
            self._fail_stale()
            if self._bracket(heartbeat):
                self._publish()
            elif not self._wait_for_others():
                break

    def _fail_stale(self) -> None:
        fail_stale(
            self.study,
            failure_attrs(
                f"its worker stopped sending heartbeats for {3 * (self.heartbeat_interval or 0)} s "
                "(killed, crashed or cut off); queued again as a retry"
            ),
        )

    def _emit(self, make: Any, **fields: Any) -> None:
        """Send an event, with the run's progress: entries neither waiting nor claimed-but-unevaluated."""
        event: Event = make(**fields, done=self.queue.planned - self.view.pending(), planned=self.queue.planned)
        self.on_event(event)

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _publish(self) -> None:
        self.view.refresh()
        self.front = write_outputs(
            self.plan.out_dir,
            self.plan.record,
            self.view.records,
            self.screen,
        )
        self._show_front(self.front)

    def _show_front(self, front: Front) -> None:
        if _summary(front) != self.shown:
            self.shown = _summary(front)
            self._emit(FrontChanged, front=front)

    def _live_front(self) -> None:
        """The front as the study will have it once this bracket is told: each member of it counted at the
        highest fidelity it has reached so far; sent when it moved, so the front's size is live."""
        records = []
        for record in self.view.records:
            candidate = self.members.get(record.number)
            if candidate is not None and record.state == TrialState.RUNNING:
                values = self._values(candidate.record)
                if values is None:
                    continue
                record = replace(candidate.record, state=TrialState.COMPLETE, values=values)
            records.append(record)
        self._show_front(find_front(records, self.plan.record))

    def _wait_for_others(self) -> bool:
        """True while other workers hold trials that may yet come back to the queue as retries."""
        self.view.refresh()
        if not self.view.running() or not self.heartbeat_interval:
            return False
        time.sleep(self.heartbeat_interval)
        return True

    # ------------------------------------------------------------------ retraining
    def _retrain(self, job: RetrainJob) -> None:
        def done() -> set[str]:
            self.view.refresh()
            return retrained_hashes(self.view.records)

        def seconds_left() -> float | None:
            limit = self.plan.retrain_timeout
            return None if limit is None else max(0.0, limit - (time.monotonic() - self.started))

        def planned(plan: Plan) -> None:
            self._emit(
                RetrainPlanned, numbers=tuple(m.number for m in plan.members), epochs=plan.epochs, epoch_s=plan.probe_s
            )

        def save(result: Retrained) -> None:
            save_retrained(self.study, result)
            searched = next((r for r in self.front.members if r.number == result.trial), None)
            metric = self.objectives[0].name
            self._emit(
                RetrainedEvent,
                number=result.trial,
                metric=metric,
                score=result.metrics.get(metric, math.nan),
                fidelity=result.fidelity.words,
                search_score=searched.measure(metric) if searched else None,
                search_fidelity=searched.fidelity.words if searched and searched.fidelity else None,
                seconds=result.evaluation.wall_s,
                summary=searched.summary() or "" if searched else "",
            )
            self._publish()

        def train(job: RetrainJob, member: TrialRecord, epochs: int, *, seconds_left: float | None) -> Retrained:
            self._emit(Retraining, number=member.number, epochs=epochs, summary=member.summary() or "")
            return retraining.train_member(job, member, epochs, seconds_left=seconds_left)  # looked up now

        retrain_front(self.front, job, done=done, seconds_left=seconds_left, save=save, on_plan=planned, train=train)

    # ------------------------------------------------------------------ one bracket
    def _bracket(self, heartbeat: Heartbeat) -> bool:
        """Run one bracket; False when the queue was empty."""
        policy, fidelities = self.plan.profile.policy, self.plan.fidelities
        members: list[Candidate] = []
        self.members = {}
        claimed = False
        while len(members) < policy.bracket and self.time_left():
            trial = self.queue.claim()
            if trial is None:
                break
            claimed = True
            heartbeat.hold(trial)
            candidate = self._admit(trial)
            if candidate is None:
                heartbeat.drop(trial)
                continue
            members.append(candidate)
            self.members[trial.number] = candidate
            self._evaluate(candidate, fidelities[0])
        for low, high in zip(fidelities, fidelities[1:]):
            contenders = [c for c in members if c.record.fidelity is not None and c.record.fidelity.key == low.key]
            if not contenders:
                continue
            self.view.refresh()
            pool = self.view.pool(low.key, self.objectives)
            chosen = policy.promote([self._scored(c, i) for i, c in enumerate(contenders)], pool)
            if chosen and self.time_left():  # past --timeout none of them starts
                self._emit(Promoting, numbers=tuple(contenders[i].trial.number for i in chosen), fidelity=high)
            for index in chosen:
                if not self.time_left():
                    break
                self._evaluate(contenders[index], high)
        for candidate in members:
            self._finish(candidate)
            heartbeat.drop(candidate.trial)
        self.members = {}
        return claimed

    def _admit(self, trial: optuna.Trial) -> Candidate | None:
        """Sample and price; an over-budget candidate is told here and replaced in the queue."""
        record = TrialRecord.read(snapshot(self.study, trial))  # a retry inherits what its dead worker stored
        try:
            seen = {r.arch_hash for r in self.view.records if r.arch_hash and not r.over_budget}
            config = self.plan.pricing.sample(trial, avoid=seen)  # within the budget unless sampling is reject
        except Exception as error:  # a space/sampler bug must not end the search
            self._fail(trial, record, f"sampling failed: {failure_reason(error)}")
            return None
        price = self.plan.pricing.price(config)
        record = record.priced(config, price)
        record.save(trial)
        budget = self.plan.pricing.budget
        violations = budget.violations(price)
        set_violations(trial, violations)
        if not budget.fits(price):
            tell_over_budget(self.study, trial)
            self.view.update(replace(record, state=TrialState.PRUNED, violations={**violations, **record.violations}))
            self.queue.replace(self.view.over_budget())
            self._emit(OverBudget, number=trial.number, cost=price, budget=budget.describe(), summary=summary(config))
            return None
        candidate = Candidate(trial, config, record)
        if any(o.name == "latency_ms" for o in self.objectives):
            self._measure_latency(candidate)
        return candidate

    def _measure_latency(self, candidate: Candidate) -> None:
        latency = self.view.latency_ms(candidate.config.hash)
        if latency is None:
            latency = forward_latency_ms(
                candidate.config, self.plan.task.input_shape, repeats=self.plan.profile.latency_repeats
            )
        self._record(candidate, replace(candidate.record, latency_ms=latency))

    def _record(self, candidate: Candidate, record: TrialRecord) -> None:
        candidate.record = record
        record.save(candidate.trial)
        self.view.update(record)

    def _evaluate(self, candidate: Candidate, fidelity: Fidelity) -> None:
        if candidate.record.evaluation_at(fidelity.key) is not None:
            return
        number, metric = candidate.trial.number, self.objectives[0].name
        self.view.refresh()
        result = self.view.result(candidate.config.hash, fidelity.key)
        reused = result is not None
        if result is None:
            self._emit(
                Evaluating,
                number=number,
                fidelity=fidelity,
                promoted=fidelity.key != self.plan.fidelities[0].key,
                summary=summary(candidate.config),
            )
            try:
                result = self.plan.evaluator.evaluate(candidate.config, fidelity, seconds_left=self.seconds_left())
            except Exception as error:  # one candidate's NaN, OOM or bug is its own failure only
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                reason = f"at {fidelity.words}: {failure_reason(error)}"
                self._record(candidate, replace(candidate.record, fail_reason=reason))
                self._emit(Failed, number=number, reason=reason, summary=summary(candidate.config))
                return
            result = replace(result, evaluated_by=number)
            if candidate.record.evaluation_at(result.fidelity.key) is not None:  # --timeout cut it back
                log.info("trial %d: evaluation at %s cut by --timeout", number, fidelity.words)
                return
        self._record(candidate, candidate.record.with_evaluation(result))  # lower than asked when --timeout cut it
        self._emit(
            Evaluated,
            number=number,
            fidelity=result.fidelity,
            metric=metric,
            score=result.metrics.get(metric, math.nan),
            seconds=result.wall_s,
            summary=summary(candidate.config),
            reused=reused,
            cost=candidate.record.cost,
            arch_hash=candidate.config.hash,
        )
        self._live_front()

    def _scored(self, candidate: Candidate, key: int) -> Scored:
        metric, record = self.objectives[0], candidate.record
        return Scored(key, merit(record.measure(metric.name), metric), costs(record, self.objectives))

    # ------------------------------------------------------------------ telling
    def _values(self, record: TrialRecord) -> tuple[float, ...] | None:
        """The objective values the study is told; None when the metric is missing or NaN (a failure)."""
        metric = record.measure(self.objectives[0].name)
        if metric is None or math.isnan(metric):
            return None
        return tuple(float(record.measure(o.name)) for o in self.objectives)  # type: ignore[arg-type]

    def _finish(self, candidate: Candidate) -> None:
        record = candidate.record
        values = self._values(record)
        if values is None:
            tell_failed(self.study, candidate.trial)
            self.view.update(replace(record, state=TrialState.FAIL))
            return
        tell_evaluated(self.study, candidate.trial, values)
        self.view.update(replace(record, state=TrialState.COMPLETE, values=values))

    def _fail(self, trial: optuna.Trial, record: TrialRecord, reason: str) -> None:
        record = replace(record, fail_reason=reason)
        record.save(trial)
        tell_failed(self.study, trial)
        self.view.update(replace(record, state=TrialState.FAIL))
        self._emit(Failed, number=trial.number, reason=reason)


def _summary(front: Front) -> tuple:
    return (
        [m.number for m in front.members],
        front.knee.number if front.knee else None,
        front.hypervolume,
        front.retrained_knee.number if front.retrained_knee else None,
    )

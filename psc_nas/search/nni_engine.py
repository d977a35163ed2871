"""``psc-search --engine nni``: NNI's multi-trial strategies propose, this package evaluates and stores.

NNI's own experiment machinery (``nni.nas.experiment``, ``nnictl``) is not used: it starts a Node.js
manager and a web server that binds every network interface with no host option, and large
evaluator payloads hang after the first trial there (NNI issue 5684). NNI's strategy objects are
driven in this process instead, the way NNI's ``SequentialExecutionEngine`` drives them, against an
NNI model space made from the YAML space (``SearchSpace.to_nni()``: one ``Categorical`` per decision,
frozen by the space's own ``decide``). No server is started and no port is opened.

    the presets that fit (queued first) ─► evaluated as the optuna engine does ─► evolution's first population
    NNI strategy (RegularizedEvolution | Random | TPE) ─► submit_models(model)   (StudyExecution)
        ─► a bracket of proposals ─► the optuna engine's bracket (``Engine._bracket``): claim a queue
           entry, the entry takes the proposal's answers (``ProposalSampler``), price ─┬─ over budget:
           PRUNED, never trained, NNI hears "failed"                                  │
           evaluate at the fidelities the promotion policy climbs, tell the study ◄────┘
        ─► NNI hears the metric (higher is better) of the highest fidelity reached
    strategy done, queue empty or --timeout ─► the optuna engine's retraining of the front

So budgets, evaluators, fidelities, the study record, the run folder and retraining are the optuna
engine's own; only the choice of the next architecture is NNI's. NNI's strategies optimise one
number: the task's metric (the budget is a hard limit); the front is drawn from every result.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from numpy.random import RandomState
from optuna.trial import TrialState

with warnings.catch_warnings():  # NNI's PyTorch layer scan warns about torch classes it does not know
    warnings.simplefilter("ignore", RuntimeWarning)
    from nni.mutable import LabeledMutable, Mutable, Sample, SampleValidationError
    from nni.nas.execution import ExecutionEngine
    from nni.nas.execution.event import FinalMetricEvent, TrainingEndEvent
    from nni.nas.space import ExecutableModelSpace, ModelStatus
    from nni.nas.strategy import TPE, Random, RegularizedEvolution, Strategy
    from nni.nas.strategy.evolution import Individual

from psc_nas.arch import ArchConfig
from psc_nas.search.cache import merit
from psc_nas.search.engine import Candidate, Engine, SearchPlan
from psc_nas.search.events import Listener
from psc_nas.search.optuna_adapter import Heartbeat, claim_waiting, fixed_params, snapshot
from psc_nas.search.queue import StudyQueue
from psc_nas.search.record import read_trials
from psc_nas.space import SearchSpace
from psc_nas.space_nni import NniArchSpace

log = logging.getLogger("psc_nas.search")
# Importing NNI imports pytorch_lightning, which points Lightning's rank-zero messages ("GPU available: False",
# a tip per trainer) at its own logger; train.fit quiets lightning.pytorch's during training, this one stays quiet.
for _name in ("pytorch_lightning", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)

STRATEGIES = ("evolution", "random", "tpe")
NNI_LOG = "nni.log"  # NNI's own log lines, in the run folder
DUPLICATES_PER_TRIAL = 50  # proposals of already-known architectures before a strategy is deemed stuck


@contextmanager
def nni_logging_to(path: Path) -> Iterator[None]:
    """NNI's log lines (a line per proposal, with its 40-odd answers) into ``path``, off the console."""
    logger = logging.getLogger("nni")
    saved, propagate = list(logger.handlers), logger.propagate
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for old in saved:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        for old in saved:
            logger.addHandler(old)
        logger.propagate = propagate


def make_strategy(name: str, *, seed: int, population: int) -> Strategy:
    """An NNI multi-trial strategy. Evolution: Real et al.'s aging evolution with the profile's
    population, tournaments of half of it; TPE: NNI's TPE tuner, maximising."""
    if name == "evolution":
        return RegularizedEvolution(
            population_size=population, sample_size=max(1, population // 2), mutation_prob=0.1, seed=seed
        )
    if name == "random":
        return Random(seed=seed)
    if name == "tpe":
        return TPE(optimize_mode="maximize", seed=seed)
    raise ValueError(f"unknown NNI strategy {name!r}; choose from {', '.join(STRATEGIES)}")


class ArchModelSpace(ExecutableModelSpace):
    """The YAML space as an NNI model space: its decisions are ``SearchSpace.to_nni()``'s mutables; a
    frozen model is one sample and the ArchConfig it gives (``executable_model``). Evaluation is not
    NNI's: ``StudyExecution`` does it."""

    def __init__(self, mutables: NniArchSpace, sample: Sample | None = None) -> None:
        super().__init__(ModelStatus.Initialized if sample is None else ModelStatus.Frozen)
        self.mutables = mutables
        self.sample = sample
        self.evaluator = None
        self.config: ArchConfig | None = None if sample is None else mutables.freeze(sample)

    @classmethod
    def from_space(cls, space: SearchSpace) -> ArchModelSpace:
        return cls(space.to_nni())

    def freeze(self, sample: Sample) -> ArchModelSpace:
        if self.status != ModelStatus.Initialized:
            raise RuntimeError("only the model space itself can be frozen, not one of its models")
        self.validate(sample)
        return ArchModelSpace(self.mutables, {label: sample[label] for label in self.mutables})

    def check_contains(self, sample: Sample) -> SampleValidationError | None:
        return self.mutables.check_contains(sample)

    def leaf_mutables(self, is_leaf: Callable[[Mutable], bool]) -> Iterable[LabeledMutable]:
        yield from self.mutables.leaf_mutables(is_leaf)

    def executable_model(self) -> ArchConfig:
        if self.config is None:
            raise RuntimeError("the model space has no single architecture; freeze it first")
        return self.config

    def extra_repr(self) -> str:
        return f"sample={self.sample!r}, status={self.status!r}" if self.sample else f"{len(self.mutables)} decisions"


class ProposalSampler(optuna.samplers.BaseSampler):
    """The study's sampler under ``--engine nni``: a queue entry takes the answers of the NNI proposal
    bound to it (``bind``); entries with fixed parameters (presets, retries) keep theirs."""

    def __init__(self) -> None:
        self.answers: dict[int, Sample] = {}

    def bind(self, number: int, sample: Sample) -> None:
        self.answers[number] = sample

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: Any, param_name: str, distribution: Any) -> Any:
        sample = self.answers.get(trial.number)
        if sample is None:
            raise RuntimeError(f"trial {trial.number} has no NNI proposal bound to it")
        return sample[param_name]


class ProposalQueue(StudyQueue):
    """The study's queue, claimed only while NNI has proposals waiting (or, with ``presets_only``, while the
    next entry is a preset's): each claimed entry with no parameters of its own (a preset's, a dead worker's
    retry) takes the oldest proposal."""

    def __init__(self, study: optuna.Study, trials: int, sampler: ProposalSampler, spare: Callable[[], Sample]) -> None:
        super().__init__(study, trials)
        self.sampler = sampler
        self.spare = spare  # answers for an entry claimed with no proposal waiting
        self.proposals: deque[ArchModelSpace] = deque()
        self.bound: dict[int, ArchModelSpace] = {}  # trial number -> the proposal it evaluates
        self.presets_only = False

    def claim(self) -> optuna.Trial | None:
        if self.presets_only:
            waiting = read_trials(self.study, states=(TrialState.WAITING,))
            if not waiting or waiting[0].preset is None:
                return None
        elif not self.proposals:
            return None
        trial = claim_waiting(self.study)
        if trial is None:
            return None
        stored = snapshot(self.study, trial)
        if stored.params or fixed_params(stored) is not None:  # a preset's entry or a retry's
            return trial
        if self.proposals:
            model = self.proposals.popleft()
            self.bound[trial.number] = model
            self.sampler.bind(trial.number, dict(model.sample or {}))
        else:  # another worker took the preset first: this entry gets a random architecture
            self.sampler.bind(trial.number, self.spare())
        return trial


class StudyExecution(ExecutionEngine):
    """NNI's execution engine for this package: proposals gather into brackets of the profile's size;
    a full bracket (or a strategy waiting for its models) runs the optuna engine's bracket in this process,
    then every proposal's outcome goes back to NNI as its events. A proposal of an architecture the study
    already knows is answered from the study, without a trial."""

    def __init__(self, engine: NniEngine, heartbeat: Heartbeat) -> None:
        super().__init__()
        self.engine = engine
        self.heartbeat = heartbeat
        self.history: list[ArchModelSpace] = []
        self.duplicates = 0

    @property
    def queue(self) -> ProposalQueue:
        return self.engine.queue

    def submit_models(self, *models: ExecutableModelSpace) -> None:
        for model in models:
            if not isinstance(model, ArchModelSpace) or model.config is None:
                raise RuntimeError(f"expected a frozen architecture of the search space, got {model}")
            self.history.append(model)
            known = self.engine.known(model.config.hash)
            if known is not None:
                self.duplicates += 1
                self._answer(model, known[0] if known else None)
                continue
            self.queue.proposals.append(model)
            if len(self.queue.proposals) >= self.engine.plan.profile.policy.bracket:
                self.flush()

    def flush(self) -> None:
        """Evaluate every waiting proposal; those left when the queue or the time runs out fail."""
        while self.queue.proposals and self.engine.time_left():
            self.engine._fail_stale()
            if not self.engine._bracket(self.heartbeat):
                break
            self.engine._publish()
            self._answer_bound()
        self._answer_bound()
        while self.queue.proposals:
            self._answer(self.queue.proposals.popleft(), None)

    def _answer_bound(self) -> None:
        for number, model in list(self.queue.bound.items()):
            outcome = self.engine.outcomes.pop(number, ...)
            if outcome is not ...:
                del self.queue.bound[number]
                self._answer(model, outcome)

    def _answer(self, model: ArchModelSpace, metric: float | None) -> None:
        if metric is not None:
            self.dispatch_model_event(FinalMetricEvent(model, metric))
        status = ModelStatus.Trained if metric is not None else ModelStatus.Failed
        self.dispatch_model_event(TrainingEndEvent(model, status))

    def wait_models(self, *models: ExecutableModelSpace) -> None:
        self.flush()

    def list_models(self, status: ModelStatus | None = None) -> Iterable[ExecutableModelSpace]:
        return [m for m in self.history if status is None or m.status == status]

    def idle_worker_available(self) -> bool:
        return True  # a full bracket is evaluated as it fills

    def budget_available(self) -> bool:
        """While the time lasts and the queue has entries the waiting proposals do not take; proposals that
        may take the last entries are evaluated first (an over-budget one gets its entry replaced)."""
        if self.duplicates > DUPLICATES_PER_TRIAL * self.engine.plan.trials:
            log.warning("NNI proposed %d architectures the study already had; stopping it", self.duplicates)
            return False
        if self.queue.proposals and self.engine.waiting() <= len(self.queue.proposals):
            self.flush()
        return self.engine.time_left() and self.engine.waiting() > len(self.queue.proposals)

    def shutdown(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class NniEngine(Engine):
    """The optuna engine with its loop replaced by an NNI strategy; see the module docstring."""

    def __init__(
        self, plan: SearchPlan, study: optuna.Study, *, strategy: str, seed: int, on_event: Listener = lambda e: None
    ) -> None:
        if not isinstance(study.sampler, ProposalSampler):
            raise TypeError("an NNI search's study samples with ProposalSampler")
        # NNI proposes whole architectures: they are priced as proposed, over-budget ones never trained
        super().__init__(replace(plan, pricing=replace(plan.pricing, sampling="reject")), study, on_event)
        self.strategy = make_strategy(strategy, seed=seed, population=plan.profile.population)
        self.space = ArchModelSpace.from_space(plan.space)
        spare = RandomState(seed)
        self.queue = ProposalQueue(
            study, plan.trials, study.sampler, lambda: self.space.random(random_state=spare).sample or {}
        )
        self.outcomes: dict[int, float | None] = {}  # trial number -> NNI's metric (None: failed, over budget)

    def _loop(self, heartbeat: Heartbeat) -> None:
        execution = StudyExecution(self, heartbeat)
        log.info(
            "NNI strategy %r drives the search in this process (no NNI manager or web server); its log: %s",
            self.strategy,
            self.plan.out_dir / NNI_LOG,
        )
        with nni_logging_to(self.plan.out_dir / NNI_LOG):
            self.queue.presets_only = True  # the presets first, as the optuna engine does
            while self.time_left() and self._bracket(heartbeat):
                self._publish()
            self.queue.presets_only = False
            self.strategy.initialize(self.space, execution)
            self._tell_earlier_results()
            self.strategy.run()
            execution.flush()  # random and TPE do not wait for their last proposals

    def _tell_earlier_results(self) -> None:
        """Evolution starts from the study's results so far (the presets, a resumed run's trials) as its
        population, newest last, through NNI's own state_dict/load_state_dict; random and TPE start afresh."""
        if not isinstance(self.strategy, RegularizedEvolution):
            return
        self.view.refresh()
        individuals = []
        for record in self.view.records:
            score = self._merit(record.values) if record.state == TrialState.COMPLETE and record.values else None
            sample = self._sample_of(record.decisions)
            if score is not None and sample is not None and self.space.mutables.freeze(sample).hash == record.arch_hash:
                individuals.append(Individual(sample, score))
        if not individuals:
            return
        state = self.strategy.state_dict()
        state["population"] = individuals[-self.strategy.population_size :]
        state["dedup_history"] = [*state.get("dedup_history", []), *(frozenset(i.x.items()) for i in individuals)]
        self.strategy.load_state_dict(state)
        log.info("NNI evolution starts from %d result(s) the study has", len(state["population"]))

    def _sample_of(self, decisions: Mapping[str, Any]) -> Sample | None:
        """A full NNI sample from a trial's answers (the decisions it did not need: their first choice)."""
        sample = {label: decisions.get(label, mutable.values[0]) for label, mutable in self.space.mutables.items()}
        return sample if self.space.mutables.contains(sample) else None

    def waiting(self) -> int:
        self.view.refresh()
        return sum(1 for r in self.view.records if r.state == TrialState.WAITING)

    def known(self, arch_hash: str) -> tuple[float, ...] | tuple[()] | None:
        """(metric,) of an architecture the study has told, () if it was over budget or failed, None if new."""
        for record in self.view.records:
            if record.arch_hash != arch_hash:
                continue
            if record.over_budget or record.state == TrialState.FAIL:
                return ()
            if record.state == TrialState.COMPLETE and record.values:
                return (self._merit(record.values),)
        return None

    def _merit(self, values: Sequence[float]) -> float | None:
        score = merit(values[0], self.objectives[0])
        return None if math.isinf(score) else score

    def _admit(self, trial: optuna.Trial) -> Candidate | None:
        candidate = super()._admit(trial)
        if candidate is None:
            self.outcomes[trial.number] = None  # over budget or unsampleable
        return candidate

    def _finish(self, candidate: Candidate) -> None:
        super()._finish(candidate)
        values = self._values(candidate.record)
        self.outcomes[candidate.trial.number] = None if values is None else self._merit(values)

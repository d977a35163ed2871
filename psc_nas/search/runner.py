"""``run_search(settings)``: check everything a user can get wrong, then open the study and search.

Every user error (unknown task, a space for another task or with other backbone hparams, bad
objective, a budget no architecture of the space can meet or a MAC budget none comes near at the
task's input shape, an unwritable output folder, an unreachable database, a resume at another input
shape, data the task cannot read from ``--data-dir``, a resume on other data) raises ``ValueError``
*before* anything is written, so the CLI prints one line and leaves no half-made run behind. A search
whose every trial failed raises :class:`SearchFailed` (a ``ValueError``) at the end.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from psc_nas.costs import format_count
from psc_nas.evaluators import Evaluator, EvaluatorSetup, make_evaluator
from psc_nas.files import folder_fingerprint
from psc_nas.search.budget import Budget
from psc_nas.search.catalog import Catalog
from psc_nas.search.display import Display, DisplayHandler, active_display, make_display
from psc_nas.search.engine import Engine, SearchPlan
from psc_nas.search.events import Event, describe
from psc_nas.search.feasible import RestrictedSampler
from psc_nas.search.front import Front
from psc_nas.search.prescreen import DEFAULT_SIZE as DEFAULT_PRESCREEN_SIZE
from psc_nas.search.prescreen import DEFAULT_WIDTH as DEFAULT_PRESCREEN_WIDTH
from psc_nas.search.prescreen import Prescreen
from psc_nas.search.pricing import SAMPLING, Pricing
from psc_nas.search.profiles import Profile, RetrainPolicy, get_profile
from psc_nas.search.record import Objective, StudyRecord, read_trials
from psc_nas.search.retrain import RetrainJob
from psc_nas.search.storage import open_storage, open_study, storage_url
from psc_nas.space import SearchSpace
from psc_nas.tasks import Task, get_task

SAMPLERS = ("nsga2", "tpe", "random")
ENGINES = ("optuna", "nni", "cakes")
COST_OBJECTIVES = {"params": "params", "macs": "macs", "latency": "latency_ms", "latency_ms": "latency_ms"}
LOG_FILE = "search.log"


@dataclass(frozen=True)
class SearchSettings:
    task: str = "ibsr"
    budget: Budget = field(default_factory=Budget)
    objectives: tuple[str, ...] = ("metric", "params")
    trials: int | None = None  # the study's total of evaluated architectures; the profile's by default
    timeout: float | None = None  # seconds after which no new training starts
    sampler: str = "nsga2"
    engine: str = "optuna"  # optuna | nni (psc_nas.search.nni_engine) | cakes (psc_nas.search.cakes_engine)
    strategy: str = "evolution"  # NNI's strategy, for engine nni
    storage: str | None = None
    study_name: str | None = None
    seed: int = 0
    profile: str = "quick"
    data_dir: Path | None = None
    out: Path | None = None
    space: str | None = None
    evaluator: str | None = None  # the profile's by default
    evaluator_options: tuple[tuple[str, Any], ...] = ()  # over the profile's options for that evaluator
    retrain: bool | None = None  # retrain the front after the search; None: as the profile says
    multi_fidelity: bool = True
    seed_presets: bool = True
    budget_sampling: str = "restrict"  # restrict | project | reject, see psc_nas.search.pricing
    heartbeat_interval: int = 10
    engine_options: tuple[tuple[str, Any], ...] = ()  # --engine-option KEY=VALUE, for engines other than optuna
    # a zero-cost proxy ranking prescreen_size architectures first (psc_nas.search.prescreen); None: the profile's
    # (IBSR's quick profile: zico+macs), "none": no pre-screen
    prescreen: str | None = None
    prescreen_size: int | None = None  # None: the profile's, else DEFAULT_PRESCREEN_SIZE
    prescreen_width: float | None = None  # the width each screened network is scored at; None: the profile's, else 1

    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        label = "-".join(format_count(v) for v in (self.budget.params, self.budget.macs) if v is not None)
        return Path("runs") / (f"{self.task}-{label}" if label else self.task)


def parse_duration(text: str) -> float:
    """Seconds from ``900``, ``90s``, ``15m`` or ``1.5h``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a duration such as 900, 90s, 15m or 1.5h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def resolve_objectives(names: tuple[str, ...], task: Task, budget: Budget) -> tuple[Objective, ...]:
    """The task's metric first (in its direction, over its range), then the chosen costs (minimized,
    over [0, budget] where there is one), no repeats."""
    metric = task.metric
    resolved = [Objective(metric, maximize=task.maximize, range=tuple(task.metric_range))]
    bounds = {"params": budget.params, "macs": budget.macs}
    for name in names:
        if name in ("metric", metric):
            continue
        if name not in COST_OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; choose from metric ({metric}), params, macs, latency")
        cost_name = COST_OBJECTIVES[name]
        limit = bounds.get(cost_name)
        objective = Objective(cost_name, maximize=False, range=None if limit is None else (0.0, float(limit)))
        if objective not in resolved:
            resolved.append(objective)
    if len(resolved) < 2:
        raise ValueError(f"a search needs a cost objective besides {metric}: add params, macs or latency")
    return tuple(resolved)


def make_sampler(name: str, *, seed: int, population: int) -> optuna.samplers.BaseSampler:
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    if name == "tpe":
        # group: the space is define-by-run (an op's arguments exist only when it is chosen);
        # constant_liar: parallel workers do not all propose the same promising point.
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=population
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def plan_search(
    settings: SearchSettings, evaluator: Evaluator | None = None, *, stage: Callable[[str], None] = lambda what: None
) -> SearchPlan:
    """Resolve and check the settings; writes nothing. ``evaluator`` replaces ``settings.evaluator``;
    ``stage`` hears what is being done, in words, before each step that can take a while."""
    task = get_task(settings.task)
    profile = get_profile(settings.profile, task)
    if settings.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {settings.sampler!r}; choose from {', '.join(SAMPLERS)}")
    if settings.engine not in ENGINES:
        raise ValueError(f"unknown engine {settings.engine!r}; choose from {', '.join(ENGINES)}")
    if settings.engine == "nni" and settings.strategy not in nni_strategies():
        raise ValueError(f"unknown NNI strategy {settings.strategy!r}; choose from {', '.join(nni_strategies())}")
    if settings.budget_sampling not in SAMPLING:
        raise ValueError(f"unknown budget sampling {settings.budget_sampling!r}; choose from {', '.join(SAMPLING)}")
    trials = _first_given(settings.trials, profile.trials)
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    if settings.timeout is not None and settings.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {settings.timeout}")
    space_name = settings.space or task.default_space
    if space_name is None:
        raise ValueError(f"task {task.name} names no default search space; choose one with --space")
    stage(f"pricing every option of space {space_name} at task {task.name}'s input {task.describe_input()}")
    task.check_space(_space(space_name))
    catalog = _catalog(space_name, tuple(task.input_shape[1:]))
    catalog.check_reachable(settings.budget)
    check_macs_budget(settings.budget, catalog, task)
    pricing = Pricing(settings.budget, catalog, settings.budget_sampling)
    if pricing.sampling != "reject":
        _ = pricing.feasibility  # prices every option of every unit (about a second): before, not during, the search
    if settings.data_dir is not None:
        stage(f"checking the data in {settings.data_dir}")
    data_source, data_fingerprint = check_data(
        task, settings.data_dir, seed=settings.seed, data_options=profile.data_options
    )
    evaluator_name = settings.evaluator or profile.evaluator
    options = {
        **(profile.evaluator_options if evaluator_name == profile.evaluator else {}),
        **dict(settings.evaluator_options),
    }
    evaluator = evaluator or make_evaluator(
        evaluator_name,
        EvaluatorSetup(
            task,
            seed=settings.seed,
            data_dir=settings.data_dir,
            epochs=profile.epochs,
            data_options=profile.data_options,
            space=catalog.space,
            admissible=pricing.fits,
            options=options,
        ),
    )
    fidelities = evaluator.levels()
    timeout = settings.timeout or profile.timeout
    prescreen = plan_prescreen(settings, profile)
    policy = retrain_policy(settings, profile)
    return SearchPlan(
        task=task,
        space=catalog.space,
        pricing=pricing,
        record=StudyRecord(
            task.name,
            catalog.space.name,
            settings.budget,
            resolve_objectives(settings.objectives, task, settings.budget),
            evaluator.name,
            input_shape=tuple(task.input_shape),
            data_source=data_source,
            data_fingerprint=data_fingerprint,
        ),
        profile=profile,
        evaluator=evaluator,
        fidelities=fidelities if settings.multi_fidelity else fidelities[-1:],
        out_dir=settings.out_dir(),
        trials=trials,
        # with retraining, the loop leaves the profile's share of the time budget to it
        timeout=timeout * (1 - profile.retrain_share) if policy is not None and timeout is not None else timeout,
        seed_presets=settings.seed_presets,
        retrain=RetrainJob(policy, task, seed=settings.seed, data_dir=settings.data_dir, out_dir=settings.out_dir())
        if policy
        else None,
        retrain_timeout=timeout if policy is not None else None,
        prescreen=prescreen,
    )


NO_PRESCREEN = "none"


def plan_prescreen(settings: SearchSettings, profile: Profile) -> Prescreen | None:
    """The pre-screen ``--prescreen`` asks for, else the profile's; none for ``--prescreen none``, and the profile's
    is skipped by engines other than Optuna's (they have no queue to fill)."""
    asked = settings.prescreen is not None
    proxy = settings.prescreen if asked else profile.prescreen
    if proxy is None or proxy == NO_PRESCREEN:
        return None
    if settings.engine != "optuna":
        if asked:
            raise ValueError(f"--prescreen fills the queue of --engine optuna; --engine {settings.engine} has none")
        return None
    size = _first_given(settings.prescreen_size, profile.prescreen_size, DEFAULT_PRESCREEN_SIZE)
    width = _first_given(settings.prescreen_width, profile.prescreen_width, DEFAULT_PRESCREEN_WIDTH)
    return Prescreen(proxy, size, seed=settings.seed, data_dir=settings.data_dir, asked=asked, width=width)


def _first_given(*values: Any) -> Any:
    """The first that is not None: the command line's, else the profile's, else the default."""
    return next(v for v in values if v is not None)


def nni_engine() -> Any:
    """``psc_nas.search.nni_engine``; NNI is an optional extra: without it, one line saying how to install it."""
    try:
        from psc_nas.search import nni_engine as module
    except ImportError as error:
        if (error.name or "").partition(".")[0] == "nni":
            raise ValueError("--engine nni needs NNI, an optional extra: pip install 'psc-nas[nni]'") from None
        raise ValueError(
            f"--engine nni: NNI is installed but does not import ({error}); pip install 'psc-nas[nni]'"
        ) from None
    return module


def nni_strategies() -> tuple[str, ...]:
    """NNI's multi-trial strategies (``nni_engine``), then its one-shot ones (``nni_oneshot``)."""
    nni_engine()  # without NNI: the one line saying how to install it
    from psc_nas.search import nni_oneshot

    return (*nni_engine().STRATEGIES, *nni_oneshot.STRATEGIES)


def is_oneshot(settings: SearchSettings) -> bool:
    """An NNI one-shot strategy (``--engine nni --strategy spos|darts|proxyless``)."""
    return settings.engine == "nni" and settings.strategy in ("spos", "darts", "proxyless")


def check_data(
    task: Task, data_dir: Path | None, *, seed: int, data_options: Mapping[str, Any]
) -> tuple[str | None, str | None]:
    """Load the task's data from ``data_dir`` once, reading only, so that a missing folder, a bad file or a
    wrong shape stops the search with the task's one-line ``DataError`` before anything is written
    (in a trial it would only fail that trial). Returns what the study records of it: the resolved
    folder and its content fingerprint; (None, None) for the task's own data, which is not checked."""
    if data_dir is None:
        return None, None
    path = Path(data_dir).expanduser()
    try:
        module = task.datamodule(data_dir=path, seed=seed, **dict(data_options))
        setup = getattr(module, "setup", None)
        if setup is not None:
            setup("fit")
        fingerprint = folder_fingerprint(path) if path.is_dir() else None
    except OSError as err:
        raise ValueError(f"{err.filename or path}: cannot read the data: {err.strerror or err}") from None
    return str(path.resolve()), fingerprint


def retrain_policy(settings: SearchSettings, profile: Profile) -> RetrainPolicy | None:
    """The profile's retraining, unless ``settings.retrain`` is False; True with a profile that has
    none retrains with the default policy."""
    if settings.retrain is False:
        return None
    if settings.retrain and profile.retrain is None:
        return RetrainPolicy()
    return profile.retrain


def check_macs_budget(budget: Budget, catalog: Catalog, task: Task) -> None:
    """Refuse a MAC budget above every architecture of the space: it excludes nothing, which is what a
    budget quoted at a larger input than the task's looks like (MACs grow with the input volume)."""
    if budget.macs is None:
        return
    costliest = catalog.costliest_macs()
    if budget.macs > costliest.macs:
        raise ValueError(
            f"--macs-budget {format_count(budget.macs)} is above the costliest architecture of space "
            f"{catalog.space.name!r} ({format_count(costliest.macs)} MACs), so it excludes nothing; MACs count at "
            f"task {task.name}'s input {task.describe_input()} (psc-space {catalog.space.name} prints presets' MACs)"
        )


@functools.lru_cache(maxsize=4)
def _space(name: str) -> SearchSpace:
    return SearchSpace.load(name)


@functools.lru_cache(maxsize=4)
def _catalog(space: str, spatial: tuple[int, ...]) -> Catalog:
    """Pricing a space takes seconds; workers and tests that search one space twice price it once."""
    return Catalog(_space(space), spatial)


def run_search(
    settings: SearchSettings,
    *,
    evaluator: Evaluator | None = None,
    console: Console | None = None,
    display: Display | None = None,
) -> Front:
    """Search (or resume) and return the feasible Pareto front; outputs land in the run folder. Progress
    goes to ``display``, else to the display the caller entered (psc-search's, on stdout), else to one made
    for ``console`` (default stderr): live in a terminal, plain lines elsewhere. Optuna's own log lines go
    to the run's search.log, never to the console."""
    if settings.engine == "nni" and settings.strategy not in nni_strategies():  # before what depends on it
        raise ValueError(f"unknown NNI strategy {settings.strategy!r}; choose from {', '.join(nni_strategies())}")
    oneshot = is_oneshot(settings)
    if settings.engine != "cakes" and not oneshot and settings.engine_options:
        raise ValueError(
            f"--engine-option is for --engine cakes and NNI's one-shot strategies; the {settings.engine} engine "
            f"{'with --strategy ' + settings.strategy + ' ' if settings.engine == 'nni' else ''}takes none"
        )
    if (settings.engine == "cakes" or oneshot) and (settings.trials is not None or settings.evaluator is not None):
        given = " and ".join(
            o for o, v in (("--trials", settings.trials), ("--evaluator", settings.evaluator)) if v is not None
        )
        if oneshot:
            raise ValueError(
                f"--engine nni --strategy {settings.strategy} trains one super-net and scores what it finds by "
                f"retraining: {given} apply to the multi-trial strategies (evolution, random, tpe) only"
            )
        raise ValueError(
            f"--engine cakes finds its networks with one super-network per priority and scores them by retraining: "
            f"{given} apply to --engine optuna and nni only"
        )
    display = display or active_display() or make_display(console or Console(stderr=True))
    with display, _Logging(display) as logs:
        plan = plan_search(settings, evaluator, stage=display.stage)
        cakes_options = None
        if settings.engine == "cakes":
            from psc_nas.search import cakes_engine

            if settings.retrain is False:
                raise ValueError("--engine cakes scores what it finds by retraining it: drop --no-retrain")
            cakes_options = cakes_engine.parse_options(dict(settings.engine_options))
            display.stage("checking that a CAKES allocation fits the budget")
            cakes_engine.check_budget(plan, cakes_options)
            plan = replace(plan, record=replace(plan.record, evaluator=cakes_engine.ENGINE))
        oneshot_search = None
        if oneshot:
            from psc_nas.search import nni_oneshot

            if settings.retrain is False:
                raise ValueError(
                    f"--strategy {settings.strategy} scores what it finds by retraining it: drop --no-retrain"
                )
            oneshot_options = nni_oneshot.parse_options(settings.strategy, dict(settings.engine_options))
            display.stage(f"building NNI's {settings.strategy} candidates from space {plan.space.name}")
            oneshot_search = nni_oneshot.OneShotSearch(
                plan, settings.strategy, oneshot_options, seed=settings.seed, data_dir=settings.data_dir
            )
            oneshot_search.check_budget()
            plan = replace(plan, record=replace(plan.record, evaluator=f"nni-{settings.strategy}"))
        out_dir = plan.out_dir
        created_dir = _make_out_dir(out_dir)
        display.stage("opening the study" + (f" {out_dir / 'study.db'}" if settings.storage is None else ""))
        try:
            storage = open_storage(
                storage_url(settings.storage, out_dir), heartbeat_interval=settings.heartbeat_interval
            )
            if settings.engine == "nni":
                sampler = nni_engine().ProposalSampler()  # NNI's strategy proposes, the study records
            else:
                sampler = make_sampler(settings.sampler, seed=settings.seed, population=plan.profile.population)
                if plan.pricing.sampling == "restrict":
                    sampler = RestrictedSampler(sampler, seed=settings.seed)
            study, created = open_study(
                storage, settings.study_name or out_dir.resolve().name, record=plan.record, sampler=sampler
            )
        except BaseException:
            if created_dir:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        logs.to_file(out_dir / LOG_FILE)
        log = logging.getLogger("psc_nas.search")

        def show(event: Event) -> None:
            log.info(describe(event), extra={"psc_event": True})  # to search.log; the display gets the event
            display(event)

        if oneshot_search is not None:
            engine: Any = nni_oneshot.NniOneShotEngine(
                plan,
                study,
                search=oneshot_search,
                seed=settings.seed,
                data_dir=settings.data_dir,
                timeout=settings.timeout or plan.profile.timeout,
                on_event=show,
            )
        elif cakes_options is not None:
            engine = cakes_engine.CakesEngine(
                plan,
                study,
                options=cakes_options,
                seed=settings.seed,
                data_dir=settings.data_dir,
                timeout=settings.timeout or plan.profile.timeout,
                on_event=show,
            )
        elif settings.engine == "nni":
            engine = nni_engine().NniEngine(plan, study, strategy=settings.strategy, seed=settings.seed, on_event=show)
        else:
            engine = Engine(plan, study, on_event=show)
        if cakes_options is not None or oneshot_search is not None:
            log.info(
                "%s study %r: engine %s (%s), task %s, space %s, %s, profile %s, seed %d",
                "created" if created else "resumed",
                study.study_name,
                "cakes" if oneshot_search is None else f"nni, one-shot strategy {settings.strategy}",
                ", ".join(f"{k}={v}" for k, v in (cakes_options or oneshot_search.options).items()),
                plan.task.name,
                plan.space.name,
                plan.pricing.budget.describe(),
                plan.profile.name,
                settings.seed,
            )
        else:
            try:
                engine.fill_queue(created)
            except BaseException:  # e.g. Ctrl-C during a pre-screen: no study that was never set up stays behind
                if created:
                    optuna.delete_study(study_name=study.study_name, storage=storage)
                    if created_dir:
                        shutil.rmtree(out_dir, ignore_errors=True)
                raise
            log.info(
                "%s study %r: task %s, space %s, %s, %d trials, profile %s, evaluator %s, %s, seed %d, %s",
                "created" if created else "resumed",
                study.study_name,
                plan.task.name,
                plan.space.name,
                plan.pricing.budget.describe(),
                plan.trials,
                plan.profile.name,
                plan.evaluator.name,
                f"NNI strategy {settings.strategy}" if settings.engine == "nni" else f"sampler {settings.sampler}",
                settings.seed,
                f"then retraining {plan.retrain.policy.count} front trials" if plan.retrain else "no retraining",
            )
        display.note(f"watch it live: psc-dashboard {shlex.quote(str(out_dir))}")
        front = engine.run()
        from psc_nas.dashboard import write_snapshot  # imports plotly; only needed once, at the end

        display.stage(f"writing {out_dir / 'dashboard.html'}")
        write_snapshot(out_dir, study)
        display.finish(
            front, plan.record.objectives, out_dir, "retrained knee" if front.retrained_knee is not None else "knee"
        )
    check_any_evaluated(study, out_dir)
    return front


class SearchFailed(ValueError):
    """Every architecture the search tried to evaluate failed."""


def check_any_evaluated(study: optuna.Study, out_dir: Path) -> None:
    """Raise :class:`SearchFailed` when trials failed and none was evaluated: a search that trained
    nothing is no success, whatever its queue says (e.g. every slot used up by crashes)."""
    records = read_trials(study)
    failed = [r for r in records if r.state == optuna.trial.TrialState.FAIL]
    if not failed or any(r.state == optuna.trial.TrialState.COMPLETE for r in records):
        return
    first = next((r for r in failed if r.fail_reason), failed[0])
    raise SearchFailed(
        f"no architecture was evaluated: {len(failed)} trial(s) failed, e.g. trial {first.number}: "
        f"{first.fail_reason or 'no reason recorded'} (see {out_dir / LOG_FILE})"
    )


def _make_out_dir(out_dir: Path) -> bool:
    """Create the run folder; True if this call created it. Unwritable places raise ValueError."""
    existed = out_dir.is_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output folder {out_dir}: {err.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out_dir} is not writable")
    return not existed


class _Logging:
    """While a search runs: the package's log messages on the display and, once the run folder has its study,
    in search.log with the events; Optuna's log lines off the console (its handler removed), the ones from
    opening the study kept for search.log, its per-trial lines dropped (the events say more)."""

    def __init__(self, display: Display) -> None:
        self.display = DisplayHandler(display)
        self.file: logging.Handler | None = None
        self.held = _Held()
        self.package = logging.getLogger("psc_nas")
        self.optuna = logging.getLogger("optuna")

    def __enter__(self) -> _Logging:
        self.level = self.package.level
        self.package.setLevel(logging.INFO)
        self.package.addHandler(self.display)
        self.verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.INFO)
        self.removed = [h for h in self.optuna.handlers if type(h) is logging.StreamHandler]
        for handler in self.removed:
            self.optuna.removeHandler(handler)
        self.optuna.addHandler(self.held)
        return self

    def to_file(self, path: Path) -> None:
        self.file = logging.FileHandler(path)
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.package.addHandler(self.file)
        self.optuna.removeHandler(self.held)
        for record in self.held.records:
            self.file.handle(record)
        self.optuna.addHandler(self.file)
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        self.package.removeHandler(self.display)
        self.package.setLevel(self.level)
        self.optuna.removeHandler(self.held)
        if self.file is not None:
            self.package.removeHandler(self.file)
            self.optuna.removeHandler(self.file)
            self.file.close()
        for handler in self.removed:
            self.optuna.addHandler(handler)
        optuna.logging.set_verbosity(self.verbosity)


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

"""``psc-search --engine nni --strategy spos|darts|proxyless``: NNI's one-shot strategies on the YAML space.

    the YAML space ─► OneShotSpace, an NNI ``ModelSpace``: the task's backbone (at ``width`` × the space's
        width) built through its slot-fill hook, every slot an NNI ``LayerChoice`` labelled with its unit
        (the space's decision: the slots of a shared unit choose together), over that unit's candidates
    ─► NNI's strategy object (``RandomOneShot`` | ``DARTS`` | ``Proxyless``) mutates it into NNI's own
       super-net (``PathSamplingLayer`` | ``DifferentiableMixedLayer`` | ``ProxylessMixedLayer``) and wraps
       the task's training (its loss, AdamW one-cycle) in NNI's one-shot Lightning module
       (``RandomSamplingLightningModule`` | ``DartsLightningModule``), run by NNI's
       ``SequentialExecutionEngine`` in this process, within ``train_share`` of the run's --timeout
    ─► the chosen architecture: darts/proxyless: NNI's ``export()`` (argmax of the architecture weights);
       spos: NNI's export of random one-shot is an arbitrary sample, so, as the SPOS paper searches its
       trained super-net, ``samples`` in-budget samples drawn by NNI's module are scored with the
       inherited weights (BatchNorm recalibrated, fixed validation patches) and the best is kept
    ─► an ArchConfig at the task's width, priced exactly; over the budget (darts/proxyless), units move to
       cheaper candidates, the move that loses least architecture probability per parameter saved first
    ─► retrained from scratch and told to the study as an ordinary trial by the CAKES engine's ending
       (``cakes_engine.CakesEngine._retrain_and_tell``): the same run folder, dashboard and export

Candidates (the space's own decisions; no second description of the space): per unit, every op the
space allows with its arguments' decisions, at most ``candidates`` per op (default 3): an op with more
decisions (PmSCn: 42, CAKES allocations in quarters: ~200 per DenseNet block) keeps that many, evenly
spaced over its decisions ordered by their parameter count (the cheapest and the costliest kept), since
NNI's one-shot modules hold one module per candidate and DARTS runs them all at every step. Decisions a
slot cannot take at the super-net's reduced width are left out. The restriction is said in one line at
run start. NNI's web server and Experiment are never started, so no port opens (tests/test_nni_oneshot.py).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import optuna
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from nni.nas.evaluator.pytorch import Lightning, LightningModule, Trainer
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.nn.pytorch import LayerChoice, ModelSpace
    from nni.nas.space import RawFormatModelSpace
    from nni.nas.strategy import DARTS, Proxyless, RandomOneShot

from psc_nas.arch import ArchConfig
from psc_nas.costs import Cost, format_count
from psc_nas.device import compute_device, place, to_device
from psc_nas.evaluators.base import failure_reason
from psc_nas.evaluators.supernet import crop_patches, pool_volumes, recalibrate, stack
from psc_nas.nets import cost as price_config
from psc_nas.nets import get_backbone
from psc_nas.nets.budget import with_width
from psc_nas.nets.build import build_with_fill
from psc_nas.ops import realize, rescale
from psc_nas.search.cakes_engine import CakesEngine, Found, SuperTraining
from psc_nas.search.engine_options import check_numbers, check_positive_ints
from psc_nas.search.events import Preparing, Started
from psc_nas.search.front import Front
from psc_nas.search.interrupt import INTERRUPTS
from psc_nas.search.nni_engine import NNI_LOG, nni_logging_to
from psc_nas.search.outputs import write_outputs
from psc_nas.search.record import read_trials, set_planned_trials
from psc_nas.space import SearchSpace, replay_all
from psc_nas.train import TrainingFailed, _quiet, optimizer_and_schedule

log = logging.getLogger("psc_nas.search")

STRATEGIES = ("spos", "darts", "proxyless")
NNI_NAMES = {"spos": "RandomOneShot", "darts": "DARTS", "proxyless": "Proxyless"}

DEFAULTS: dict[str, Any] = {
    "candidates": 3,  # per op and unit: an op with more decisions keeps this many, evenly spaced by params
    "width": 0.25,  # the super-net's channel multiplier (of the space's width)
    "steps": "auto",  # super-net training steps; auto: train_share of the time budget
    "train_share": 0.35,  # of the run's time budget, for training the super-net when steps is auto
    "default_steps": 300,  # steps=auto without a time budget
    "min_steps": 10,
    "max_steps": 3000,
    "batch_size": None,  # default: the profile's data batch_size
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "arc_lr": 3e-3,  # darts/proxyless: the architecture weights' Adam learning rate
    "samples": 16,  # spos: in-budget sub-networks scored with inherited weights after training
    "calib_patches": 4,  # spos: training patches that re-estimate BatchNorm statistics per sample
    "val_patches": 8,  # validation patches: spos scores on them, darts/proxyless take architecture steps on them
    "epochs": None,  # retraining epochs of the found architecture; default: what the time budget allows
}


def parse_options(strategy: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The strategy's options over ``DEFAULTS``, checked; a bad one raises a one-line ``ValueError``."""
    where = f"--engine nni --strategy {strategy}"
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown --engine-option {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    options = {**DEFAULTS, **given}
    check_numbers(options, ("width", "train_share", "lr", "weight_decay", "arc_lr"), where, zero_ok=("weight_decay",))
    if options["train_share"] >= 1:
        raise ValueError(f"{where}: option train_share must be below 1, got {options['train_share']!r}")
    check_positive_ints(
        options,
        ("candidates", "steps", "default_steps", "min_steps", "max_steps", "batch_size", "samples")
        + ("calib_patches", "val_patches", "epochs"),
        where,
        optional=("batch_size", "calib_patches", "val_patches", "epochs"),
    )
    return options


# ---------------------------------------------------------------------- candidates from the space
@dataclass(frozen=True)
class Candidate:
    """One answer of a unit: the space's parameters it sets (``b3.op``, ``b3.pmscn.m``, ...) and its params
    at the unit's first slot (the order candidates are thinned in)."""

    answers: Mapping[str, Any]
    params: int

    def describe(self, label: str) -> str:
        return ", ".join(f"{k[len(label) + 1 :]}={v}" for k, v in self.answers.items())


@dataclass(frozen=True)
class UnitCandidates:
    label: str
    slots: tuple[int, ...]
    kept: tuple[Candidate, ...]
    per_op: Mapping[str, tuple[int, int]]  # op -> (kept, of all its decisions)


def unit_candidates(space: SearchSpace, narrow_slots: Sequence[Any], per_op: int) -> list[UnitCandidates]:
    """Per unit, its candidates: every op's decisions (``replay_all`` over the op's ``decide``), at most
    ``per_op`` per op, evenly spaced over them ordered by params; those a narrow slot cannot take dropped."""
    spatial = (8, 8, 8)  # params do not depend on the input size
    found = []
    for unit in space.units:
        kept: list[Candidate] = []
        counts: dict[str, tuple[int, int]] = {}
        first = unit.slots[0]
        for op, domain in unit.domains.items():
            options: list[Candidate] = []
            for answers in replay_all(lambda ask, d=domain: _decide_answers(d, ask)):
                decision = domain.decide(lambda param, a=answers: a[param])
                try:
                    for index in unit.slots:
                        choice = rescale(
                            domain.resolve(decision, space.slots[index]), space.slots[index], narrow_slots[index]
                        )
                        realize(narrow_slots[index], choice)
                except ValueError:
                    continue
                choice = domain.resolve(decision, space.slots[first])
                params = sum(price_config(spec, spatial).params for spec in realize(space.slots[first], choice))
                named = {f"{unit.label}.op": op, **{f"{unit.label}.{op}.{p}": v for p, v in answers.items()}}
                options.append(Candidate(named, params))
            options.sort(key=lambda c: c.params)
            chosen = _evenly(options, per_op)
            counts[op] = (len(chosen), len(options))
            kept += chosen
        if not kept:
            raise ValueError(f"unit {unit.label}: no op of the space fits its slots at the super-net's width")
        found.append(UnitCandidates(unit.label, tuple(unit.slots), tuple(kept), counts))
    return found


def _decide_answers(domain: Any, ask: Callable[[str, Sequence[Any]], Any]) -> dict[str, Any]:
    answers: dict[str, Any] = {}

    def asked(param: str) -> Any:
        answers[param] = ask(param, domain.params[param])
        return answers[param]

    domain.decide(asked)
    return answers


def _evenly(options: Sequence[Candidate], count: int) -> list[Candidate]:
    if len(options) <= count:
        return list(options)
    if count == 1:
        return [options[0]]
    return [options[round(i * (len(options) - 1) / (count - 1))] for i in range(count)]


def restriction_line(units: Sequence[UnitCandidates], per_op: int) -> str:
    """One line saying how the space was restricted for NNI's one-shot super-net (never silently)."""
    cut = {}
    for unit in units:
        for op, (kept, total) in unit.per_op.items():
            if kept < total:
                cut.setdefault(op, set()).add((kept, total))
    sizes = " × ".join(str(len(u.kept)) for u in units)
    if not cut:
        return f"NNI one-shot super-net: every decision of the space as a candidate ({sizes} per unit)"
    parts = ", ".join(f"{op} {'/'.join(f'{k} of {t}' for k, t in sorted(pairs))}" for op, pairs in sorted(cut.items()))
    return (
        f"NNI one-shot super-net: the space restricted to at most {per_op} decisions per op and unit, evenly "
        f"spaced by params ({parts}; --engine-option candidates=N); candidates per unit: {sizes}"
    )


def config_of(space: SearchSpace, units: Sequence[UnitCandidates], sample: Mapping[str, int]) -> ArchConfig:
    """The ArchConfig (at the space's width) of an NNI sample {unit label: candidate index}."""
    answers = answers_of(units, sample)
    return space.decide(lambda name, choices: answers[name])


def answers_of(units: Sequence[UnitCandidates], sample: Mapping[str, int]) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for unit in units:
        answers.update(unit.kept[int(sample[unit.label])].answers)
    return answers


# ---------------------------------------------------------------------- the NNI model space
class OneShotSpace(ModelSpace):
    """The task's backbone at ``width`` × the space's width, every slot an NNI ``LayerChoice`` over its unit's
    candidates (one module each, built by the backbone's own slot builder), labelled with the unit."""

    def __init__(self, space: SearchSpace, units: Sequence[UnitCandidates], width: float) -> None:
        super().__init__()
        first = space.decide(lambda name, choices: choices[0])
        self.width = float(first.hparams.get("width", 1.0)) * width
        base = with_width(first, self.width)
        slots = get_backbone(base.backbone).slots(base.hparams)
        unit_of = {index: unit for unit in units for index in unit.slots}
        domains = {unit.label: unit.domains for unit in space.units}
        placed: list[int] = []

        def fill(index: int, specs: Sequence[Any], build: Callable[[Sequence[Any]], nn.Module]) -> nn.Module:
            unit = unit_of[index]
            modules = []
            for candidate in unit.kept:
                op = candidate.answers[f"{unit.label}.op"]
                domain = domains[unit.label][op]
                decision = domain.decide(lambda p, c=candidate, o=op: c.answers[f"{unit.label}.{o}.{p}"])
                choice = rescale(domain.resolve(decision, space.slots[index]), space.slots[index], slots[index])
                modules.append(build(realize(slots[index], choice)))
            placed.append(index)
            return LayerChoice(modules, label=unit.label)

        self.net = build_with_fill(base, fill)
        missing = sorted(set(unit_of) - set(placed))
        if missing:
            raise ValueError(f"backbone {base.backbone} did not place slot(s) {missing} through its fill hook")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TaskTraining(LightningModule):
    """The task's training step (its loss) and AdamW one-cycle, as the evaluator NNI's one-shot module wraps."""

    def __init__(self, task: Any, *, lr: float, weight_decay: float, steps: int) -> None:
        super().__init__()
        self.task, self.loss_fn = task, task.loss()
        self.lr, self.weight_decay, self.steps = lr, weight_decay, steps
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss_fn(self.model(batch[self.task.input_key]), batch)
        if not torch.isfinite(loss):
            raise TrainingFailed(f"the NNI super-net's loss became {loss.item()} at step {len(self.losses)}")
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> Any:
        return optimizer_and_schedule(
            self.model.parameters(),
            lr=self.lr,
            weight_decay=self.weight_decay,
            schedule="onecycle",
            total_steps=self.steps + 1,
        )


def make_strategy(name: str, options: Mapping[str, Any], admissible: Callable[[Mapping[str, int]], bool]) -> Any:
    if name == "spos":
        return RandomOneShot(filter=lambda sample: admissible(sample))
    if name == "darts":
        return DARTS(arc_learning_rate=options["arc_lr"])
    if name == "proxyless":
        return Proxyless(arc_learning_rate=options["arc_lr"])
    raise ValueError(f"unknown NNI one-shot strategy {name!r}; choose from {', '.join(STRATEGIES)}")


class PatchBatches(torch.utils.data.Dataset):
    """Fixed batches (a list), one per item: validation patches as a loader NNI's modules can cycle."""

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Mapping[str, torch.Tensor]:
        return self.batches[index]


def _loader(batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PatchBatches(batches), batch_size=None, shuffle=False)


# ---------------------------------------------------------------------- one search
@dataclass
class OneShotResult:
    found: Found
    training: SuperTraining
    scored: int  # spos: sub-networks scored with inherited weights; else 0


class OneShotSearch:
    """Build, train and export one NNI one-shot super-net for ``plan`` (see the module docstring)."""

    def __init__(self, plan: Any, strategy: str, options: Mapping[str, Any], *, seed: int, data_dir: Any) -> None:
        self.plan, self.strategy_name, self.options = plan, strategy, dict(options)
        self.seed, self.data_dir = seed, data_dir
        self.task = plan.task
        self.space: SearchSpace = plan.space
        first = self.space.decide(lambda name, choices: choices[0])
        self.full_width = float(first.hparams.get("width", 1.0))
        narrow = with_width(first, self.full_width * self.options["width"])
        self.units = unit_candidates(
            self.space, get_backbone(narrow.backbone).slots(narrow.hparams), self.options["candidates"]
        )
        self.batch_size = self.options["batch_size"] or int(plan.profile.data_options.get("batch_size", 4))
        self._prices: dict[tuple[int, ...], Cost] = {}

    def restriction(self) -> str:
        return restriction_line(self.units, self.options["candidates"])

    def price(self, sample: Mapping[str, int]) -> Cost:
        key = tuple(int(sample[u.label]) for u in self.units)
        if key not in self._prices:
            self._prices[key] = self.plan.pricing.price(config_of(self.space, self.units, sample))
        return self._prices[key]

    def fits(self, sample: Mapping[str, int]) -> bool:
        return self.plan.pricing.budget.fits(self.price(sample))

    def check_budget(self) -> None:
        """Refuse, in one line, a budget no architecture of the candidates meets (the cheapest per unit)."""
        cheapest = {u.label: min(range(len(u.kept)), key=lambda i, u=u: u.kept[i].params) for u in self.units}
        if not self.fits(cheapest):
            price = self.price(cheapest)
            raise ValueError(
                f"--engine nni --strategy {self.strategy_name}: no architecture of the one-shot candidates fits "
                f"{self.plan.pricing.budget.describe()}: the cheapest costs {format_count(price.params)} params, "
                f"{format_count(price.macs)} MACs"
            )

    # ------------------------------------------------------------------ data
    def _datamodule(self, seed: int, samples: int) -> Any:
        options = {**self.plan.profile.data_options, "samples_per_epoch": samples, "batch_size": self.batch_size}
        datamodule = self.task.datamodule(data_dir=self.data_dir, seed=seed, **options)
        datamodule.setup("fit")
        return datamodule

    def _fixed_patches(self) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        seed = self.seed + 10_007
        datamodule = self._datamodule(seed, self.options["calib_patches"])
        key = self.task.input_key
        calibration = [batch[key] for batch in datamodule.train_dataloader()]
        patches = crop_patches(
            datamodule.val_dataloader(), key, self.task.input_shape[1:], self.options["val_patches"], seed
        )
        return calibration, stack(patches, self.batch_size)

    # ------------------------------------------------------------------ the search
    def run(self, seconds: float | None, stage: Callable[[str], None]) -> OneShotResult:
        started = time.perf_counter()
        torch.manual_seed(self.seed)
        space = OneShotSpace(self.space, self.units, self.options["width"])
        strategy = make_strategy(self.strategy_name, self.options, self.fits)
        calibration, validation = self._fixed_patches()
        steps = self.options["steps"]
        if steps == "auto":
            if seconds is None:
                steps = self.options["default_steps"]
            else:
                per_step = self._time_step(space, validation[0])
                if self.strategy_name != "spos":
                    per_step *= 2  # an architecture step and a weight step per batch
                allowed = seconds - (time.perf_counter() - started)
                steps = int(min(self.options["max_steps"], max(self.options["min_steps"], allowed / per_step)))
        training = TaskTraining(
            self.task, lr=self.options["lr"], weight_decay=self.options["weight_decay"], steps=steps
        )
        datamodule = self._datamodule(self.seed, min(steps, 256) * self.batch_size)
        limit = None if seconds is None else timedelta(seconds=max(1.0, seconds - (time.perf_counter() - started)))
        with _quiet():
            trainer = Trainer(
                accelerator="auto",
                devices=1,
                max_steps=steps if self.strategy_name == "spos" else 2 * steps,  # darts: 2 optimizer steps a batch
                max_epochs=-1,
                max_time=limit,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
        with warnings.catch_warnings():  # NNI asks for traced loaders, needed only by its training services
            warnings.simplefilter("ignore", RuntimeWarning)
            evaluator = Lightning(
                training, trainer, train_dataloaders=datamodule.train_dataloader(), val_dataloaders=_loader(validation)
            )
        stage(
            f"training NNI's {NNI_NAMES[self.strategy_name]} one-shot super-net: {steps} steps, width "
            f"{self.options['width']:g}"
        )
        engine = SequentialExecutionEngine()
        with _quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(self.seed)
            strategy.initialize(RawFormatModelSpace(space, evaluator), engine)
            strategy.run()
        supernet = strategy.oneshot_module
        # darts/proxyless call the task's step twice a batch: the architecture's (validation patches), the weights'
        losses = training.losses if self.strategy_name == "spos" else training.losses[1::2]
        trained = SuperTraining(len(losses), time.perf_counter() - started, losses)
        log.info(
            "NNI %s super-net trained: %d steps in %.0f s, loss %.3f -> %.3f",
            NNI_NAMES[self.strategy_name],
            trained.steps,
            trained.seconds,
            _mean(trained.losses[:20]),
            _mean(trained.losses[-20:]),
        )
        if not trained.losses:
            raise TrainingFailed("the NNI super-net took no training step")
        if self.strategy_name == "spos":
            stage(f"scoring {self.options['samples']} in-budget sub-networks of the super-net (inherited weights)")
            sample, scored = self._best_sample(supernet, space, calibration, validation)
            moved = 0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sample = dict(next(iter(strategy.list_models())).sample)
                probs = supernet.export_probs()
            for unit in self.units:
                weights = probs.get(unit.label, {})
                top = max(weights, key=lambda i, w=weights: w[i]) if weights else None
                if top is not None:
                    log.info(
                        "%s %s: p=%.3f for %s (uniform %.3f)",
                        NNI_NAMES[self.strategy_name],
                        unit.label,
                        float(weights[top]),
                        unit.kept[int(top)].describe(unit.label),
                        1 / len(unit.kept),
                    )
            sample, moved = self._fit_budget(sample, probs)
            scored = 0
        config = config_of(self.space, self.units, sample)
        found = Found(self.strategy_name, config, self.plan.pricing.price(config), moved)
        self.answers = answers_of(self.units, sample)
        return OneShotResult(found, trained, scored)

    def _time_step(self, space: OneShotSpace, batch: Mapping[str, torch.Tensor]) -> float:
        """Seconds of one forward + backward of the super-net with every slot at its costliest candidate."""
        loss_fn = self.task.loss()
        rows = self.batch_size
        batch = {k: torch.cat([v] * math.ceil(rows / v.shape[0]))[:rows] for k, v in batch.items()}
        costliest = {u.label: max(range(len(u.kept)), key=lambda i, u=u: u.kept[i].params) for u in self.units}
        frozen = space.freeze(costliest) if self.strategy_name == "spos" else None
        net = frozen if frozen is not None else _all_paths(space)
        device = compute_device()
        place(net, device).train()
        batch = to_device(batch, device)
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            loss_fn(net(batch[self.task.input_key]), batch).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        net.cpu()
        space.cpu().zero_grad(set_to_none=True)
        return sorted(seconds)[1]

    def _best_sample(
        self, supernet: Any, space: OneShotSpace, calibration: list[torch.Tensor], validation: list[dict]
    ) -> tuple[dict[str, int], int]:
        """SPOS's search step: NNI's module draws in-budget samples (its filter is the budget); each is
        activated in the trained super-net, its BatchNorm recalibrated, scored on the validation patches."""
        best: tuple[float, dict[str, int]] | None = None
        seen: set[tuple[int, ...]] = set()
        objective = self.plan.record.objectives[0]
        scored = 0
        for _ in range(self.options["samples"] * 4):
            if scored >= self.options["samples"]:
                break
            sample = {label: int(value) for label, value in supernet.resample().items()}
            key = tuple(sample[u.label] for u in self.units)
            if key in seen:
                continue
            seen.add(key)
            score = self._score(space, calibration, validation)
            scored += 1
            log.info(
                "spos sample %d: %s %.4f with inherited weights, %s params; %s",
                scored,
                self.task.metric,
                score,
                format_count(self.price(sample).params),
                "; ".join(f"{u.label}: {u.kept[sample[u.label]].describe(u.label)}" for u in self.units),
            )
            value = score if objective.maximize else -score
            if math.isfinite(value) and (best is None or value > best[0]):
                best = (value, sample)
        if best is None:
            raise TrainingFailed("no sub-network of the NNI super-net scored a finite metric")
        return best[1], scored

    def _score(self, space: OneShotSpace, calibration: list[torch.Tensor], validation: list[dict]) -> float:
        device = next(space.parameters()).device  # where Lightning left the super-net
        recalibrate(space, [inputs.to(device) for inputs in calibration])
        metrics = self.task.metrics()
        metrics.reset()
        with torch.no_grad():
            predictions = [self.task.predict(space, to_device(batch, device)).cpu() for batch in validation]
            pooled = pool_volumes(predictions, validation, self.task.input_key)
            for prediction, batch in pooled or zip(predictions, validation):
                metrics.update(prediction, batch)
        space.train()
        return float(metrics.compute().get(self.task.metric, math.nan))

    def _fit_budget(self, sample: dict[str, int], probs: Mapping[str, Mapping[Any, float]]) -> tuple[dict, int]:
        """NNI's export if it fits; else unit by unit to cheaper candidates, the move that loses least
        architecture probability per parameter saved first, every step priced exactly."""
        sample = {label: int(value) for label, value in sample.items()}
        moved = 0
        while not self.fits(sample):
            now = self.price(sample).params
            best: tuple[float, str, int] | None = None
            for unit in self.units:
                weights = probs.get(unit.label, {})
                current = sample[unit.label]
                for index in range(len(unit.kept)):
                    trial = {**sample, unit.label: index}
                    saved = now - self.price(trial).params
                    if saved <= 0:
                        continue
                    loss = float(weights.get(current, 0.0)) - float(weights.get(index, 0.0))
                    key = (loss / saved, unit.label, index)
                    if best is None or key < best:
                        best = key
            if best is None:
                raise ValueError(f"no cheaper choice of the one-shot candidates fits the budget (now {now} params)")
            sample[best[1]] = best[2]
            moved += 1
        return sample, moved


def _all_paths(space: OneShotSpace) -> nn.Module:
    """The super-net running every candidate of every slot (summed): what a DARTS step computes."""

    class Summed(nn.Module):
        def __init__(self, choices: Sequence[nn.Module]) -> None:
            super().__init__()
            self.choices = nn.ModuleList(choices)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum(choice(x) for choice in self.choices)  # type: ignore[return-value]

    import copy

    clone = copy.deepcopy(space)
    for name, module in list(clone.named_modules()):
        if isinstance(module, LayerChoice):
            parent = clone.get_submodule(name.rpartition(".")[0]) if "." in name else clone
            setattr(parent, name.rpartition(".")[2], Summed([module[i] for i in range(len(module))]))
    return clone


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------- the engine
class NniOneShotEngine(CakesEngine):
    """One NNI one-shot search per run; its architecture retrained and told by the CAKES engine's ending."""

    def __init__(self, plan: Any, study: optuna.Study, *, search: OneShotSearch, **kwargs: Any) -> None:
        super().__init__(plan, study, options=search.options, **kwargs)
        self.strategy = search.strategy_name
        self.search = search
        self.engine_name = f"nni-{self.strategy}"

    def planned(self) -> int:
        return 1

    def label(self) -> str:
        return f"nni {self.strategy} one-shot"

    def words(self, found: Found, training: SuperTraining, retrained: str) -> str:
        return (
            f"{self.label()} super-net ({training.steps} steps, width {self.options['width']:g}, "
            f"{'×'.join(str(len(u.kept)) for u in self.search.units)} candidates); {retrained}"
        )

    def decisions(self, found: Found) -> dict[str, Any]:
        """NNI's choice as the space's own answers (only those ``decide`` asks: more than one choice)."""
        asked = self.plan.space.parameters()
        return {name: value for name, value in getattr(self.search, "answers", {}).items() if name in asked}

    def named(self, found: Found) -> str:
        return f"the architecture NNI's {NNI_NAMES[self.strategy]} found"

    def _done(self) -> dict[str, Any]:
        found = {}
        for record in read_trials(self.study):
            if record.state != optuna.trial.TrialState.COMPLETE or record.fidelity is None:
                continue
            if record.fidelity.words.startswith(self.label()):
                found[self.strategy] = record
        return found

    def _fail_label(self, priority: str) -> str:
        return self.label()

    def run(self) -> Front:
        set_planned_trials(self.study, 1)
        done = bool(self._done())
        self.on_event(Preparing(self.search.restriction()))
        self.on_event(
            Started(
                created=not read_trials(self.study),
                loop_s=None,
                end_s=self.seconds_left(),
                retrain=0 if done else 1,
                done=int(done),
                planned=1,
            )
        )
        front = write_outputs(self.plan.out_dir, self.plan.record, read_trials(self.study))
        if done:
            return front
        left = self.seconds_left()
        self.search_s = None if left is None else left * self.options["train_share"]
        log.info(
            "NNI %s (%s) drives the super-net in this process (no NNI manager or web server); its log: %s",
            NNI_NAMES[self.strategy],
            self.strategy,
            self.plan.out_dir / NNI_LOG,
        )
        try:
            with nni_logging_to(self.plan.out_dir / NNI_LOG):
                result = self.search.run(self.search_s, lambda what: self.on_event(Preparing(what)))
        except INTERRUPTS:
            raise
        except Exception as error:  # a diverging super-net fails the search's one trial, with the reason
            self._fail(self.strategy, f"super-net: {failure_reason(error)}", None, done=0)
            return write_outputs(self.plan.out_dir, self.plan.record, read_trials(self.study))
        found = result.found
        how = f"best of {result.scored} in-budget samples" if result.scored else f"{found.moved} unit(s) moved"
        self.on_event(
            Preparing(
                f"found ({self.strategy}: {how}): {format_count(found.cost.params)} params, "
                f"{format_count(found.cost.macs)} MACs"
            )
        )
        return self._retrain_and_tell(found, result.training, remaining=1, done=0, planned=1)

"""``psc-search --engine cakes``: the CAKES paper's own search (Yu et al., sec. 3.4), one super-network
training per search instead of many trained candidates.

    the task's backbone, every slot's conv a CakesSuperConv: per output channel every candidate sub-kernel
    of the shape set (1D; 2D; 1D+2D; 2D+3D; 1D+2D+3D), each path with its own BatchNorm scale γ and shift
    ─► performance priority: each step a random path per output channel (one conv, the chosen sub-kernels
       zero-padded into one 3x3x3 weight); importance |γ| of each path's BN; keep the argmax per channel
    ─► cost priority: every path computed, concatenated, aggregated by a 1x1x1 conv; loss + λ Σ β_s |γ_s| with
       β ∝ cost (9:3:1 for 3D:2D:1D, normalised over the dimensions in the set as the paper's 9/13, 3/13,
       1/13); keep the largest |γ| per channel
    ─► per slot, the chosen paths' counts become a ``cakes`` allocation (channel fractions, rescaled from the
       super-network's width to the task's with the family's own rule) ─► an ArchConfig priced exactly;
       over the run's budget, channels move to cheaper shapes, the move that loses least |γ| per unit of
       cost saved first, until it fits (refused up front when even the all-cheapest allocation cannot)
    ─► each found architecture retrained from scratch (the profile's retraining policy, the longest schedule
       the time budget allows, timed on a first epoch) and told to the study as an ordinary trial: its search
       score is the retrained score, its fidelity in words says how it was found

The study, run folder, dashboard and export are the optuna engine's (``record``, ``outputs``): a resumed
run reuses the trained super-network (``cakes-supernet-<key>.pt`` in the run folder) and skips priorities
already in the study; Ctrl-C leaves only finished trials (a trial is asked and told after its training).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn.functional as F
from torch import nn

from psc_nas.arch import ArchConfig, BlockChoice, Slot
from psc_nas.costs import Cost, format_count
from psc_nas.device import compute_device, place, to_device
from psc_nas.evaluators.base import Evaluation, Fidelity, failure_reason
from psc_nas.files import write_bytes_atomic
from psc_nas.nets import cost as price_config
from psc_nas.nets import get_backbone
from psc_nas.nets.budget import with_width
from psc_nas.nets.build import build_with_fill
from psc_nas.ops import summary
from psc_nas.ops.cakes import SHAPE_DIMS, SHAPES, largest_remainder, pad_kernel, shape_kernel, uniform_allocation
from psc_nas.search.engine_options import check_numbers, check_positive_ints
from psc_nas.search.events import Evaluated, Failed, Listener, Preparing, Started
from psc_nas.search.front import Front
from psc_nas.search.interrupt import INTERRUPTS, sigint_held
from psc_nas.search.outputs import write_outputs
from psc_nas.search.profiles import RetrainPolicy
from psc_nas.search.record import (
    Retrained,
    TrialRecord,
    read_trials,
    save_retrained,
    set_planned_trials,
    set_violations,
    tell_evaluated,
    tell_failed,
)
from psc_nas.search.retrain import FinalWeights, epochs_that_fit, fidelity_words, probe_timing, weights_file
from psc_nas.train import TrainingFailed, fit, optimizer_and_schedule
from psc_nas.weights import save_weights

log = logging.getLogger("psc_nas.search")

CUBE = (3, 3, 3)
SHAPE_SETS = {
    "1D": SHAPE_DIMS["1D"],
    "2D": SHAPE_DIMS["2D"],
    "1D+2D": SHAPE_DIMS["1D"] + SHAPE_DIMS["2D"],
    "2D+3D": SHAPE_DIMS["2D"] + SHAPE_DIMS["3D"],
    "1D+2D+3D": SHAPES,
}
DIMENSION = {shape: dim for dim, shapes in SHAPE_DIMS.items() for shape in shapes}
COST_RATIO = {"1D": 1, "2D": 3, "3D": 9}  # the paper's β: 9/13, 3/13, 1/13 for 3D, 2D, 1D
PRIORITIES = ("performance", "cost")
ENGINE = "cakes"

DEFAULTS: dict[str, Any] = {
    "shapes": "1D+2D+3D",  # the candidate sub-kernels: 1D | 2D | 1D+2D | 2D+3D | 1D+2D+3D
    "priority": "both",  # performance | cost | both
    "width": 0.25,  # the super-network's channel multiplier (of the space's width)
    "steps": "auto",  # super-network training steps; auto: train_share of the time budget
    "train_share": 0.35,  # of the run's time budget, for the super-network when steps is auto
    "default_steps": 300,  # steps=auto without a time budget
    "min_steps": 20,
    "max_steps": 3000,
    "batch_size": None,  # default: the profile's data batch_size
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "penalty": 1e-4,  # λ of the cost-priority lasso on the path weights γ
    "epochs": None,  # retraining epochs of each found architecture; default: what the time budget allows
}


# ---------------------------------------------------------------------- options
ZERO_OK = ("train_share", "weight_decay", "penalty")  # options that may be 0 (width and lr may not)


def parse_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's options over ``DEFAULTS``, checked; a bad one raises a one-line ``ValueError``."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"--engine cakes: unknown option {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    options = {**DEFAULTS, **given}
    shapes = str(options["shapes"]).upper().replace(",", "+").replace(" ", "")
    canonical = next((name for name in SHAPE_SETS if set(name.split("+")) == set(shapes.split("+"))), None)
    if canonical is None:
        raise ValueError(f"--engine cakes: shapes must be one of {', '.join(SHAPE_SETS)}, got {options['shapes']!r}")
    options["shapes"] = canonical
    if options["priority"] not in (*PRIORITIES, "both"):
        raise ValueError(f"--engine cakes: priority must be performance, cost or both, got {options['priority']!r}")
    where = "--engine cakes"
    check_numbers(options, ("width", "train_share", "lr", "weight_decay", "penalty"), where, zero_ok=ZERO_OK)
    if options["train_share"] >= 1:
        raise ValueError(f"--engine cakes: option train_share must be below 1, got {options['train_share']!r}")
    ints = ("steps", "default_steps", "min_steps", "max_steps", "batch_size", "epochs")
    check_positive_ints(options, ints, where, optional=ints)
    return options


def priorities(options: Mapping[str, Any]) -> tuple[str, ...]:
    return PRIORITIES if options["priority"] == "both" else (options["priority"],)


def cost_weights(shapes: Sequence[str]) -> dict[str, float]:
    """β per shape: proportional to its dimension's cost (9:3:1), normalised over the dimensions present."""
    dims = {DIMENSION[shape] for shape in shapes}
    total = sum(COST_RATIO[dim] for dim in dims)
    return {shape: COST_RATIO[DIMENSION[shape]] / total for shape in shapes}


def fidelity_of(shapes: str, priority: str, steps: int, width: float, retrained: str) -> str:
    return f"cakes super-network, {shapes}, {priority} priority ({steps} steps, width {width:g}); {retrained}"


# ---------------------------------------------------------------------- the super-network
class CakesSuperConv(nn.Module):
    """One searchable conv: per output channel a path per candidate shape, each with its own BN (γ, shift).

    ``path`` (a LongTensor of output channels' shape indices), when set, fixes the path of every channel;
    else a performance-priority conv draws one per channel at each training forward and uses the argmax of
    |γ| in eval mode. BN statistics are the batch's (the super-network is only trained, never scored).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Any, shapes: Sequence[str], priority: str) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * 3
        self.shapes, self.priority = tuple(shapes), priority
        self.weights = nn.ParameterList()
        for shape in self.shapes:
            weight = torch.empty(out_channels, in_channels, *shape_kernel(shape))
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # what nn.Conv3d does
            self.weights.append(nn.Parameter(weight))
        self.gamma = nn.Parameter(torch.ones(len(self.shapes), out_channels))
        self.shift = nn.Parameter(torch.zeros(len(self.shapes), out_channels))
        self.aggregate = (
            nn.Conv3d(len(self.shapes) * out_channels, out_channels, 1, bias=False) if priority == "cost" else None
        )
        self.path: torch.Tensor | None = None

    def padded(self) -> torch.Tensor:
        """(paths, out, in, 3, 3, 3): every path's kernel zero-padded to the cube (same output, 'same' padding)."""
        return torch.stack([pad_kernel(weight, CUBE) for weight in self.weights])

    def raw(self, x: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """The convs of ``path`` (one shape per output channel), before their BN: one conv on the padded kernels."""
        weight = self.padded()[path, torch.arange(self.out_channels, device=path.device)]
        return F.conv3d(x, weight, None, self.stride, 1)

    def importance(self) -> torch.Tensor:
        """|γ| per path and output channel: (paths, out)."""
        return self.gamma.detach().abs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = torch.arange(self.out_channels, device=x.device)
        if self.aggregate is not None and self.path is None:
            y = F.conv3d(x, self.padded().flatten(0, 1), None, self.stride, 1)
            y = F.batch_norm(y, None, None, self.gamma.flatten(), self.shift.flatten(), training=True)
            return self.aggregate(y)
        if self.path is not None:
            path = self.path.to(x.device)
        elif self.training:
            path = torch.randint(len(self.shapes), (self.out_channels,), device=x.device)
        else:
            path = self.importance().argmax(0).to(x.device)
        y = self.raw(x, path)
        return F.batch_norm(y, None, None, self.gamma[path, channels], self.shift[path, channels], training=True)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, {'+'.join(self.shapes)}, {self.priority}"
        )


class _SuperSpec:
    """Stands in for a slot's op spec when the backbone builds the super-network: builds the super conv."""

    def __init__(self, conv: CakesSuperConv) -> None:
        self.conv = conv
        self.in_channels, self.out_channels, self.stride = conv.in_channels, conv.out_channels, conv.stride

    def build(self, impl: str | None = None) -> CakesSuperConv:
        return self.conv


def base_config(space: Any, shapes: Sequence[str]) -> ArchConfig:
    """The space's backbone and hparams with every slot a uniform ``cakes`` allocation over ``shapes``."""
    first = space.decide(lambda name, choices: choices[0])
    slots = get_backbone(first.backbone).slots(first.hparams)
    blocks = tuple(
        BlockChoice("cakes", {"allocation": uniform_allocation(s.out_channels, tuple(shapes))}) for s in slots
    )
    return ArchConfig(first.backbone, dict(first.hparams), blocks)


class CakesSuperNet(nn.Module):
    """The task's backbone at ``width`` × the space's width, every slot's convs ``CakesSuperConv``s."""

    def __init__(self, space: Any, shapes: Sequence[str], priority: str, *, width: float = 1.0) -> None:
        super().__init__()
        self.shapes, self.priority = tuple(shapes), priority
        config = base_config(space, shapes)
        self.width = float(config.hparams.get("width", 1.0)) * width
        self.config = with_width(config, self.width)  # uniform allocations at the super-network's width
        backbone = get_backbone(self.config.backbone)
        self.slots: list[Slot] = backbone.slots(self.config.hparams)
        self.convs: dict[int, list[CakesSuperConv]] = {}

        def fill(index: int, specs: Sequence[Any], build: Callable[[Sequence[Any]], nn.Module]) -> nn.Module:
            convs = [CakesSuperConv(s.in_channels, s.out_channels, s.stride, self.shapes, priority) for s in specs]
            self.convs.setdefault(index, []).extend(convs)
            return build([_SuperSpec(conv) for conv in convs])

        self.net = build_with_fill(self.config, fill)
        missing = [self.slots[i].name for i in range(len(self.slots)) if i not in self.convs]
        if missing:
            raise ValueError(f"backbone {self.config.backbone} did not place slot(s) {missing} through its fill hook")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def super_convs(self) -> list[CakesSuperConv]:
        return [conv for index in sorted(self.convs) for conv in self.convs[index]]

    def penalty(self) -> torch.Tensor:
        """Σ β_s |γ_s| over every path of every searchable conv (the cost-priority lasso, before λ)."""
        beta = cost_weights(self.shapes)
        total = torch.zeros(())
        for conv in self.super_convs():
            weights = torch.tensor([beta[s] for s in conv.shapes], device=conv.gamma.device)
            total = total.to(conv.gamma.device) + (weights[:, None] * conv.gamma.abs()).sum()
        return total

    def choose(self) -> list[list[torch.Tensor]]:
        """Per slot, per conv: the chosen path per output channel (argmax |γ|)."""
        return [[conv.importance().argmax(0) for conv in self.convs[index]] for index in sorted(self.convs)]


# ---------------------------------------------------------------------- allocation -> ArchConfig
@dataclass(frozen=True)
class Found:
    """One priority's result: the architecture at the task's width, and how it was found."""

    priority: str
    config: ArchConfig
    cost: Cost
    moved: int  # channels moved to cheaper shapes to meet the budget (at the task's width)


def counts(path: torch.Tensor, shapes: Sequence[str]) -> dict[str, int]:
    return {shape: int((path == index).sum()) for index, shape in enumerate(shapes) if int((path == index).sum())}


def slot_allocation(paths: Sequence[torch.Tensor], shapes: Sequence[str], out_channels: int) -> dict[str, int]:
    """A slot's allocation from its convs' chosen paths (a multi-conv slot takes one allocation: their mean)."""
    total = {shape: Fraction(0) for shape in shapes}
    for path in paths:
        for shape, count in counts(path, shapes).items():
            total[shape] += Fraction(count, len(path) * len(paths))
    return largest_remainder({s: f for s, f in total.items() if f}, out_channels)


def importance_per_shape(supernet: CakesSuperNet) -> list[dict[str, float]]:
    """Per slot, per shape: mean |γ| of that path over the slot's channels (what a downgrade loses)."""
    found = []
    for index in sorted(supernet.convs):
        rows = torch.stack([conv.importance() for conv in supernet.convs[index]])  # (convs, paths, out)
        found.append({shape: float(rows[:, i].mean()) for i, shape in enumerate(supernet.shapes)})
    return found


def allocation_config(supernet: CakesSuperNet, full_width: float) -> ArchConfig:
    """The chosen paths as an ArchConfig of ``cakes`` blocks, rescaled to ``full_width`` (the task's)."""
    blocks = tuple(
        BlockChoice("cakes", {"allocation": slot_allocation(paths, supernet.shapes, slot.out_channels)})
        for paths, slot in zip(supernet.choose(), supernet.slots)
    )
    narrow = ArchConfig(supernet.config.backbone, dict(supernet.config.hparams), blocks)
    return with_width(narrow, full_width)


def fit_allocation(
    config: ArchConfig,
    importance: Sequence[Mapping[str, float]],
    fits: Callable[[Cost], bool],
    spatial: Sequence[int],
) -> tuple[ArchConfig, Cost, int]:
    """``config`` if it fits; else move channels to cheaper shapes one at a time (the move that loses least
    mean |γ| per parameter saved first: a slot's cost is linear in its taps per input channel) until it does,
    every step priced exactly. Raises ``ValueError`` when nothing fits."""
    price = price_config(config, spatial)
    if fits(price):
        return config, price, 0
    blocks = [dict(block.args["allocation"]) for block in config.blocks]
    slots = get_backbone(config.backbone).slots(config.hparams)

    def with_blocks(allocations: Sequence[Mapping[str, int]]) -> ArchConfig:
        return replace(config, blocks=tuple(BlockChoice("cakes", {"allocation": dict(a)}) for a in allocations))

    taps = {shape: math.prod(shape_kernel(shape)) for shape in SHAPES}
    shapes = [s for s in SHAPES if any(s in m for m in importance)]
    moved = 0
    while not fits(price):
        best: tuple[float, int, str, str] | None = None
        for index, allocation in enumerate(blocks):
            for source, count in allocation.items():
                for target in shapes:
                    if count < 1 or taps[target] >= taps[source]:
                        continue
                    # per channel of this slot, cost is linear in its taps: loss of |γ| per tap saved
                    loss = importance[index].get(source, 0.0) - importance[index][target]
                    key = (loss / (taps[source] - taps[target]) / slots[index].in_channels, index, source, target)
                    if best is None or key < best:
                        best = key
        if best is None:
            raise ValueError(f"no CAKES allocation over these shapes fits the budget (the cheapest costs {price})")
        _, index, source, target = best
        blocks[index][source] -= 1
        blocks[index][target] = blocks[index].get(target, 0) + 1
        if not blocks[index][source]:
            del blocks[index][source]
        moved += 1
        price = price_config(with_blocks(blocks), spatial)
    return with_blocks(blocks), price, moved


def decisions(config: ArchConfig) -> dict[str, str]:
    """Per slot, its allocation as channel fractions (``block1-layer1.cakes.allocation``: ``1x3x3=5/14,...``)."""
    slots = get_backbone(config.backbone).slots(config.hparams)
    found = {}
    for slot, block in zip(slots, config.blocks):
        allocation = block.args["allocation"]
        total = sum(allocation.values())
        shares = ",".join(f"{shape}={Fraction(count, total)}" for shape, count in allocation.items())
        found[f"{slot.name.replace('.', '-')}.cakes.allocation"] = shares
    return found


def cheapest_config(space: Any, shapes: Sequence[str]) -> tuple[ArchConfig, str]:
    """Every channel of every slot at the cheapest shape of ``shapes``: the least a search can find."""
    cheapest = min(shapes, key=lambda s: (math.prod(shape_kernel(s)), SHAPES.index(s)))
    config = base_config(space, shapes)
    slots = get_backbone(config.backbone).slots(config.hparams)
    blocks = tuple(BlockChoice("cakes", {"allocation": {cheapest: slot.out_channels}}) for slot in slots)
    return replace(config, blocks=blocks), cheapest


def check_budget(plan: Any, options: Mapping[str, Any]) -> None:
    """Refuse, in one line and before anything is written, a budget no allocation over the shapes meets."""
    config, cheapest = cheapest_config(plan.space, SHAPE_SETS[options["shapes"]])
    price = plan.pricing.price(config)  # also realizes every slot: a backbone CAKES cannot fill fails here
    if not plan.pricing.budget.fits(price):
        raise ValueError(
            f"--engine cakes: no allocation of {options['shapes']} sub-kernels fits {plan.pricing.budget.describe()}: "
            f"the cheapest (every channel {cheapest}) costs {format_count(price.params)} params, "
            f"{format_count(price.macs)} MACs"
        )


# ---------------------------------------------------------------------- training the super-network
def supernet_key(plan: Any, options: Mapping[str, Any], priority: str, seed: int) -> str:
    described = json.dumps(
        {
            "space": [
                plan.space.name,
                plan.space.backbone,
                sorted((k, repr(v)) for k, v in plan.space.hparams.items()),
            ],
            "task": plan.task.name,
            "options": sorted((k, repr(v)) for k, v in options.items() if k not in ("priority", "epochs")),
            "priority": priority,
            "seed": seed,
            "data": sorted((k, repr(v)) for k, v in plan.profile.data_options.items()),
        }
    )
    return hashlib.sha256(described.encode()).hexdigest()[:12]


@dataclass
class SuperTraining:
    steps: int
    seconds: float
    losses: list[float]


def train_supernet(
    supernet: CakesSuperNet,
    task: Any,
    *,
    steps: int,
    seed: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    penalty: float,
    data_dir: Path | None,
    data_options: Mapping[str, Any],
) -> SuperTraining:
    """``steps`` AdamW steps (one-cycle) on the task's loss (+ λ Σ β|γ| under cost priority)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    options = {**data_options, "samples_per_epoch": min(steps, 256) * batch_size, "batch_size": batch_size}
    datamodule = task.datamodule(data_dir=data_dir, seed=seed, **options)
    datamodule.setup("fit")
    schedule = optimizer_and_schedule(
        supernet.parameters(), lr=lr, weight_decay=weight_decay, schedule="onecycle", total_steps=steps
    )
    optimizer, scheduler = schedule["optimizer"], schedule["lr_scheduler"]["scheduler"]
    loss_fn = task.loss()
    losses: list[float] = []
    device = compute_device()
    place(supernet, device).train()
    done = 0
    while done < steps:
        for batch in datamodule.train_dataloader():
            batch = to_device(batch, device)
            loss = loss_fn(supernet(batch[task.input_key]), batch)
            if supernet.priority == "cost" and penalty:
                loss = loss + penalty * supernet.penalty()
            if not torch.isfinite(loss):
                raise TrainingFailed(f"the CAKES super-network's loss became {loss.item()} at step {done}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            done += 1
            if done >= steps:
                break
    return SuperTraining(steps, time.perf_counter() - started, losses)


def time_step(supernet: CakesSuperNet, task: Any, *, batch_size: int, data_dir: Path | None, seed: int) -> float:
    """Seconds of one training forward + backward (median of 3, after one warm-up), no update."""
    datamodule = task.datamodule(data_dir=data_dir, seed=seed, samples_per_epoch=batch_size, batch_size=batch_size)
    datamodule.setup("fit")
    batch = to_device(next(iter(datamodule.train_dataloader())), compute_device())
    loss_fn = task.loss()
    place(supernet, compute_device()).train()
    seconds = []
    for _ in range(4):
        start = time.perf_counter()
        loss_fn(supernet(batch[task.input_key]), batch).backward()
        seconds.append(time.perf_counter() - start)
    supernet.zero_grad(set_to_none=True)
    return sorted(seconds[1:])[1]


def search_one(
    plan: Any,
    options: Mapping[str, Any],
    priority: str,
    *,
    seed: int,
    data_dir: Path | None,
    seconds: float | None,
    work_dir: Path | None,
    stage: Callable[[str], None] = lambda what: None,
) -> tuple[Found, SuperTraining]:
    """One priority: build (or reload) and train the super-network, choose, fit the budget."""
    shapes = SHAPE_SETS[options["shapes"]]
    torch.manual_seed(seed)
    supernet = CakesSuperNet(plan.space, shapes, priority, width=options["width"])
    batch_size = options["batch_size"] or int(plan.profile.data_options.get("batch_size", 4))
    path = (
        None
        if work_dir is None
        else Path(work_dir) / f"cakes-supernet-{supernet_key(plan, options, priority, seed)}.pt"
    )
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        supernet.load_state_dict(saved["state_dict"], strict=True)
        training = SuperTraining(saved["steps"], saved["seconds"], saved["losses"])
        stage(f"cakes super-network ({priority} priority) reused: {path.name}, {training.steps} steps")
    else:
        steps = options["steps"]
        if steps == "auto":
            if seconds is None:
                steps = options["default_steps"]
            else:
                per_step = time_step(supernet, plan.task, batch_size=batch_size, data_dir=data_dir, seed=seed)
                steps = int(min(options["max_steps"], max(options["min_steps"], seconds / per_step)))
        stage(f"training the cakes super-network: {options['shapes']}, {priority} priority, {steps} steps")
        training = train_supernet(
            supernet,
            plan.task,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            lr=options["lr"],
            weight_decay=options["weight_decay"],
            penalty=options["penalty"] if priority == "cost" else 0.0,
            data_dir=data_dir,
            data_options=plan.profile.data_options,
        )
        if path is not None:
            buffer = io.BytesIO()
            torch.save(
                {
                    "state_dict": supernet.state_dict(),
                    "steps": training.steps,
                    "seconds": training.seconds,
                    "losses": training.losses,
                },
                buffer,
            )
            write_bytes_atomic(path, buffer.getvalue())
        log.info(
            "cakes super-network (%s priority) trained: %d steps in %.0f s, loss %.3f -> %.3f",
            priority,
            training.steps,
            training.seconds,
            _mean(training.losses[:20]),
            _mean(training.losses[-20:]),
        )
    full_width = float(base_config(plan.space, shapes).hparams.get("width", 1.0))
    config = allocation_config(supernet, full_width)
    spatial = tuple(plan.task.input_shape[1:])
    config, price, moved = fit_allocation(config, importance_per_shape(supernet), plan.pricing.budget.fits, spatial)
    if moved:
        log.info("cakes %s priority: %d channels moved to cheaper sub-kernels to meet the budget", priority, moved)
    return Found(priority, config, price, moved), training


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------- retraining and the study
def retrain(
    config: ArchConfig, task: Any, policy: RetrainPolicy, epochs: int, *, seed: int, data_dir: Path | None
) -> tuple[Any, dict | None]:
    final = FinalWeights()
    result = fit(
        config,
        task,
        epochs=epochs,
        seed=seed,
        data_dir=data_dir,  # type: ignore[arg-type]
        lr=policy.lr,
        weight_decay=policy.weight_decay,
        lr_schedule=policy.lr_schedule,
        data_options=policy.data_options(),
        callbacks=[final],
    )
    return result, final.state


class CakesEngine:
    """Fills a study with the CAKES search's found architectures, retrained; the run folder as any engine's."""

    engine_name = ENGINE  # the trial's evaluator (trials.csv)

    def __init__(
        self,
        plan: Any,
        study: optuna.Study,
        *,
        options: Mapping[str, Any],
        seed: int,
        data_dir: Path | None,
        timeout: float | None,
        on_event: Listener = lambda event: None,
    ) -> None:
        self.plan, self.study, self.options = plan, study, dict(options)
        self.seed, self.data_dir, self.timeout = seed, data_dir, timeout
        self.on_event = on_event
        self.started = time.monotonic()
        self.policy = plan.profile.retrain or RetrainPolicy()

    def seconds_left(self) -> float | None:
        return None if self.timeout is None else max(1.0, self.timeout - (time.monotonic() - self.started))

    # the seams another one-shot engine (nni_oneshot.NniOneShotEngine) overrides: how a found architecture is
    # described in its fidelity, its decisions (trials.csv), a failure's label, the planned trials
    def words(self, found: Found, training: SuperTraining, retrained: str) -> str:
        return fidelity_of(self.options["shapes"], found.priority, training.steps, self.options["width"], retrained)

    def decisions(self, found: Found) -> dict[str, Any]:
        return decisions(found.config)

    def named(self, found: Found) -> str:
        return f"the {found.priority}-priority architecture"

    def _fail_label(self, priority: str) -> str:
        return f"cakes {self.options['shapes']}, {priority} priority"

    def planned(self) -> int:
        return len(priorities(self.options))

    def _done(self) -> dict[str, TrialRecord]:
        """Priorities already in the study (a resume): by the words of their fidelity."""
        found = {}
        for record in read_trials(self.study):
            if record.state != optuna.trial.TrialState.COMPLETE or record.fidelity is None:
                continue
            for priority in PRIORITIES:
                if f"{self.options['shapes']}, {priority} priority" in record.fidelity.words:
                    found[priority] = record
        return found

    def run(self) -> Front:
        wanted = priorities(self.options)
        set_planned_trials(self.study, len(wanted))
        finished = self._done()
        todo = [p for p in wanted if p not in finished]
        done = len(wanted) - len(todo)
        self.on_event(
            Preparing(
                f"cakes search, {self.options['shapes']}: one super-network per priority "
                f"({', '.join(todo) or 'none left'}), each found architecture retrained from scratch as its score"
            )
        )
        self.on_event(
            Started(
                created=not finished,
                loop_s=None,
                end_s=self.seconds_left(),
                retrain=len(todo),
                done=done,
                planned=len(wanted),
            )
        )
        front = write_outputs(self.plan.out_dir, self.plan.record, read_trials(self.study))
        left = self.seconds_left()
        self.search_s = None if left is None else left * self.options["train_share"] / max(len(todo), 1)
        for position, priority in enumerate(todo):
            try:
                found, training = search_one(
                    self.plan,
                    self.options,
                    priority,
                    seed=self.seed,
                    data_dir=self.data_dir,
                    seconds=self.search_s,
                    work_dir=self.plan.out_dir,
                    stage=lambda what: self.on_event(Preparing(what)),
                )
            except INTERRUPTS:
                raise
            except Exception as error:  # a super-network that diverges fails this priority only
                self._fail(priority, f"super-network: {failure_reason(error)}", None, done=done + position)
                continue
            self.on_event(
                Preparing(
                    f"found ({priority} priority): {format_count(found.cost.params)} params, "
                    f"{format_count(found.cost.macs)} MACs, {found.moved} channels moved to meet the budget"
                )
            )
            front = self._retrain_and_tell(
                found, training, remaining=len(todo) - position, done=done + position, planned=len(wanted)
            )
        return front

    def _epochs(self, found: Found, remaining: int) -> tuple[int, Any, dict | None]:
        """The retraining schedule: the option's, else the most epochs (up to the policy's) that fit this
        architecture's share of the time left, timed on a first epoch (kept as the result when only one fits)."""
        if self.options["epochs"]:
            return self.options["epochs"], None, None
        left = self.seconds_left()
        if left is None:
            return self.policy.epochs, None, None
        self.on_event(Preparing(f"timing one retraining epoch ({self.named(found)})"))
        result, state = retrain(found.config, self.plan.task, self.policy, 1, seed=self.seed, data_dir=self.data_dir)
        epoch_s, setup_s = probe_timing(result.wall_seconds, result.curve)
        # this one's share of the time left, after the super-networks still to train
        share = ((self.seconds_left() or 0.0) - (self.search_s or 0.0) * (remaining - 1)) / remaining
        epochs = epochs_that_fit(share, epoch_s, setup_s, self.policy.epochs)
        if epochs <= 1:
            return 1, result, state
        return epochs, None, None

    def _retrain_and_tell(
        self, found: Found, training: SuperTraining, *, remaining: int, done: int, planned: int
    ) -> Front:
        try:
            epochs, result, state = self._epochs(found, remaining)
            if result is None:
                self.on_event(Preparing(f"retraining {self.named(found)} from scratch: {epochs} epochs"))
                result, state = retrain(
                    found.config, self.plan.task, self.policy, epochs, seed=self.seed, data_dir=self.data_dir
                )
        except INTERRUPTS:
            raise
        except Exception as error:  # a diverging or crashing retraining fails this architecture only
            self._fail(found.priority, f"retraining: {failure_reason(error)}", found, done=done)
            return write_outputs(self.plan.out_dir, self.plan.record, read_trials(self.study))
        words = self.words(found, training, fidelity_words(self.policy, result.epochs))
        evaluation = Evaluation(
            self.engine_name,
            Fidelity(result.epochs, words),
            result.metrics,
            result.curve,
            training.seconds + result.wall_seconds,
            result.fwd_bwd_seconds,
        )
        # from here to tell: no training, only writes (a Ctrl-C before leaves no trial behind; during, it waits)
        with sigint_held():
            self._tell(found, evaluation, result, state, done=done, planned=planned)
        return write_outputs(self.plan.out_dir, self.plan.record, read_trials(self.study))

    def _tell(
        self, found: Found, evaluation: Evaluation, result: Any, state: dict | None, *, done: int, planned: int
    ) -> None:
        metric = self.plan.record.objectives[0].name
        with warnings.catch_warnings():  # the storage's heartbeat is for Study.optimize; this trial is told at once
            warnings.simplefilter("ignore", UserWarning)
            trial = self.study.ask()
        weights = None
        if state is not None:
            weights = weights_file(trial.number)
            save_weights(state, Path(self.plan.out_dir) / weights)
        evaluation = replace(evaluation, evaluated_by=trial.number)
        record = TrialRecord(trial.number).priced(found.config, found.cost).with_evaluation(evaluation)
        record.save(trial)
        # the per-layer allocation as the search's decisions (trials.csv: <slot>.cakes.<shape> fractions), written
        # as the budget projection writes the answers that built a network (pricing.Pricing.sample)
        trial.set_user_attr("built_params", self.decisions(found))
        set_violations(trial, self.plan.pricing.budget.violations(found.cost))
        values = tuple(float(record.measure(o.name)) for o in self.plan.record.objectives)  # type: ignore[arg-type]
        tell_evaluated(self.study, trial, values)
        retrained = Evaluation(
            "retrain",
            Fidelity(result.epochs, fidelity_words(self.policy, result.epochs)),
            result.metrics,
            result.curve,
            result.wall_seconds,
            result.fwd_bwd_seconds,
            evaluated_by=trial.number,
        )
        save_retrained(self.study, Retrained(found.config.hash, retrained, self.seed, trial.number, weights))
        self.on_event(
            Evaluated(
                number=trial.number,
                fidelity=evaluation.fidelity,
                metric=metric,
                score=result.metrics.get(metric, math.nan),
                seconds=evaluation.wall_s,
                summary=summary(found.config),
                reused=False,
                done=done + 1,
                planned=planned,
                cost=found.cost,
                arch_hash=found.config.hash,
            )
        )

    def _fail(self, priority: str, reason: str, found: Found | None, *, done: int) -> None:
        """A failed priority: a FAIL trial saying why (with its architecture where one was found)."""
        reason = f"{self._fail_label(priority)}: {reason}"
        with sigint_held():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                trial = self.study.ask()
            record = TrialRecord(trial.number, fail_reason=reason)
            if found is not None:
                record = record.priced(found.config, found.cost)
            record.save(trial)
            tell_failed(self.study, trial)
        self.on_event(
            Failed(
                number=trial.number,
                reason=reason,
                done=done + 1,
                planned=self.planned(),
                summary=summary(found.config) if found else "",
            )
        )

"""The ``supernet`` evaluator: one weight-sharing super-network per search, trained once, scoring
every candidate with inherited weights (one-shot NAS, single-path uniform sampling).

    SearchSpace ─► SuperNet: the backbone built once (at width ``width``), every slot a SwitchSlot
                   holding every choice its unit can take
    prepare():  SPOS: each step samples an admissible architecture (uniform over each unit's answers:
                the op, then each of its arguments), activates it, one AdamW step (one-cycle) on the
                task's loss; saved to <run folder>/supernet-<key>.pt, reused by a resumed search
    evaluate(): activate the config, recalibrate BatchNorm on fixed training patches, score it on
                fixed validation patches with the task's metric

What is shared, per slot (a slot holds one kernel bank per role; a choice's convs are slices of them):

- ``conv3d`` (3x3x3) and ``cakes``: ONE 3x3x3 kernel. conv3d uses it whole; a CAKES allocation gives
  output channels [a, b) the sub-kernel of shape s, i.e. ``bank[a:b, :, centred s]`` (the CAKES
  super-net's per-output-channel mask of a shared kernel). All-3x3x3 CAKES *is* conv3d.
- ``pmscn`` and ``p3d`` (= PmSCn m=n=1): per orientation o, the k-th 2D conv of a stream is
  ``plane[o, k][:w, :w_in]`` (w: the stream width, so widths and m share by slicing), and its 1D conv
  is ``line[o][offset : offset + out, :w]`` (the stream's output channels). n shares by depth: an n=2
  stream's first two 2D convs are an n=3 stream's first two.
- anything else (csn_ip, csn_ir, other kernel sizes, plugin families such as a ghost conv): its own
  module per distinct choice. In slots of several convs (UNet, ResNet) the backbone's norms between
  the convs are per choice too; the convs inside still share as above.

Sharing is exact: ``SuperNet.extract(config)`` builds the standalone network of ``config`` (at the
super-network's width) carrying exactly the inherited weights, and computes what the active
super-network computes. BatchNorm statistics are never shared: ``evaluate`` recomputes them for each
candidate (reset, cumulative average over the calibration patches, eval mode).

The score: the task's metrics (``task.metrics()``, e.g. ``dice_mean`` and per-class Dice) of
``task.predict`` over ``val_patches`` fixed input-sized patches drawn once (fixed seed) from the
validation data, centred on target voxels where the target is a volume. Segmentation predictions
and targets of all patches are pooled into one volume (concatenated along D), so a class absent
from one patch does not make that patch's score undefined; other tasks update per batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from psc_nas.arch import ArchConfig, BlockChoice, Slot
from psc_nas.device import CPU_LAYOUT, place, to_device
from psc_nas.evaluators.base import Evaluation, EvaluationFailed, Evaluator, EvaluatorSetup, Fidelity
from psc_nas.files import write_bytes_atomic
from psc_nas.nets import get_backbone
from psc_nas.nets.budget import with_width
from psc_nas.nets.build import build_with_fill
from psc_nas.ops import INPUT, ConvGraph, Op, realize, rescale
from psc_nas.ops.fast import conv as fast_conv
from psc_nas.space import SearchSpace, replay_all
from psc_nas.tasks import Batch, Task
from psc_nas.train import TrainingFailed, _quiet, optimizer_and_schedule

log = logging.getLogger(__name__)

CUBE = (3, 3, 3)
SHARED_FAMILIES = ("conv3d", "cakes", "pmscn", "p3d")


# ---------------------------------------------------------------------- sharing plans
@dataclass(frozen=True)
class NodeSlice:
    """Where one conv of an op takes its weight: ``bank[out, inp, centred kernel]``."""

    bank: str
    out: tuple[int, int]
    inp: tuple[int, int]
    kernel: tuple[int, int, int]


def share_plan(spec: Op, graph: ConvGraph | None = None) -> list[NodeSlice] | None:
    """Per node of ``spec``'s conv graph, the slice of a shared bank it uses; None: not shared."""
    family = getattr(spec, "family", None)
    if family not in SHARED_FAMILIES:
        return None
    graph = graph or spec.graph()
    for node in graph.nodes:
        conv = node.conv
        if conv.groups != 1 or conv.bias or any(k not in (1, 3) for k in conv.kernel):
            return None
    offsets, start = {}, 0
    for index in graph.outputs:
        offsets[index] = start
        start += graph.nodes[index].conv.out_channels
    plan: list[NodeSlice] = []
    if family in ("conv3d", "cakes"):
        for index, node in enumerate(graph.nodes):
            if node.source != INPUT or node.relu or index not in offsets:
                return None
            conv = node.conv
            plan.append(
                NodeSlice(
                    "cube", (offsets[index], offsets[index] + conv.out_channels), (0, conv.in_channels), conv.kernel
                )
            )
        return plan
    # pmscn / p3d: streams of 2D convs then one 1D conv; roles by the stream's plane orientation
    depth: list[int] = []
    orientation: list[str] = []
    for index, node in enumerate(graph.nodes):
        conv = node.conv
        if node.source == INPUT:
            depth.append(0)
            orientation.append("x".join(map(str, conv.kernel)))
        else:
            depth.append(depth[node.source] + 1)
            orientation.append(orientation[node.source])
        role = orientation[index].replace("x", "")
        if index in offsets:  # the stream's 1D conv
            out = (offsets[index], offsets[index] + conv.out_channels)
            plan.append(NodeSlice(f"line{role}", out, (0, conv.in_channels), conv.kernel))
        else:
            plan.append(
                NodeSlice(f"plane{role}d{depth[index]}", (0, conv.out_channels), (0, conv.in_channels), conv.kernel)
            )
    return plan


def centred(kernel: Sequence[int], bank_kernel: Sequence[int]) -> tuple[slice, slice, slice]:
    return tuple(slice((b - k) // 2, (b - k) // 2 + k) for k, b in zip(kernel, bank_kernel))  # type: ignore[return-value]


class SharedOp(nn.Module):
    """An op whose convs are slices of its slot's kernel banks; holds no parameters of its own."""

    def __init__(self, spec: Op, graph: ConvGraph, plan: list[NodeSlice], owner: SwitchSlot, prefix: str) -> None:
        super().__init__()
        self.spec = spec
        self.graph = graph
        self.plan = [NodeSlice(f"{prefix}{s.bank}", s.out, s.inp, s.kernel) for s in plan]
        self._owner = (owner,)  # a tuple: not registered as a submodule (the banks belong to the slot)
        # CAKES / conv3d: every node reads the input, so one conv on the masked cube computes them all
        # (the zero taps change nothing); the gradient of a masked-out tap is zero.
        self.merged = (
            len(plan) > 1
            and all(n.source == INPUT and not n.relu for n in self.graph.nodes)
            and all(s.bank == "cube" for s in plan)
            and plan[-1].out[1] == sum(s.out[1] - s.out[0] for s in plan)
        )
        if self.merged:
            mask = torch.zeros(plan[-1].out[1], 1, *CUBE)
            for piece in plan:
                mask[(slice(*piece.out), slice(None), *centred(piece.kernel, CUBE))] = 1
            self.register_buffer("mask", mask, persistent=False)

    def weight(self, index: int) -> torch.Tensor:
        piece = self.plan[index]
        bank = self._owner[0].banks[piece.bank]
        return bank[(slice(*piece.out), slice(*piece.inp), *centred(piece.kernel, bank.shape[2:]))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu = x.device.type == "cpu"
        if cpu:
            x = x.contiguous(memory_format=CPU_LAYOUT)
        if self.merged:
            first = self.plan[0]
            bank = self._owner[0].banks[first.bank]
            weight = bank[: self.plan[-1].out[1], first.inp[0] : first.inp[1]] * self.mask
            return fast_conv(x, weight, None, self.graph.nodes[0].conv.stride, (1, 1, 1), 1, False)
        values: list[torch.Tensor] = []
        for index, node in enumerate(self.graph.nodes):
            source = x if node.source == INPUT else values[node.source]
            if node.relu:
                source = F.relu(source)
            values.append(fast_conv(source, self.weight(index), None, node.conv.stride, node.conv.padding, 1, False))
        outputs = [values[index] for index in self.graph.outputs]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def standalone_state(self) -> dict[str, torch.Tensor]:
        """This op's weights as the standalone op module (``GraphConv``) names them."""
        return {f"convs.{index}.weight": self.weight(index).detach().clone() for index in range(len(self.plan))}

    def extra_repr(self) -> str:
        return f"{self.spec}, shared"


class SharedSpec:
    """Stands in for an op spec when the backbone builds a slot: same channels, builds a ``SharedOp``."""

    def __init__(self, spec: Op, graph: ConvGraph, plan: list[NodeSlice], owner: SwitchSlot, prefix: str) -> None:
        self.spec, self.graph, self.plan, self.owner, self.prefix = spec, graph, plan, owner, prefix
        self.in_channels, self.out_channels, self.stride = spec.in_channels, spec.out_channels, spec.stride

    def build(self, impl: str | None = None) -> SharedOp:
        return SharedOp(self.spec, self.graph, self.plan, self.owner, self.prefix)


# ---------------------------------------------------------------------- the switchable slot
class SwitchSlot(nn.Module):
    """Every choice of one slot; ``active`` (a choice) says which one ``forward`` runs.

    Shared choices are the backbone's own slot module built from ``SharedSpec``s (parameter-free
    views of ``banks``); the others are the backbone's module of the choice, one per choice.
    """

    def __init__(
        self, slot: Slot, choices: Sequence[tuple[BlockChoice, list[Op]]], build: Callable[[Sequence[Op]], nn.Module]
    ) -> None:
        super().__init__()
        self.slot = slot
        self.choices = [choice for choice, _ in choices]  # distinct (``slot_choices``)
        self.keys = {repr(specs): str(index) for index, (_, specs) in enumerate(choices)}
        graphs = [[spec.graph() for spec in specs] for _, specs in choices]
        plans = [
            [share_plan(spec, graph) for spec, graph in zip(specs, specs_graphs)]
            for (_, specs), specs_graphs in zip(choices, graphs)
        ]
        extents: dict[str, list[int]] = {}  # bank -> [out, in, kd, kh, kw] maxima
        for choice_plans in plans:
            if all(plan is not None for plan in choice_plans):
                for position, plan in enumerate(choice_plans):
                    for piece in plan:  # type: ignore[union-attr]
                        size = [piece.out[1], piece.inp[1], *piece.kernel]
                        known = extents.setdefault(f"p{position}{piece.bank}", size)
                        extents[f"p{position}{piece.bank}"] = [max(a, b) for a, b in zip(known, size)]
        self.banks = nn.ParameterDict()
        for name, size in extents.items():
            if name.endswith("cube"):
                size[2:] = CUBE
            weight = torch.empty(size)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # what nn.Conv3d does for its weight
            self.banks[name] = nn.Parameter(weight)
        self.candidates = nn.ModuleDict()
        self.shared = 0
        for index, ((_choice, specs), choice_graphs, choice_plans) in enumerate(zip(choices, graphs, plans)):
            if all(plan is not None for plan in choice_plans):
                proxies = [
                    SharedSpec(spec, graph, plan, self, f"p{position}")  # type: ignore[arg-type]
                    for position, (spec, graph, plan) in enumerate(zip(specs, choice_graphs, choice_plans))
                ]
                self.candidates[str(index)] = build(proxies)  # type: ignore[arg-type]
                self.shared += 1
            else:
                self.candidates[str(index)] = build(specs)
        self.active = "0"

    def key(self, choice: BlockChoice) -> str:
        """The candidate of ``choice``: choices are told apart by the ops they realize (so ``conv3d`` and
        ``conv3d(kernel_size=3)`` are one candidate)."""
        try:
            key = self.keys.get(repr(realize(self.slot, choice)))
        except ValueError:
            key = None
        if key is None:
            raise ValueError(
                f"slot {self.slot.name}: {choice.op} {choice.to_dict()} is not a choice of the super-network's space"
            )
        return key

    def activate(self, choice: BlockChoice) -> None:
        self.active = self.key(choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.candidates[self.active](x)

    def standalone_state(self, choice: BlockChoice) -> dict[str, torch.Tensor]:
        """The weights of the standalone slot module of ``choice``, named as the backbone builds it."""
        content = self.candidates[self.key(choice)]
        state = {name: value.detach().clone() for name, value in content.state_dict().items()}
        for name, module in content.named_modules():
            if isinstance(module, SharedOp):
                state.update(
                    {f"{name}.{key}" if name else key: value for key, value in module.standalone_state().items()}
                )
        return state

    def extra_repr(self) -> str:
        return f"{self.slot.name}: {len(self.choices)} choices, {self.shared} shared, active {self.active}"


# ---------------------------------------------------------------------- the super-network
def slot_choices(space: SearchSpace, slots: Sequence[Slot]) -> list[list[tuple[BlockChoice, list[Op]]]]:
    """Every distinct choice (by the ops it realizes) each slot of ``space`` can take, with its ops, rescaled to
    ``slots`` (the space's slots at another width) as ``with_width`` rescales a config; choices a narrow slot
    cannot take are left out."""
    found: list[dict[str, tuple[BlockChoice, list[Op]]]] = [{} for _ in space.slots]
    for unit in space.units:
        for domain in unit.domains.values():
            decisions = replay_all(lambda ask, d=domain: d.decide(lambda p: ask(p, d.params[p])))
            for decision in decisions:
                for index in unit.slots:
                    choice = rescale(domain.resolve(decision, space.slots[index]), space.slots[index], slots[index])
                    try:
                        specs = realize(slots[index], choice)
                    except ValueError:
                        continue
                    found[index].setdefault(repr(specs), (choice, specs))
    return [list(choices.values()) for choices in found]


class SuperNet(nn.Module):
    """Every architecture of ``space`` at ``width`` × the space's width, in one network."""

    def __init__(self, space: SearchSpace, *, width: float = 1.0) -> None:
        super().__init__()
        self.space = space
        self.width = float(space.hparams.get("width", 1.0)) * width
        backbone = get_backbone(space.backbone)
        first = space.decide(lambda name, choices: choices[0])
        self.base = self.narrow(first)
        self.slots = backbone.slots(self.base.hparams)
        choices = slot_choices(space, self.slots)
        self.switches: list[SwitchSlot] = [None] * len(self.slots)  # type: ignore[list-item]

        def fill(index: int, specs: Sequence[Op], build: Callable[[Sequence[Op]], nn.Module]) -> nn.Module:
            switch = SwitchSlot(self.slots[index], choices[index], build)
            self.switches[index] = switch
            return switch

        self.net = build_with_fill(self.base, fill)
        if any(switch is None for switch in self.switches):
            raise ValueError(f"backbone {space.backbone} did not place every slot through its fill hook")
        self.active: ArchConfig = self.base

    def narrow(self, config: ArchConfig) -> ArchConfig:
        """``config`` at the super-network's width (what it actually runs)."""
        return config if config.hparams.get("width") == self.width else with_width(config, self.width)

    def activate(self, config: ArchConfig) -> ArchConfig:
        narrow = self.narrow(config)
        if len(narrow.blocks) != len(self.switches):
            raise ValueError(f"the config has {len(narrow.blocks)} blocks, the super-network {len(self.switches)}")
        for switch, choice in zip(self.switches, narrow.blocks):
            switch.activate(choice)
        self.active = config
        return narrow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def extract(self, config: ArchConfig) -> nn.Module:
        """The standalone network of ``config`` at the super-network's width, with the inherited weights."""
        narrow = self.narrow(config)
        placed: dict[int, nn.Module] = {}

        def record(index: int, specs: Sequence[Op], build: Callable[[Sequence[Op]], nn.Module]) -> nn.Module:
            placed[index] = build(specs)
            return placed[index]

        standalone = get_backbone(narrow.backbone).build(narrow, fill=record)
        inside = {id(switch): name for name, switch in self.net.named_modules() if isinstance(switch, SwitchSlot)}
        state = {
            key: value
            for key, value in self.net.state_dict().items()
            if not any(key.startswith(f"{prefix}.") for prefix in inside.values())
        }
        names = {id(module): name for name, module in standalone.named_modules()}
        for index, module in placed.items():
            prefix = names[id(module)]
            state.update(
                {
                    f"{prefix}.{key}": value
                    for key, value in self.switches[index].standalone_state(narrow.blocks[index]).items()
                }
            )
        standalone.load_state_dict(state, strict=True)
        return standalone

    def sampler(
        self, seed: int, admissible: Callable[[ArchConfig], bool] | None = None, tries: int = 100
    ) -> Callable[[], ArchConfig]:
        """Random architectures of the space: uniform over each unit's answers (its op, then each of the op's
        arguments), redrawn until ``admissible`` (the run's budget) accepts one, at most ``tries`` times."""
        rng = random.Random(seed)

        def draw() -> ArchConfig:
            for _ in range(tries):
                config = self.space.decide(lambda name, choices: rng.choice(choices))
                if admissible is None or admissible(config):
                    return config
            log.warning("no admissible architecture in %d draws; training on an inadmissible one", tries)
            return config

        return draw


def recalibrate(net: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Reset every BatchNorm and re-estimate its statistics (cumulative average) on ``batches``; eval mode after."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        for inputs in batches:
            net(inputs)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()


# ---------------------------------------------------------------------- fixed patches
def crop_patches(
    batches: Iterable[Batch], input_key: str, size: Sequence[int], count: int, seed: int
) -> list[dict[str, Any]]:
    """``count`` samples of ``size`` (D, H, W) from ``batches``, drawn with ``seed``, volumes taken in turn.

    A sample larger than ``size`` gives patches centred on a random non-zero voxel of its target (the first
    other tensor of the same spatial size), or anywhere when it has none; tensors of that spatial size are
    cropped alike, others kept. Samples of the input size are taken whole.
    """
    generator = torch.Generator().manual_seed(seed)
    samples: list[dict[str, Any]] = []
    for batch in batches:
        for row in range(batch[input_key].shape[0]):
            samples.append({key: value[row] for key, value in batch.items() if isinstance(value, torch.Tensor)})
    if not samples:
        raise EvaluationFailed("the task's validation data is empty")
    size = tuple(int(s) for s in size)
    whole = all(tuple(s[input_key].shape[1:]) == size for s in samples)
    if whole:
        return samples[:count]
    patches = []
    for number in range(count):
        sample = samples[number % len(samples)]
        spatial = tuple(sample[input_key].shape[1:])
        same = [key for key, value in sample.items() if value.dim() == 4 and tuple(value.shape[1:]) == spatial]
        target = next((sample[key] for key in same if key != input_key), None)
        where = (target[0] != 0).nonzero() if target is not None else torch.empty(0, 3)
        if len(where):
            centre = where[int(torch.randint(len(where), (1,), generator=generator))].tolist()
        else:
            centre = [int(torch.randint(s, (1,), generator=generator)) for s in spatial]
        box = []
        for c, s, p in zip(centre, spatial, size):
            start = min(max(0, c - p // 2), max(0, s - p))
            box.append(slice(start, start + p))
        patch = {key: (value[(slice(None), *box)] if key in same else value) for key, value in sample.items()}
        shortfall = [p - (b.stop - b.start if b.stop <= s else s - b.start) for b, s, p in zip(box, spatial, size)]
        if any(shortfall):  # a volume smaller than a patch: zero-pad (background), like the training loader
            pad = [w for gap in reversed(shortfall) for w in (0, max(0, gap))]
            patch = {key: (F.pad(value, pad) if key in same else value) for key, value in patch.items()}
        patches.append(patch)
    return patches


def stack(samples: Sequence[Mapping[str, torch.Tensor]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {key: torch.stack([s[key] for s in samples[i : i + batch_size]]) for key in samples[0]}
        for i in range(0, len(samples), batch_size)
    ]


# ---------------------------------------------------------------------- training (SPOS, Lightning)
def random_crop(batch: Batch, input_key: str, side: int, generator: torch.Generator) -> dict[str, Any]:
    """One random ``side``³ box of every tensor of the input's spatial size (others kept as they are)."""
    spatial = tuple(batch[input_key].shape[2:])
    if all(s <= side for s in spatial):
        return dict(batch)
    box = [
        slice(start, start + min(side, s))
        for s in spatial
        for start in [int(torch.randint(s - min(side, s) + 1, (1,), generator=generator))]
    ]
    return {
        key: (
            value[(slice(None), slice(None), *box)]
            if isinstance(value, torch.Tensor) and value.dim() == 5 and tuple(value.shape[2:]) == spatial
            else value
        )
        for key, value in batch.items()
    }


class SposModule(L.LightningModule):
    """One optimizer step per sampled architecture: single-path one-shot training of the super-network."""

    def __init__(
        self,
        supernet: SuperNet,
        task: Task,
        draw: Callable[[], ArchConfig],
        *,
        lr: float,
        weight_decay: float,
        steps: int,
        crop: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.supernet, self.task, self.draw = supernet, task, draw
        self.loss_fn = task.loss()
        self.lr, self.weight_decay, self.steps = lr, weight_decay, steps
        self.crop = crop
        self.generator = torch.Generator().manual_seed(seed)
        self.losses: list[float] = []

    def on_fit_start(self) -> None:  # on its device now; on the CPU, weights in channels_last_3d (device.place)
        place(self.supernet, self.device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.crop:
            batch = random_crop(batch, self.task.input_key, self.crop, self.generator)
        self.supernet.activate(self.draw())
        loss = self.loss_fn(self.supernet(batch[self.task.input_key]), batch)
        if not torch.isfinite(loss):
            raise TrainingFailed(f"super-network loss became {loss.item()} at step {self.global_step}")
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        return optimizer_and_schedule(
            self.supernet.parameters(),
            lr=self.lr,
            weight_decay=self.weight_decay,
            schedule="onecycle",
            total_steps=self.steps,
        )


# ---------------------------------------------------------------------- the evaluator
DEFAULTS: dict[str, Any] = {
    "width": 0.25,  # channel multiplier of the super-network (and so of every sub-network it scores)
    "steps": "auto",  # SPOS steps; auto: what train_share of the search's time allows (default_steps without one)
    "default_steps": 400,
    "train_share": 0.4,  # of the search's seconds, for training the super-network when steps is auto
    "max_steps": 3000,
    "min_steps": 20,
    "batch_size": None,  # default: the run profile's data batch_size, else 4
    "train_size": None,  # train on random crops of this side (e.g. 16) of the task's patches: fewer voxels per step
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "calib_patches": 4,  # training patches that re-estimate BatchNorm statistics per candidate
    "val_patches": 8,  # validation patches every candidate is scored on
}


def parse_options(given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"supernet: unknown option {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    options = {**DEFAULTS, **given}
    for key in ("width", "train_share", "lr", "weight_decay"):
        try:
            options[key] = float(options[key])
        except (TypeError, ValueError):
            raise ValueError(f"supernet: option {key} must be a number, got {options[key]!r}") from None
        if not options[key] >= 0 or (key != "weight_decay" and options[key] == 0):
            raise ValueError(f"supernet: option {key} must be positive, got {options[key]!r}")
    for key in (
        "default_steps",
        "max_steps",
        "min_steps",
        "calib_patches",
        "val_patches",
        "batch_size",
        "steps",
        "train_size",
    ):
        value = options[key]
        if value is None or (key == "steps" and value == "auto"):
            continue
        try:
            options[key] = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"supernet: option {key} must be a positive int, got {value!r}") from None
        if options[key] < 1:
            raise ValueError(f"supernet: option {key} must be a positive int, got {value!r}")
    return options


def supernet_key(
    space: SearchSpace, task: Task, options: Mapping[str, Any], seed: int, data_options: Mapping[str, Any]
) -> str:
    """What a trained super-network depends on, hashed: a resumed search with the same settings reuses it."""
    described = json.dumps(
        {
            "space": [
                space.name,
                space.backbone,
                sorted((k, repr(v)) for k, v in space.hparams.items()),
                [repr(unit) for unit in space.units],
            ],
            "task": task.name,
            "options": sorted((k, repr(v)) for k, v in options.items()),
            "seed": seed,
            "data": sorted((k, repr(v)) for k, v in data_options.items()),
        }
    )
    return hashlib.sha256(described.encode()).hexdigest()[:12]


class SupernetEvaluator(Evaluator):
    name = "supernet"

    def __init__(self, setup: EvaluatorSetup) -> None:
        if setup.space is None:
            raise ValueError("the supernet evaluator needs the search space (EvaluatorSetup.space)")
        self.setup = setup
        self.task: Task = setup.task
        self.options = parse_options(setup.options)
        self.batch_size = self.options["batch_size"] or int(setup.data_options.get("batch_size", 4))
        self.supernet: SuperNet | None = None
        self.steps: int | None = None
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0
        self.path: Path | None = None
        self._calibration: list[torch.Tensor] = []
        self._validation: list[dict[str, torch.Tensor]] = []

    # ------------------------------------------------------------------ fidelity
    def fidelity(self) -> Fidelity:
        steps = f", {self.steps} steps" if self.steps is not None else ""
        crop = f" of {self.options['train_size']}³ crops" if self.options["train_size"] and steps else ""
        return Fidelity(1, f"supernet, width {self.options['width']:g}{steps}{crop}")

    def levels(self) -> tuple[Fidelity, ...]:
        return (self.fidelity(),)

    # ------------------------------------------------------------------ data
    def _datamodule(self, seed: int, samples: int) -> Any:
        options = {**self.setup.data_options, "samples_per_epoch": samples, "batch_size": self.batch_size}
        datamodule = self.task.datamodule(data_dir=self.setup.data_dir, seed=seed, **options)
        datamodule.setup("fit")
        return datamodule

    def _fixed_patches(self) -> None:
        seed = self.setup.seed + 10_007  # not the training patches' seed
        datamodule = self._datamodule(seed, self.options["calib_patches"])
        key = self.task.input_key
        self._calibration = [batch[key] for batch in datamodule.train_dataloader()]
        patches = crop_patches(
            datamodule.val_dataloader(), key, self.task.input_shape[1:], self.options["val_patches"], seed
        )
        self._validation = stack(patches, self.batch_size)

    # ------------------------------------------------------------------ training
    def prepare(self, work_dir: Path, *, seconds_left: float | None) -> None:
        started = time.perf_counter()
        space = self.setup.space
        key = supernet_key(space, self.task, self.options, self.setup.seed, self.setup.data_options)
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        self.path = work_dir / f"supernet-{key}.pt"
        self._fixed_patches()
        torch.manual_seed(self.setup.seed)  # initial weights from the seed, whatever ran before
        self.supernet = SuperNet(space, width=self.options["width"])
        if self.path.is_file():
            self.load(self.path)
            log.info("super-network %s reused (%d steps)", self.path, self.steps)
            return
        draw = self.supernet.sampler(self.setup.seed, self.setup.admissible)
        steps = self.options["steps"]
        if steps == "auto":
            steps = self._auto_steps(draw, seconds_left, time.perf_counter() - started)
        self.steps = steps
        self.train(steps, draw)
        self.save(self.path)
        log.info(
            "super-network trained: %d steps in %.0f s, loss %.3f -> %.3f",
            steps,
            self.train_seconds,
            _mean(self.losses[:20]),
            _mean(self.losses[-20:]),
        )

    def _auto_steps(self, draw: Callable[[], ArchConfig], seconds_left: float | None, spent: float) -> int:
        options = self.options
        if seconds_left is None:
            return options["default_steps"]
        per_step = self.time_step(draw)
        allowed = options["train_share"] * seconds_left - spent
        return int(min(options["max_steps"], max(options["min_steps"], allowed / per_step)))

    def time_step(self, draw: Callable[[], ArchConfig], repeats: int = 3) -> float:
        """Median seconds of one training forward + backward of a sampled sub-network (no update), on a
        batch of the training batch's size made of validation patches (only the time is kept)."""
        assert self.supernet is not None
        loss_fn = self.task.loss()
        first = self._validation[0]
        rows = self.batch_size
        batch = {k: torch.cat([v] * math.ceil(rows / v.shape[0]))[:rows] for k, v in first.items()}
        if self.options["train_size"]:
            batch = random_crop(batch, self.task.input_key, self.options["train_size"], torch.Generator())
        seconds = []
        self.supernet.train()
        for _ in range(repeats):
            self.supernet.activate(draw())
            start = time.perf_counter()
            loss_fn(self.supernet(batch[self.task.input_key]), batch).backward()
            seconds.append(time.perf_counter() - start)
        self.supernet.zero_grad(set_to_none=True)
        return sorted(seconds)[len(seconds) // 2]

    def train(self, steps: int, draw: Callable[[], ArchConfig]) -> None:
        assert self.supernet is not None
        started, cpu = time.perf_counter(), time.process_time()
        L.seed_everything(self.setup.seed, workers=True, verbose=False)
        module = SposModule(
            self.supernet,
            self.task,
            draw,
            lr=self.options["lr"],
            weight_decay=self.options["weight_decay"],
            steps=steps,
            crop=self.options["train_size"],
            seed=self.setup.seed,
        )
        datamodule = self._datamodule(self.setup.seed, min(steps, 256) * self.batch_size)
        with _quiet():
            trainer = L.Trainer(
                accelerator="auto",
                devices=1,
                max_steps=steps,
                max_epochs=-1,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                deterministic="warn",
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            try:
                trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
            except TrainingFailed as error:
                raise EvaluationFailed(f"super-network training failed: {error}") from error
        self.losses = module.losses
        self.train_seconds = time.perf_counter() - started
        self.train_cpu_seconds = time.process_time() - cpu  # this process's CPU: what the step costs, load aside

    # ------------------------------------------------------------------ storage
    def save(self, path: Path) -> None:
        assert self.supernet is not None
        buffer = io.BytesIO()
        torch.save(
            {
                "state_dict": self.supernet.state_dict(),
                "steps": self.steps,
                "losses": self.losses,
                "train_seconds": self.train_seconds,
                "train_cpu_seconds": self.train_cpu_seconds,
                "options": dict(self.options),
            },
            buffer,
        )
        write_bytes_atomic(Path(path), buffer.getvalue())

    def load(self, path: Path) -> None:
        assert self.supernet is not None
        saved = torch.load(path, map_location="cpu", weights_only=False)
        self.supernet.load_state_dict(saved["state_dict"], strict=True)
        self.steps, self.losses, self.train_seconds = saved["steps"], saved["losses"], saved["train_seconds"]
        self.train_cpu_seconds = saved.get("train_cpu_seconds", 0.0)

    # ------------------------------------------------------------------ scoring
    def evaluate(self, config: ArchConfig, fidelity: Fidelity, *, seconds_left: float | None) -> Evaluation:
        if self.supernet is None:
            raise EvaluationFailed("the super-network is not prepared (call prepare first)")
        started = time.perf_counter()
        try:
            self.supernet.activate(config)
        except ValueError as error:
            raise EvaluationFailed(str(error)) from error
        device = next(self.supernet.parameters()).device
        recalibrate(self.supernet, [inputs.to(device) for inputs in self._calibration])
        forward_started = time.perf_counter()
        metrics = self.task.metrics()
        metrics.reset()
        with torch.no_grad():
            predictions = [
                self.task.predict(self.supernet, to_device(batch, device)).cpu() for batch in self._validation
            ]
            pooled = pool_volumes(predictions, self._validation, self.task.input_key)
            for prediction, batch in pooled or zip(predictions, self._validation):
                metrics.update(prediction, batch)
        scores = {name: float(value) for name, value in metrics.compute().items()}
        if not math.isfinite(scores.get(self.task.metric, math.nan)):
            raise EvaluationFailed(f"the super-network's {self.task.metric} is {scores.get(self.task.metric)}")
        now = time.perf_counter()
        return Evaluation(self.name, self.fidelity(), scores, wall_s=now - started, val_forward_s=now - forward_started)


def pool_volumes(
    predictions: Sequence[torch.Tensor], batches: Sequence[Mapping[str, torch.Tensor]], input_key: str
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]] | None:
    """Voxel predictions and targets of every patch as one volume (concatenated along D); None when the
    prediction or a target is not a volume of the patches' size (a classifier's, say)."""
    spatial = tuple(batches[0][input_key].shape[2:])
    if any(p.dim() != 5 or tuple(p.shape[2:]) != spatial for p in predictions):
        return None
    keys = [key for key in batches[0] if key != input_key]
    if not all(batches[0][key].dim() == 5 and tuple(batches[0][key].shape[2:]) == spatial for key in keys):
        return None

    def joined(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([row for tensor in tensors for row in tensor], dim=1)[None]

    batch = {key: joined([b[key] for b in batches]) for key in keys}
    return [(joined(predictions), batch)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def score_panel(
    space: SearchSpace | str,
    task: Task | str,
    configs: Sequence[ArchConfig],
    *,
    seed: int = 0,
    steps: int | str = "auto",
    width: float = 0.25,
    work_dir: str | Path,
    seconds: float | None = None,
    data_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, dict[str, float]]:
    """Train (or reuse) one super-network and score ``configs`` with it: ``{config.hash: metrics}``, each
    metrics dict with ``wall_s`` added. For the fidelity benchmark."""
    from psc_nas.tasks import get_task

    task = get_task(task) if isinstance(task, str) else task
    space = SearchSpace.load(space) if isinstance(space, str) else space
    evaluator = SupernetEvaluator(
        EvaluatorSetup(
            task,
            seed=seed,
            space=space,
            data_options=dict(data_options or {}),
            options={"steps": steps, "width": width, **options},
        )
    )
    evaluator.prepare(Path(work_dir), seconds_left=seconds)
    scored = {}
    for config in configs:
        result = evaluator.evaluate(config, evaluator.levels()[-1], seconds_left=None)
        scored[config.hash] = {**result.metrics, "wall_s": result.wall_s}
    return scored

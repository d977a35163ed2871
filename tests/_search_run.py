"""A small but real search run for the dashboard and export tests.

An Optuna SQLite study written to the schema of docs/architecture.md, the way psc-search writes
it: real ArchConfigs (the papers' presets and mixed per-block choices on a small DenseNet3D), their
exact analytic cost and budget constraint, and metric values chosen here (no training), plus the
trial states a real search leaves behind: finished, over budget (never trained), failed, running.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import optuna
from optuna.trial import TrialState

import psc_nas
from psc_nas.arch import ArchConfig, BlockChoice
from psc_nas.nets import get_backbone
from psc_nas.ops.cakes import SHAPES
from psc_nas.presets import PRESETS, preset_config

SPATIAL = (32, 32, 32)  # the ibsr task's input size, at which the study's costs are priced
HPARAMS = {"init_channels": 8, "growth_rate": 6, "side_channels": 4, "num_blocks": 2, "layers_per_block": 2}
OBJECTIVES = [{"name": "dice_mean", "direction": "maximize"}, {"name": "params", "direction": "minimize"}]
MIXED_CHOICES = [PRESETS[name] for name in ("conv3d", "p1sc1", "p2sc2", "csn_ip", "cakes_uniform")] + [
    BlockChoice("pmscn", {"m": 3, "n": 1, "orientations": ["1x3x3", "3x1x3", "3x3x1"]}),
]


def _random_cakes(rng: random.Random, channels: int) -> BlockChoice:
    """A searched-looking CAKES allocation: channels dealt to a random subset of the shapes."""
    shapes = rng.sample(SHAPES, rng.randint(2, 4))
    allocation = {shape: 0 for shape in shapes}
    for _ in range(channels):
        allocation[rng.choice(shapes)] += 1
    return BlockChoice("cakes", {"allocation": allocation})


def _dice(params: int, rng: random.Random) -> float:
    # Made up but plausible: more parameters help, with diminishing returns and noise.
    return round(0.55 + 0.05 * math.log10(params) + rng.uniform(-0.03, 0.03), 4)


class _Recorder:
    """Writes trials as ``psc-search`` does: ask, record the priced config and its budget
    constraint, then tell the values (or FAIL, or nothing for a trial still running)."""

    def __init__(self, study: optuna.Study, budget: int, rng: random.Random) -> None:
        self.study, self.budget, self.rng = study, budget, rng

    def start(self, config: ArchConfig, preset: str | None = None) -> optuna.Trial:
        cost = psc_nas.cost(config, SPATIAL)
        trial = self.study.ask()
        for key, value in {"arch": config.to_dict(), "arch_hash": config.hash, "params": cost.params,
                           "macs": cost.macs, "preset": preset}.items():
            trial.set_user_attr(key, value)
        trial.set_constraint("params", cost.params - self.budget)
        return trial

    def finish(self, config: ArchConfig, preset: str | None = None) -> None:
        trial = self.start(config, preset)
        params = trial.user_attrs["params"]
        if params > self.budget:  # never trained; Optuna needs values on a COMPLETE trial
            trial.set_user_attr("fidelity", 0)
            self.study.tell(trial, [0.0, params])
            return
        dice = _dice(params, self.rng)
        trial.set_user_attr("fidelity", 3)
        trial.set_user_attr("metrics", {"dice_mean": dice, "dice_gm": dice - 0.02, "dice_wm": dice + 0.02})
        trial.set_user_attr("curve", [{"epoch": e, "train_loss": 1.2 / (e + 1), "dice_mean": dice * (e + 1) / 3}
                                      for e in range(3)])
        self.study.tell(trial, [dice, params])

    def fail(self, config: ArchConfig, reason: str) -> None:
        trial = self.start(config)
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("metrics", {"dice_mean": math.nan})  # what a diverged run leaves behind
        trial.set_user_attr("curve", [{"epoch": 0, "train_loss": 2.1, "dice_mean": 0.3},
                                      {"epoch": 1, "train_loss": math.inf, "dice_mean": math.nan}])
        self.study.tell(trial, state=TrialState.FAIL)


def make_run(root: Path, name: str = "demo", *, mixed: int = 8, seed: int = 0, hparams: dict = HPARAMS) -> Path:
    """Create ``root/name/study.db`` on DenseNet3D; the conv3d preset is over the run's parameter budget."""
    rng = random.Random(seed)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}",
                                directions=[o["direction"] for o in OBJECTIVES])
    presets = {p: preset_config(p, "densenet3d", **hparams) for p in ("conv3d", "p1sc1", "p2sc2", "csn_ip", "cakes_uniform")}
    budget = psc_nas.cost(presets["conv3d"], SPATIAL).params - 1
    for key, value in {"task": "ibsr", "space": "ibsr_densenet3d", "budget_params": budget, "budget_macs": None,
                       "objectives": OBJECTIVES}.items():
        study.set_user_attr(key, value)

    recorder = _Recorder(study, budget, rng)
    for preset, config in presets.items():
        recorder.finish(config, preset)
    base = presets["conv3d"]
    growth = get_backbone("densenet3d").slots(base.hparams)[0].out_channels
    for _ in range(mixed):
        choices = [*MIXED_CHOICES, _random_cakes(rng, growth)]
        recorder.finish(base.with_blocks([rng.choice(choices) for _ in base.blocks]))
    recorder.fail(base.with_blocks([PRESETS["csn_ir"]] * len(base.blocks)), "at 3 epochs: non-finite loss")
    recorder.start(base.with_blocks([PRESETS["p1sc1"]] * len(base.blocks)))  # still running
    return run_dir

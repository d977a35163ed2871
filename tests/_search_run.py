"""A small but real search run for the dashboard and export tests.

An Optuna SQLite study written through psc_nas.search.record, the way psc-search writes it: real
ArchConfigs (the papers' presets and mixed per-block choices on a small DenseNet3D), their
exact analytic cost and budget constraint, and metric values chosen here (no training), plus the
trial states a real search leaves behind: finished, over budget (never trained), failed, running.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import optuna

import psc_nas
from psc_nas.arch import ArchConfig, BlockChoice
from psc_nas.evaluators import Evaluation, Fidelity
from psc_nas.nets import get_backbone
from psc_nas.ops.cakes import SHAPES
from psc_nas.presets import PRESETS, preset_config
from psc_nas.search.budget import Budget
from psc_nas.search.record import (
    Objective,
    StudyRecord,
    TrialRecord,
    set_violations,
    tell_evaluated,
    tell_failed,
    tell_over_budget,
)

SPATIAL = (32, 32, 32)  # the ibsr task's input size, at which the study's costs are priced
HPARAMS = {"init_channels": 8, "growth_rate": 6, "side_channels": 4, "num_blocks": 2, "layers_per_block": 2}
OBJECTIVES = (Objective("dice_mean", maximize=True), Objective("params", maximize=False))
FIDELITY = Fidelity(3, "3 epochs × 8 samples")
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
    constraint, then tell the values (or PRUNED over budget, or FAIL, or nothing for a trial still running)."""

    def __init__(self, study: optuna.Study, budget: Budget, rng: random.Random) -> None:
        self.study, self.budget, self.rng = study, budget, rng

    def start(self, config: ArchConfig, preset: str | None = None) -> tuple[optuna.Trial, TrialRecord]:
        price = psc_nas.cost(config, SPATIAL)
        trial = self.study.ask()
        record = TrialRecord(trial.number, preset=preset).priced(config, price)
        record.save(trial)
        set_violations(trial, self.budget.violations(price))
        return trial, record

    def finish(self, config: ArchConfig, preset: str | None = None) -> None:
        trial, record = self.start(config, preset)
        if not self.budget.fits(record.cost):  # never trained
            tell_over_budget(self.study, trial)
            return
        dice = _dice(record.params, self.rng)
        curve = [{"epoch": e, "train_loss": 1.2 / (e + 1), "dice_mean": dice * (e + 1) / 3} for e in range(3)]
        metrics = {"dice_mean": dice, "dice_gm": dice - 0.02, "dice_wm": dice + 0.02}
        record.with_evaluation(
            Evaluation("train", FIDELITY, metrics, curve, wall_s=3.0, evaluated_by=trial.number)
        ).save(trial)
        tell_evaluated(self.study, trial, [dice, record.params])

    def fail(self, config: ArchConfig, reason: str) -> None:
        trial, record = self.start(config)
        # what a diverged run leaves behind
        curve = [
            {"epoch": 0, "train_loss": 2.1, "dice_mean": 0.3},
            {"epoch": 1, "train_loss": math.inf, "dice_mean": math.nan},
        ]
        diverged = Evaluation("train", FIDELITY, {"dice_mean": math.nan}, curve, evaluated_by=trial.number)
        replace(record.with_evaluation(diverged), fail_reason=reason).save(trial)
        tell_failed(self.study, trial)


def make_run(root: Path, name: str = "demo", *, mixed: int = 8, seed: int = 0, hparams: dict = HPARAMS) -> Path:
    """Create ``root/name/study.db`` on DenseNet3D; the conv3d preset is over the run's parameter budget."""
    rng = random.Random(seed)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    study = optuna.create_study(
        study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}", directions=[o.direction for o in OBJECTIVES]
    )
    presets = {
        p: preset_config(p, "densenet3d", **hparams) for p in ("conv3d", "p1sc1", "p2sc2", "csn_ip", "cakes_uniform")
    }
    budget = Budget(params=psc_nas.cost(presets["conv3d"], SPATIAL).params - 1)
    StudyRecord("ibsr", "ibsr_densenet3d", budget, OBJECTIVES, "train").write(study)

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

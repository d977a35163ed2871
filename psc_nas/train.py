"""Train one architecture on one task: the LightningModule and ``fit()``.

``fit`` is the single training entry point: every search trial and every ``psc-train`` call goes
through it, so a number in a study and a number from ``psc-train`` mean the same thing.

    ArchConfig ─► build_model ─► TaskModule ─┐
    Task ─► loss(), datamodule(seed) ────────┴─► Trainer.fit ─► TrainResult
                                   │ training batch: Adam/AdamW on task.loss()(net(batch[input_key]), batch)
                                   │   at a constant rate, or a one-cycle schedule (warm-up, cosine decay)
                                   │ validation batch: task.metrics().update(task.predict(net, batch), batch)
                                   └─ per epoch: train_loss and the task's metrics

Nothing here knows what a task predicts: IBSR's patches and sliding-window Dice, a classifier's
clips and accuracy, or affinities scored on whole volumes all come from the task.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from psc_nas.arch import ArchConfig, as_config
from psc_nas.device import place
from psc_nas.nets import build_model, validated
from psc_nas.tasks import Batch, Task, get_task

DEFAULT_LR = 1e-3
CHECKPOINT_NAME = "best"
LR_SCHEDULES = ("constant", "onecycle")
WARMUP_SHARE = 0.05  # of all steps, for "onecycle"


class TrainingFailed(RuntimeError):
    """A run gave no usable result (non-finite loss, no finished epoch); the search stores the message."""


@dataclass
class TrainResult:
    metrics: dict[str, float]  # validation metrics after the last epoch
    best_metric: float  # best value of the task's metric over the epochs, in the metric's direction
    curve: list[dict[str, float]]  # one dict per epoch: epoch, train_loss, validation metrics, epoch_s
    wall_seconds: float
    fwd_bwd_seconds: float  # time inside training_step + backward, the share the architecture decides
    epochs: int
    checkpoint: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        return data


class TaskModule(L.LightningModule):
    """A network built from an ArchConfig, trained and validated the way its task says."""

    def __init__(
        self,
        config: ArchConfig,
        task: Task,
        *,
        lr: float = DEFAULT_LR,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")
        # The checkpoint carries the architecture, so export can rebuild the network from it alone.
        self.save_hyperparameters(
            {
                "arch": config.to_dict(),
                "task": task.name,
                "lr": lr,
                "weight_decay": weight_decay,
                "lr_schedule": lr_schedule,
            }
        )
        self.net = build_model(config)
        self.task = task
        self.loss_fn = task.loss()
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.val_metrics = task.metrics()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    # Lightning has put the module on its device by now; on the CPU the network's weights go channels_last_3d.
    def on_fit_start(self) -> None:
        place(self.net, self.device)

    def on_validation_start(self) -> None:
        place(self.net, self.device)

    def on_test_start(self) -> None:
        place(self.net, self.device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        inputs = batch[self.task.input_key]
        loss = self.loss_fn(self(inputs), batch)
        if not torch.isfinite(loss):
            raise TrainingFailed(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}"
            )
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=inputs.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_metrics.update(self.task.predict(self.net, batch), batch)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute())

    def on_test_epoch_start(self) -> None:
        self.val_metrics.reset()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_metrics.update(self.task.predict(self.net, batch), batch)

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test_{name}": value for name, value in self.val_metrics.compute().items()})

    def configure_optimizers(self) -> Any:
        return optimizer_and_schedule(
            self.parameters(),
            lr=self.lr,
            weight_decay=self.weight_decay,
            schedule=self.lr_schedule,
            total_steps=int(self.trainer.estimated_stepping_batches),
        )


def optimizer_class(weight_decay: float) -> type[torch.optim.Optimizer]:
    """The optimiser a training uses: AdamW with weight decay, else Adam."""
    return torch.optim.AdamW if weight_decay else torch.optim.Adam


def optimizer_and_schedule(params: Any, *, lr: float, weight_decay: float, schedule: str, total_steps: int) -> Any:
    """``optimizer_class(weight_decay)`` (Adam without weight decay, else AdamW) at ``lr``; "onecycle": linear warm-up
    over the first ``WARMUP_SHARE`` of the steps, then cosine decay to ~0 at the last step (stepped every batch), so a
    short run ends on settled weights instead of wherever a constant rate left them."""
    optimizer = optimizer_class(weight_decay)(params, lr=lr, weight_decay=weight_decay)  # Adam's default decay is 0
    if schedule == "constant":
        return optimizer
    total_steps = max(total_steps, 4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(  # at least 2 warm-up steps (OneCycleLR divides by them)
        optimizer,
        max_lr=lr,
        total_steps=total_steps,
        pct_start=max(WARMUP_SHARE, 3 / total_steps),
        anneal_strategy="cos",
        cycle_momentum=False,
        div_factor=25.0,
        final_div_factor=1e3,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FwdBwdTimer(Callback):
    """Seconds spent in training_step + backward: batch start until the optimizer is about to step.

    Lightning runs training_step and backward inside the optimizer closure and calls
    ``on_before_optimizer_step`` right after it, so this span excludes data loading, the
    optimizer update and validation.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)  # kernels run async; wait for them
        return time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start = self._now(trainer)

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        if self._start is not None:
            self.seconds += self._now(trainer) - self._start
            self._start = None


class EpochCurve(Callback):
    """One row per epoch; validation runs before ``on_train_epoch_end``, so its metrics are fresh.
    ``epoch_s`` is the epoch's wall time, training and validation, without the run's set-up."""

    NOT_METRICS = ("epoch", "train_loss", "epoch_s")

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch + 1}
        row.update({name: float(value) for name, value in trainer.callback_metrics.items()})
        row["epoch_s"] = time.perf_counter() - self._started
        self.rows.append(row)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's banners, its advice about worker counts (chosen on purpose here) and a
    deprecation inside Lightning itself (``_pytree``) that a user cannot act on."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PossibleUserWarning)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def load_arch(arch: str, task: Task) -> tuple[ArchConfig, str]:
    """The config ``arch`` names, a preset on the task's backbone or a YAML/JSON file, and a short label."""
    from psc_nas.presets import PRESETS, preset_config

    if arch in PRESETS:
        return preset_config(arch, task.backbone, **task.backbone_hparams), arch
    path = Path(arch)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return validated(path), path.stem
    raise ValueError(f"--arch {arch!r} is neither a preset ({', '.join(PRESETS)}) nor a .yaml/.json config file")


def fit(
    config: ArchConfig | str | Path | Mapping[str, Any],
    task: Task | str,
    *,
    epochs: int,
    seed: int = 0,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    lr: float = DEFAULT_LR,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    evaluate_test: bool = False,
    limit_train_batches: int | float | None = None,
    data_options: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    accelerator: str = "auto",
    progress: bool = False,
    deterministic: bool | str = "warn",
) -> TrainResult:
    """Train ``config`` on ``task`` for ``epochs`` and validate after each epoch.

    Fidelity knobs for the search: ``epochs`` and ``limit_train_batches`` (batches per epoch, an int
    or a fraction); ``data_options`` go to ``task.datamodule`` (e.g. ``samples_per_epoch``).
    ``lr_schedule`` is "constant" (Adam, or AdamW when ``weight_decay``) or "onecycle" (see
    ``optimizer_and_schedule``). ``evaluate_test`` scores the final weights on the task's test split
    too: ``test_<metric>`` keys in ``metrics`` (never used to choose anything).
    Nothing is written unless ``out_dir`` is given; then it receives ``config.yaml``,
    ``metrics.json``, ``curve.csv`` and the best epoch's checkpoint ``best.ckpt``.
    ``deterministic`` goes to Lightning's Trainer: the default "warn" makes a seed reproduce a run; False lets
    cuDNN pick its fastest (nondeterministic) algorithms on a GPU, where the deterministic ones can be slower.
    Raises ``TrainingFailed`` when the loss stops being finite, ``ValueError`` for a config that
    does not fit the task (``Task.check_config``) or data the task cannot use.
    """
    task = get_task(task) if isinstance(task, str) else task
    config = task.check_config(as_config(config))
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    started = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = task.datamodule(data_dir=data_dir, seed=seed, **dict(data_options or {}))
    module = TaskModule(config, task, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule)
    timer, curve = FwdBwdTimer(), EpochCurve()
    checkpoint = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = ModelCheckpoint(
            dirpath=out_dir,
            filename=CHECKPOINT_NAME,
            monitor=task.metric,
            mode="max" if task.maximize else "min",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
    with _quiet():
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=epochs,
            limit_train_batches=limit_train_batches,
            num_sanity_val_steps=0,
            # "warn", not True: some CUDA kernels (trilinear upsampling backward) have no deterministic
            # version; on CPU every op used here is deterministic, so a seed reproduces a run exactly.
            deterministic=deterministic,
            logger=False,
            enable_checkpointing=checkpoint is not None,
            enable_progress_bar=progress,
            enable_model_summary=False,
            callbacks=[timer, curve, *([checkpoint] if checkpoint else []), *callbacks],
        )
        trainer.fit(module, datamodule=datamodule)
        if not curve.rows:
            raise TrainingFailed("no training epoch finished")
        tested = trainer.test(module, datamodule=datamodule, verbose=False)[0] if evaluate_test else {}
    result = TrainResult(
        metrics={
            **{k: v for k, v in curve.rows[-1].items() if k not in EpochCurve.NOT_METRICS},
            **{k: float(v) for k, v in tested.items()},
        },
        best_metric=task.best([row[task.metric] for row in curve.rows]),
        curve=curve.rows,
        wall_seconds=time.perf_counter() - started,
        fwd_bwd_seconds=timer.seconds,
        epochs=len(curve.rows),
        checkpoint=Path(checkpoint.best_model_path) if checkpoint and checkpoint.best_model_path else None,
    )
    if out_dir is not None:
        _write_run(out_dir, config, result)
    return result


def _write_run(out_dir: Path, config: ArchConfig, result: TrainResult) -> None:
    config.save(out_dir / "config.yaml")
    data = result.to_dict()
    # Relative, so the record stays right when fit_into renames the directory.
    data["checkpoint"] = result.checkpoint.name if result.checkpoint else None
    (out_dir / "metrics.json").write_text(json.dumps(data, indent=2) + "\n")
    with open(out_dir / "curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(result.curve[0]))
        writer.writeheader()
        writer.writerows(result.curve)


def fit_into(out: str | Path, config: ArchConfig, task: Task | str, **fit_kwargs: Any) -> TrainResult:
    """``fit`` writing into ``out`` all at once: a failed run leaves nothing behind.

    Trains into a hidden sibling directory and renames it at the end (atomic on one filesystem).
    Refuses an existing ``out`` rather than mixing two runs' files.
    """
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out or remove it")
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        result = fit(config, task, out_dir=partial, **fit_kwargs)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if result.checkpoint is not None:
        result.checkpoint = out / result.checkpoint.name
    return result

"""The ``train`` evaluator: train from scratch with ``psc_nas.train.fit``, validate, report the metrics.

Its fidelities are the run profile's epoch counts. The same ``fit`` as ``psc-train``, so a search
score and a ``psc-train`` score at equal epochs and data options mean the same thing.

Options (``EvaluatorSetup.options``): ``width`` trains a reduced-width proxy of each candidate (the same
choices at ``width`` × the config's width, channel-counting choices following their slots: many more
steps per second on a CPU; the search still prices and reports the full-width network); ``lr``,
``lr_schedule`` ("constant" or "onecycle") and ``weight_decay`` go to ``fit``.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from lightning.pytorch.callbacks import Callback, Timer

from psc_nas.arch import ArchConfig
from psc_nas.evaluators.base import Evaluation, EvaluationFailed, Evaluator, EvaluatorSetup, Fidelity
from psc_nas.nets.budget import with_width
from psc_nas.train import DEFAULT_LR, TrainingFailed, fit

OPTIONS = ("width", "lr", "lr_schedule", "weight_decay")


class ValidationTimer(Callback):
    """Seconds in validation batches: network forward passes over whole volumes (sliding window).

    ``fit`` times training steps + backward; with this, a trial's wall time splits into network
    compute (training fwd/bwd + validation forward) and everything else (data, setup, storage).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def on_validation_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_validation_batch_end(self, *args: Any) -> None:
        self.seconds += time.perf_counter() - self._start


class TrainEvaluator(Evaluator):
    name = "train"

    def __init__(self, setup: EvaluatorSetup) -> None:
        unknown = sorted(set(setup.options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for evaluator train; known: {', '.join(OPTIONS)}")
        self.setup = setup
        self.width = float(setup.options.get("width", 1.0))
        if not 0 < self.width <= 1:
            raise ValueError(f"evaluator train: width must be in (0, 1], got {self.width}")
        self.fit_options = {
            "lr": float(setup.options.get("lr", DEFAULT_LR)),
            "lr_schedule": str(setup.options.get("lr_schedule", "constant")),
            "weight_decay": float(setup.options.get("weight_decay", 0.0)),
        }

    def fidelity(self, epochs: int) -> Fidelity:
        data = self.setup.data_options
        samples, patch = data.get("samples_per_epoch"), data.get("patch_size")
        words = f"{epochs} epoch{'s' if epochs != 1 else ''}"
        words = f"{words} × {samples} samples" if samples else words
        words = f"{words} of {patch}³" if isinstance(patch, int) else words
        words = f"{words}, class-balanced" if data.get("class_balanced") else words
        # what differs from a plain psc-train run, so a trial says how its candidate was trained
        if self.width != 1:
            words += f", width {self.width:g}"
        if self.fit_options["lr"] != DEFAULT_LR:
            words += f", lr {self.fit_options['lr']:g}"
        if self.fit_options["lr_schedule"] != "constant":
            words += f", {self.fit_options['lr_schedule']}"
        return Fidelity(epochs, words)

    def network(self, config: ArchConfig) -> ArchConfig:
        """What is trained for ``config``: itself, or its reduced-width proxy."""
        if self.width == 1:
            return config
        return with_width(config, self.width * float(config.hparams.get("width", 1.0)))

    def levels(self) -> tuple[Fidelity, ...]:
        return tuple(self.fidelity(epochs) for epochs in self.setup.epochs)

    def evaluate(self, config: ArchConfig, fidelity: Fidelity, *, seconds_left: float | None) -> Evaluation:
        validation = ValidationTimer()
        # Checked at epoch ends, so a cut training still has whole, validated epochs to report.
        deadline = [Timer(duration=timedelta(seconds=seconds_left), interval="epoch")] if seconds_left else []
        try:
            result = fit(
                self.network(config),
                self.setup.task,
                epochs=fidelity.key,
                seed=self.setup.seed,
                **self.fit_options,
                data_dir=self.setup.data_dir,
                data_options=self.setup.data_options,
                callbacks=[validation, *deadline],
            )
        except TrainingFailed as error:
            raise EvaluationFailed(f"training failed: {error}") from error
        return Evaluation(
            self.name,
            self.fidelity(result.epochs),
            result.metrics,
            result.curve,
            result.wall_seconds,
            result.fwd_bwd_seconds,
            val_forward_s=validation.seconds,
        )

"""The ``train`` evaluator: train from scratch with ``psc_nas.train.fit``, validate, report the metrics.

Its fidelities are the run profile's epoch counts. The same ``fit`` as ``psc-train``, so a search
score and a ``psc-train`` score at equal epochs and data options mean the same thing.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from lightning.pytorch.callbacks import Callback, Timer

from psc_nas.arch import ArchConfig
from psc_nas.evaluators.base import Evaluation, EvaluationFailed, Evaluator, EvaluatorSetup, Fidelity
from psc_nas.train import TrainingFailed, fit


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
        self.setup = setup

    def fidelity(self, epochs: int) -> Fidelity:
        samples = self.setup.data_options.get("samples_per_epoch")
        words = f"{epochs} epoch{'s' if epochs != 1 else ''}"
        return Fidelity(epochs, f"{words} × {samples} samples" if samples else words)

    def levels(self) -> tuple[Fidelity, ...]:
        return tuple(self.fidelity(epochs) for epochs in self.setup.epochs)

    def evaluate(self, config: ArchConfig, fidelity: Fidelity, *, seconds_left: float | None) -> Evaluation:
        validation = ValidationTimer()
        # Checked at epoch ends, so a cut training still has whole, validated epochs to report.
        deadline = [Timer(duration=timedelta(seconds=seconds_left), interval="epoch")] if seconds_left else []
        try:
            result = fit(config, self.setup.task, epochs=fidelity.key, seed=self.setup.seed,
                         data_dir=self.setup.data_dir, data_options=self.setup.data_options,
                         callbacks=[validation, *deadline])
        except TrainingFailed as error:
            raise EvaluationFailed(f"training failed: {error}") from error
        return Evaluation(self.name, self.fidelity(result.epochs), result.metrics, result.curve, result.wall_seconds,
                          result.fwd_bwd_seconds, val_forward_s=validation.seconds)

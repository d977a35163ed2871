"""Training one candidate at one fidelity, and measuring its forward latency.

A *fidelity* is a number of training epochs from scratch: the same ``fit`` as ``psc-train``, so
a search result and a ``psc-train`` result at equal epochs mean the same thing.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from psc_nas.arch import ArchConfig
from psc_nas.nets import build_model


@dataclass(frozen=True)
class RungResult:
    """What one training at one fidelity gave; stored in the trial's ``rungs`` user attribute."""

    fidelity: int
    metrics: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    fwd_bwd_s: float = 0.0
    val_forward_s: float = 0.0
    trained_by: int | None = None  # the trial number that trained it (another one when reused)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RungResult:
        return cls(**data)


# (config, epochs, max_seconds) -> metrics of one training; raises on failure. A training that
# reaches max_seconds stops after the running epoch and reports the epochs it finished as its
# fidelity. Tests pass cheap stand-ins.
Trainer = Callable[[ArchConfig, int, "float | None"], RungResult]


def fit_trainer(task: Any, *, seed: int, data_dir: str | Path | None, data_options: Mapping[str, Any]) -> Trainer:
    """The real trainer: ``psc_nas.train.fit`` on ``task`` with the profile's data options."""
    from lightning.pytorch.callbacks import Timer

    from psc_nas.search._timers import ValidationTimer
    from psc_nas.train import fit

    def train(config: ArchConfig, epochs: int, max_seconds: float | None) -> RungResult:
        validation = ValidationTimer()
        # Checked at epoch ends, so a cut training still has whole, validated epochs to report.
        deadline = [Timer(duration=timedelta(seconds=max_seconds), interval="epoch")] if max_seconds else []
        result = fit(config, task, epochs=epochs, seed=seed, data_dir=data_dir, data_options=data_options,
                     callbacks=[validation, *deadline])
        return RungResult(result.epochs, result.metrics, result.curve, result.wall_seconds, result.fwd_bwd_seconds,
                          val_forward_s=validation.seconds)

    return train


def failure_reason(error: BaseException) -> str:
    """One line for ``fail_reason``: out-of-memory and non-finite loss named as such."""
    from psc_nas.train import TrainingFailed

    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return f"out of memory: {text}"
    if isinstance(error, TrainingFailed):
        return f"training failed: {text}"
    return f"{type(error).__name__}: {text}"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def forward_latency_ms(config: ArchConfig, input_shape: Sequence[int], *, repeats: int, warmup: int = 2) -> float:
    """Median wall time of one inference forward pass of one sample on the current device."""
    current = device()
    model = build_model(config).to(current).eval()
    sample = torch.randn(1, *input_shape, device=current)
    timings = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            if current.type == "cuda":
                torch.cuda.synchronize(current)
            started = time.perf_counter()
            model(sample)
            if current.type == "cuda":
                torch.cuda.synchronize(current)  # kernels run asynchronously; time them, not the launch
            if index >= warmup:
                timings.append(time.perf_counter() - started)
    return 1e3 * statistics.median(timings)

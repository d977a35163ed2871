"""Run-size profiles: how much a search spends per candidate.

``quick`` is the default and is sized, by measurement, so that ``psc-search --task ibsr
--budget 5M`` finishes within 15 minutes on 2 CPU cores (docs/benchmarks/search.md). ``paper``
is for a GPU: the paper's patch count and epochs per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psc_nas.search.promotion import SuccessiveHalving


@dataclass(frozen=True)
class Profile:
    name: str
    trials: int  # architectures to evaluate when --trials is not given
    epochs: tuple[int, ...]  # the training evaluator's fidelities, increasing
    policy: SuccessiveHalving
    population: int  # NSGA-II population / TPE start-up trials
    data_options: dict[str, Any] = field(default_factory=dict)  # passed to task.datamodule
    timeout: float | None = None  # seconds; --timeout overrides
    latency_repeats: int = 5
    evaluator: str = "train"  # --evaluator overrides
    evaluator_options: dict[str, Any] = field(default_factory=dict)  # for ``evaluator`` only

    def __post_init__(self) -> None:
        if not self.epochs or list(self.epochs) != sorted(set(self.epochs)) or self.epochs[0] < 1:
            raise ValueError(f"epochs must be increasing positive counts, got {self.epochs}")


PROFILES = {
    "quick": Profile(
        name="quick",
        trials=12,
        epochs=(1, 2),
        policy=SuccessiveHalving(bracket=6, eta=3, epsilon=0.01),
        population=6,
        data_options={"samples_per_epoch": 8, "batch_size": 4},
        timeout=12.5 * 60,  # no training starts later; the last may finish one epoch: under 15 minutes
    ),
    "paper": Profile(
        name="paper",
        trials=200,
        epochs=(5, 15, 45),
        policy=SuccessiveHalving(bracket=27, eta=3, epsilon=0.005),
        population=24,
        data_options={"samples_per_epoch": 512, "batch_size": 8, "num_workers": 4},
        latency_repeats=20,
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]

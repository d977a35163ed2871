"""Run-size profiles: how much training a search spends per candidate.

``quick`` is the default and is sized, by measurement, so that ``psc-search --task ibsr
--budget 5M`` finishes within 15 minutes on 2 CPU cores (docs/benchmarks/search.md). ``paper``
is for a GPU: the paper's patch count and epochs per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psc_nas.search.fidelity import Schedule


@dataclass(frozen=True)
class Profile:
    name: str
    trials: int  # architectures to train when --trials is not given
    schedule: Schedule
    bracket: int  # candidates trained at the lowest rung before a promotion round
    population: int  # NSGA-II population / TPE start-up trials
    data_options: dict[str, Any] = field(default_factory=dict)  # passed to task.datamodule
    timeout: float | None = None  # seconds; --timeout overrides
    latency_repeats: int = 5


PROFILES = {
    "quick": Profile(
        name="quick",
        trials=12,
        schedule=Schedule(rungs=(1, 2), eta=3, epsilon=0.01),
        bracket=6,
        population=6,
        data_options={"samples_per_epoch": 8, "batch_size": 4},
        timeout=12.5 * 60,  # no training starts later; the last may finish one epoch: under 15 minutes
    ),
    "paper": Profile(
        name="paper",
        trials=200,
        schedule=Schedule(rungs=(5, 15, 45), eta=3, epsilon=0.005),
        bracket=27,
        population=24,
        data_options={"samples_per_epoch": 512, "batch_size": 8, "num_workers": 4},
        latency_repeats=20,
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]

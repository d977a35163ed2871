"""A cheap, deterministic stand-in evaluator, so search tests exercise the real engine and study in
seconds. Also a worker entry point for the multi-process tests (resume after kill -9, PostgreSQL).

The fake score rises with capacity and with epochs, plus a per-architecture offset, so fronts,
promotions and knees are non-trivial. Every evaluation is appended to ``PSC_TRAIN_LOG`` (when set)
as ``<arch_hash> <epochs> <pid>``: the tests read it to prove nothing was evaluated twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from psc_nas import cost
from psc_nas.arch import ArchConfig
from psc_nas.evaluators import Evaluation, Evaluator, Fidelity
from psc_nas.search.profiles import PROFILES

SPATIAL = (32, 32, 32)


def fake_dice(config: ArchConfig, epochs: int) -> float:
    params = cost(config, SPATIAL).params
    offset = int(config.hash, 16) % 1000 / 1000
    return 0.4 + 0.35 * (1 - math.exp(-params / 1.5e6)) * (1 - 0.5**epochs) + 0.05 * offset


class StandinEvaluator(Evaluator):
    """Epochs as fidelities, like ``train``: the quick profile's unless told otherwise."""

    name = "standin"

    def __init__(self, epochs: tuple[int, ...] = PROFILES["quick"].epochs) -> None:
        self.epochs = epochs

    def levels(self) -> tuple[Fidelity, ...]:
        return tuple(Fidelity(e, f"{e} stand-in epochs") for e in self.epochs)

    def evaluate(self, config: ArchConfig, fidelity: Fidelity, *, seconds_left: float | None) -> Evaluation:
        epochs = fidelity.key
        seconds = float(os.environ.get("PSC_TRAIN_SECONDS", "0"))
        time.sleep(seconds * epochs)
        log = os.environ.get("PSC_TRAIN_LOG")
        if log:
            with open(log, "a") as handle:
                handle.write(f"{config.hash} {epochs} {os.getpid()}\n")
        dice = fake_dice(config, epochs)
        return Evaluation(
            self.name,
            fidelity,
            {"dice_mean": dice},
            [{"epoch": e + 1, "dice_mean": dice} for e in range(epochs)],
            wall_s=seconds * epochs,
            fwd_bwd_s=0.9 * seconds * epochs,
        )


def main() -> None:
    """``python search_standin.py SETTINGS_JSON``: one search worker with the stand-in evaluator."""
    from rich.console import Console

    from psc_nas.search.budget import Budget
    from psc_nas.search.runner import SearchSettings, run_search

    raw = json.loads(sys.argv[1])
    raw["budget"] = Budget(**raw.get("budget", {}))
    raw["out"] = Path(raw["out"])
    raw.setdefault("retrain", False)  # retraining trains for real; the worker tests count stand-in evaluations
    raw.setdefault("prescreen", "none")  # so does IBSR's quick-profile pre-screen (100 real networks)
    settings = SearchSettings(**raw)
    run_search(settings, evaluator=StandinEvaluator(), console=Console(stderr=True, quiet=True))


if __name__ == "__main__":
    main()

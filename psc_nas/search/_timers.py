"""Lightning callbacks for the real trainer (kept apart so the search imports Lightning only to train)."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import Callback


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

"""Forward latency of one sample on the search's device, an optional search objective."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from psc_nas.arch import ArchConfig
from psc_nas.device import compute_device, place
from psc_nas.nets import build_model


def forward_latency_ms(config: ArchConfig, input_shape: Sequence[int], *, repeats: int, warmup: int = 2) -> float:
    """Median wall time of one inference forward pass of one sample on the current device."""
    current = compute_device()
    model = place(build_model(config), current).eval()
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

"""Where computation outside Lightning's loops runs: the first CUDA GPU when there is one, else the CPU.

Lightning's ``accelerator="auto"`` makes the same choice for training; latency timing, the zero-cost proxies and
the engines' own super-network steps use ``compute_device()`` so that a search measures every candidate where it
trains. ``to_device`` moves a task's batch (a mapping whose tensors move, other values kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}

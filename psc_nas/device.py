"""Where computation outside Lightning's loops runs: the first CUDA GPU when there is one, else the CPU.

Lightning's ``accelerator="auto"`` makes the same choice for training; latency timing, the zero-cost proxies and
the engines' own super-network steps use ``compute_device()`` so that a search measures every candidate where it
trains. ``to_device`` moves a task's batch (a mapping whose tensors move, other values kept); ``place`` moves a
network, and on the CPU stores its 5-D weights in channels_last_3d, the layout oneDNN's fast convolutions use: every
conv then returns channels_last_3d activations and the norms, activations, concatenations and pools after it keep
that layout, where NCDHW weights had layers convert activations back and forth in both passes (a DenseNet3D
training step 1.09-1.44x faster on the EPYC, docs/benchmarks/ops.md). Values are unchanged; a state_dict loads into
either layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

CPU_LAYOUT = torch.channels_last_3d


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def place(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` moved to ``device`` (in place, and returned); on the CPU its 5-D parameters and buffers in
    ``CPU_LAYOUT``. Other devices keep the layout they get (not measured there)."""
    module.to(device)
    if device.type == "cpu":
        # .to, not .contiguous: a 1x1x1 kernel's NCDHW strides already pass is_contiguous(channels_last_3d), so
        # .contiguous keeps them, PyTorch's layout choice reads that weight as NCDHW and the conv's output follows
        # (the 1x1x1 convs were the ones that turned activations back); .to restrides it.
        module._apply(lambda t: t.to(memory_format=CPU_LAYOUT) if t.dim() == 5 else t)
    return module

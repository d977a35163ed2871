"""What every task provides to training and search.

A task bundles what a trial needs besides the network: the default backbone and its fixed
hyper-parameters, the data (a ``LightningDataModule``), the loss, the inference procedure, and the
metrics, one of which the search maximizes. ``psc_nas.train`` and the search engines code against
this interface only, so adding a task never touches them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol

import torch
from torch import nn


class DataError(ValueError):
    """Data a task cannot use; the message names the offending file or directory."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{path}: {message}")


class Metrics(Protocol):
    """Accumulates predictions over an evaluation epoch; ``compute`` returns named scalar scores."""

    def reset(self) -> None: ...

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Task(ABC):
    name: ClassVar[str]
    backbone: ClassVar[str]
    backbone_hparams: ClassVar[Mapping[str, Any]]
    class_names: ClassVar[tuple[str, ...]]
    metric: ClassVar[str]  # the key of ``Metrics.compute()`` the search maximizes
    input_shape: ClassVar[tuple[int, int, int, int]]  # (C, D, H, W) of one training sample; what cost() prices

    @abstractmethod
    def loss(self) -> nn.Module:
        """Training loss taking (logits, target) as the data module's batches deliver them."""

    @abstractmethod
    def metrics(self) -> Metrics:
        """A fresh accumulator of the task's evaluation metrics."""

    @abstractmethod
    def inferer(self) -> Any:
        """A MONAI ``Inferer``: ``inferer(inputs, model) -> logits`` for a validation/test batch."""

    @abstractmethod
    def datamodule(self, data_dir: str | Path | None = None, *, seed: int = 0, **options: Any):
        """The ``LightningDataModule``; ``data_dir=None`` uses data built from what ships with the install."""

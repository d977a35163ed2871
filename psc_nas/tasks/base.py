"""What every task provides to training and search: the problem definition and its data.

A task owns the problem: the input shape (C, D, H, W) at which every network is trained and
priced, the backbone and its fixed hyper-parameters, the class names, the metric the search
optimizes with its direction and range, and the default search space. It also brings the data (a
``LightningDataModule``), the loss, how a validation batch is predicted and the metrics.
``psc_nas.train`` and the search code against this interface only, so adding a task never touches
them.

Batches are dicts of tensors. ``batch[task.input_key]`` is the network input (N, C, D, H, W); every
other key is the task's own (labels, affinities, video ids, ...), read only by its loss and metrics:

    training:   loss = task.loss()(net(batch[input_key]), batch)
    validation: metrics.update(task.predict(net, batch), batch)  ... metrics.compute() -> {name: float}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError
from psc_nas.nets import cost, get_backbone, validate

if TYPE_CHECKING:
    from psc_nas.space import SearchSpace

Batch = Mapping[str, Any]
Loss = Callable[[torch.Tensor, Batch], torch.Tensor]


class DataError(ValueError):
    """Data a task cannot use; the message names the offending file or directory."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{path}: {message}")


class Metrics(Protocol):
    """Accumulates predictions over an evaluation epoch; ``compute`` returns named scalar scores."""

    def reset(self) -> None: ...

    def update(self, prediction: torch.Tensor, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]: ...


class TargetLoss(nn.Module):
    """A ``loss(prediction, target)`` applied to ``batch[target]``: the usual case of ``Task.loss``."""

    def __init__(self, loss: nn.Module, target: str = "label") -> None:
        super().__init__()
        self.loss = loss
        self.target = target

    def forward(self, prediction: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.loss(prediction, batch[self.target])


def found_reference(task: Task) -> ArchConfig:
    """The task's own network (all conv3d): what a network brought by the user must take and give."""
    return get_backbone(task.backbone).uniform(BlockChoice("conv3d"), **task.backbone_hparams)


class Task(ABC):
    name: ClassVar[str]
    backbone: ClassVar[str]
    backbone_hparams: ClassVar[Mapping[str, Any]]  # fixed: every config and space of the task has these
    class_names: ClassVar[tuple[str, ...]]
    input_shape: ClassVar[tuple[int, int, int, int]]  # (C, D, H, W) of one sample; what is trained and priced
    metric: ClassVar[str]  # the key of ``Metrics.compute()`` the search optimizes
    metric_direction: ClassVar[str]  # "maximize" (Dice, accuracy) or "minimize" (variation of information)
    metric_range: ClassVar[tuple[float, float]]  # (low, high) the metric lives in; hypervolumes are scaled by it
    default_space: ClassVar[str | None] = None  # the search space psc-search uses without --space
    input_key: ClassVar[str] = "image"
    # The task's own schedule per run profile, measured for this task: Profile fields replaced when a
    # search of this task runs that profile, e.g. {"quick": {"data_options": {...}}} (search.profiles).
    profile_overrides: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    # Data options of the batch a zero-cost pre-screen scores every architecture on (psc_nas.search.prescreen),
    # e.g. smaller patches where the task measured that they rank as the full input does; {}: the training input.
    screen_data_options: ClassVar[Mapping[str, Any]] = {}

    @property
    def maximize(self) -> bool:
        return self.metric_direction == "maximize"

    def best(self, values: list[float]) -> float:
        """The best of ``values`` in the metric's direction."""
        return max(values) if self.maximize else min(values)

    def describe_input(self) -> str:
        return "x".join(map(str, self.input_shape))

    @abstractmethod
    def loss(self) -> Loss:
        """Training loss ``(prediction, batch) -> scalar``; ``TargetLoss`` wraps a (prediction, target) loss."""

    @abstractmethod
    def metrics(self) -> Metrics:
        """A fresh accumulator of the task's evaluation metrics; one of them is ``metric``."""

    def predict(self, net: nn.Module, batch: Batch) -> torch.Tensor:
        """The prediction for a validation/test batch that ``metrics().update`` takes.

        The network's output on the batch input; tasks that validate on whole volumes larger than
        ``input_shape`` override this (e.g. with a MONAI sliding-window inferer).
        """
        return net(batch[self.input_key])

    @abstractmethod
    def datamodule(self, data_dir: str | Path | None = None, *, seed: int = 0, **options: Any):
        """The ``LightningDataModule``; ``data_dir=None`` uses data built from what ships with the install.

        Search profiles pass ``samples_per_epoch`` and ``batch_size`` (and ``num_workers``) as options.
        """

    # ------------------------------------------------------------------ fitting the problem
    def check_config(self, config: ArchConfig) -> ArchConfig:
        """Validate ``config`` and check it is a network for this task: backbone, outputs, input size."""
        validate(config)
        self._check_backbone(config.backbone, config.hparams, "config")
        self._check_input(config, "config")
        return config

    def check_space(self, space: SearchSpace) -> None:
        """Raise ``ConfigError`` naming the space file when ``space`` is not a space of this task."""
        if space.task != self.name:
            suggestion = f"; the {self.name} task's space is {self.default_space}" if self.default_space else ""
            raise ConfigError(
                f"{space.source}: task", f"space {space.name!r} is for task {space.task}, not {self.name}" + suggestion
            )
        try:
            self._check_backbone(space.backbone, space.hparams, "space")
            self._check_input(space.decide(lambda name, choices: choices[0]), "space")
        except ConfigError as err:
            raise ConfigError(f"{space.source}: {err.path}" if err.path else space.source, err.message) from None

    def _check_backbone(self, backbone: str, hparams: Mapping[str, Any], what: str) -> None:
        found = get_backbone(backbone)
        if backbone != self.backbone and hasattr(found, "check_task"):  # a network of the user's own
            found.check_task(hparams, self.input_shape, found_reference(self))
            return
        if backbone != self.backbone:
            raise ConfigError("backbone", f"task {self.name} trains {self.backbone}, the {what} is for {backbone}")
        full = get_backbone(backbone).hparams(hparams)
        for key, wanted in self.backbone_hparams.items():
            if full.get(key) != wanted:
                raise ConfigError(f"hparams.{key}", f"task {self.name} needs {wanted}, the {what} has {full.get(key)}")

    def _check_input(self, config: ArchConfig, what: str) -> None:
        try:
            cost(config, self.input_shape)
        except ValueError as err:
            shape = self.describe_input()
            raise ConfigError("", f"task {self.name}'s input {shape} does not fit the {what}: {err}") from None

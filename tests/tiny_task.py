"""A task defined outside psc_nas, loaded as a plugin (``PSC_NAS_PLUGINS=tiny_task``): which axis a
bright bar in a noisy 16³ volume runs along.

It differs from IBSR wherever a task can: classification (one label per volume, not per voxel), a
ResNet3D-18 at an eighth of the width, and a metric the search *minimizes* (the error rate).
tests/test_tasks.py runs the real ``psc-train`` and ``psc-search`` on it with no edit to psc_nas/.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from psc_nas.tasks import Batch, DataError, TargetLoss, Task, register_task

AXES = ("depth", "height", "width")
SIDE, BAR_LENGTH, BAR_WIDTH = 16, 10, 2
VALIDATION_SIZE, VALIDATION_SEED = 48, 10_000


def bar_volumes(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` noisy volumes, each with one 2x2x10 bar along a random axis; the axis is the label."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(AXES), (count,), generator=generator)
    images = 0.3 * torch.randn(count, 1, SIDE, SIDE, SIDE, generator=generator)
    for image, axis in zip(images, labels.tolist()):
        start = int(torch.randint(0, SIDE - BAR_LENGTH + 1, (1,), generator=generator))
        across = torch.randint(1, SIDE - BAR_WIDTH, (2,), generator=generator).tolist()
        index = [slice(a, a + BAR_WIDTH) for a in across]
        index.insert(axis, slice(start, start + BAR_LENGTH))
        image[(0, *index)] += 3.0
    return [{"image": image, "label": label} for image, label in zip(images, labels)]


class BarData(L.LightningDataModule):
    def __init__(self, *, seed: int, samples_per_epoch: int, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.seed, self.samples_per_epoch = seed, samples_per_epoch
        self.batch_size, self.num_workers = batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            bar_volumes(self.samples_per_epoch, self.seed),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(bar_volumes(VALIDATION_SIZE, VALIDATION_SEED), batch_size=16, num_workers=self.num_workers)


class ErrorRate:
    def reset(self) -> None:
        self.correct = self.total = 0

    def update(self, logits: torch.Tensor, batch: Batch) -> None:
        self.correct += int((logits.argmax(1) == batch["label"]).sum())
        self.total += len(batch["label"])

    def compute(self) -> dict[str, float]:
        accuracy = self.correct / self.total
        return {"accuracy": accuracy, "error": 1.0 - accuracy}


@register_task
class BarAxisTask(Task):
    name = "bar_axis"
    backbone = "resnet3d"
    backbone_hparams = {"in_channels": 1, "num_classes": len(AXES), "depth": 18, "width": 0.125}
    class_names = AXES
    input_shape = (1, SIDE, SIDE, SIDE)
    metric = "error"
    metric_direction = "minimize"
    metric_range = (0.0, 1.0)

    def loss(self) -> TargetLoss:
        return TargetLoss(nn.CrossEntropyLoss())

    def metrics(self) -> ErrorRate:
        return ErrorRate()

    def datamodule(
        self,
        data_dir: str | Path | None = None,
        *,
        seed: int = 0,
        samples_per_epoch: int = 32,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> BarData:
        if data_dir is not None:
            raise DataError(data_dir, "the bar_axis task makes its own volumes and reads no data directory")
        return BarData(seed=seed, samples_per_epoch=samples_per_epoch, batch_size=batch_size, num_workers=num_workers)


SPACE_YAML = """\
name: bar_axis_resnet3d
task: bar_axis
backbone: resnet3d
hparams: {in_channels: 1, num_classes: 3, depth: 18, width: 0.125}
blocks:
  share: true
  ops:
    conv3d: {}
    p3d: {orientation: [1x3x3, 3x1x3, 3x3x1]}
    csn_ir: {}
  groups:
    - {name: conv2, slots: "conv2.*"}
    - {name: conv3, slots: "conv3.*"}
    - {name: conv4, slots: "conv4.*"}
    - {name: conv5, slots: "conv5.*"}
"""


def retraining_profile(retrain, *, timeout: float | None = None):
    """A ``tiny`` search profile for the bar task: 4 architectures at 1 epoch, then ``retrain`` (a
    ``RetrainPolicy``) in the last half of ``timeout``; for tests that search and retrain for real."""
    from psc_nas.search.profiles import Profile
    from psc_nas.search.promotion import SuccessiveHalving

    return Profile(
        name="tiny",
        trials=4,
        epochs=(1,),
        policy=SuccessiveHalving(bracket=4, eta=2, epsilon=0.01),
        population=4,
        data_options={"samples_per_epoch": 8, "batch_size": 8},
        timeout=timeout,
        retrain=retrain,
        retrain_share=0.5,
    )

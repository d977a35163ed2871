"""A plugin task for tests/test_reliability.py (``PSC_NAS_PLUGINS=slow_task``): tiny_task's bar-axis
problem, trained for real by Lightning, whose training batches can be slowed down, announced and broken
from the environment, so a real ``psc-search`` process can be interrupted mid-training or fail every trial:

    SLOW_BAR_SECONDS   sleep this long before each training batch (default 0)
    SLOW_BAR_MARK      append a line to this file when a training batch starts
    SLOW_BAR_FAIL      any value: every training batch raises (every trial fails)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tiny_task import SPACE_YAML, BarAxisTask, BarData
from torch.utils.data import DataLoader

from psc_nas.tasks import register_task

SLOW_SPACE_YAML = SPACE_YAML.replace("name: bar_axis_resnet3d", "name: slow_bar_resnet3d").replace(
    "task: bar_axis", "task: slow_bar"
)


class _Announced(list):
    def __getitem__(self, index):  # a map-style dataset: Lightning's loader reads items by index
        if os.environ.get("SLOW_BAR_MARK"):
            with open(os.environ["SLOW_BAR_MARK"], "a") as handle:
                handle.write(f"{os.getpid()}\n")
        if os.environ.get("SLOW_BAR_FAIL"):
            raise RuntimeError("slow_bar: training data broken on purpose")
        time.sleep(float(os.environ.get("SLOW_BAR_SECONDS", "0")))
        return super().__getitem__(index)


class SlowBarData(BarData):
    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        return DataLoader(
            _Announced(loader.dataset), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


@register_task
class SlowBarTask(BarAxisTask):
    name = "slow_bar"

    def datamodule(
        self,
        data_dir: str | Path | None = None,
        *,
        seed: int = 0,
        samples_per_epoch: int = 32,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> SlowBarData:
        base = super().datamodule(
            data_dir, seed=seed, samples_per_epoch=samples_per_epoch, batch_size=batch_size, num_workers=num_workers
        )
        return SlowBarData(
            seed=seed,
            samples_per_epoch=base.samples_per_epoch,
            batch_size=base.batch_size,
            num_workers=base.num_workers,
        )

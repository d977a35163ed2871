"""EM neuron segmentation (PSC paper §4.3): a UNet3D predicts x/y/z affinities, segmented and scored by VI.

The pipeline of Funke et al.: the network's 3 output channels are logits of the (z, y, x) affinities
(:func:`~psc_nas.tasks.em_segmentation.affinities_from_labels`: 1 where a voxel and its predecessor
along the axis belong to the same neuron); the training loss is binary cross-entropy on them
(``loss_kind = "mse"`` gives Funke et al.'s mean squared error on the sigmoid instead), over every
edge inside the volume. Validation predicts whole volumes in ``input_shape`` windows (MONAI sliding
window), segments them by watershed + mean-affinity agglomeration (``waterz`` where it is installed,
otherwise scikit-image; :data:`SEGMENTATION_BACKEND` says which, and ``psc-train`` logs it) and scores
variation of information (split, merge, sum; bits) and adapted Rand error. The search **minimises**
``vi_sum``.

Data (:mod:`psc_nas.tasks.em_data`): ``--data-dir`` with ``train/`` and ``val/`` sub-folders of
volumes (CREMI-style HDF5 or raw+label TIFF/NIfTI pairs), or one folder of at least two volumes, the
last (by name) validating. Without a ``data_dir`` the embedded synthetic volumes
(:mod:`psc_nas.tasks.em_embedded`, 4 train, 1 val, 1 test of 48×96×96 at 10 nm isotropic).

CPU-small default: the paper trains on larger patches; here training patches and inference windows are
32³ (the smallest side four 2×2×2 poolings allow), the size every cost is quoted at.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from psc_nas.tasks.base import Batch, DataError, Task
from psc_nas.tasks.em_data import EMVolume, VolumeSource, find_volumes
from psc_nas.tasks.em_embedded import embedded_em
from psc_nas.tasks.em_segmentation import SegmentationScores, affinities_from_labels, default_backend
from psc_nas.tasks.registry import register_task

SEGMENTATION_BACKEND = default_backend()  # "waterz" or "skimage": the one validation segments with
LOSS_KINDS = ("bce", "mse")
log = logging.getLogger(__name__)


def split_volumes(data_dir: str | Path) -> dict[str, list[VolumeSource]]:
    """``train``/``val`` (and optional ``test``) sub-folders, or one folder whose last volume validates."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(data_dir, "EM data directory not found")
    if (data_dir / "train").is_dir() or (data_dir / "val").is_dir():
        splits = {name: find_volumes(data_dir / name) for name in ("train", "val")}
        if (data_dir / "test").is_dir():
            splits["test"] = find_volumes(data_dir / "test")
        return splits
    volumes = find_volumes(data_dir)
    if len(volumes) < 2:
        raise DataError(
            data_dir,
            f"{len(volumes)} volume(s): need train/ and val/ folders or at least 2 volumes "
            "(all but the last train, the last validates)",
        )
    return {"train": volumes[:-1], "val": volumes[-1:]}


class EMSample:
    """A volume as tensors: raw (1, D, H, W), affinities (3, D, H, W), neuron ids (1, D, H, W) int64."""

    def __init__(self, volume: EMVolume) -> None:
        affinities, _ = affinities_from_labels(volume.labels)
        self.name = volume.name
        self.raw = torch.from_numpy(volume.raw)[None]
        self.affinities = torch.from_numpy(affinities)
        self.labels = torch.from_numpy(volume.labels.astype(np.int64))[None]
        self.resolution = torch.tensor(volume.resolution, dtype=torch.float64)

    def item(self) -> dict[str, Any]:
        return {
            "image": self.raw,
            "affinities": self.affinities,
            "neuron_ids": self.labels,
            "resolution": self.resolution,
        }


class RandomPatches(Dataset):
    """``count`` random patches of the training volumes, volumes in turn; seeded by (seed, epoch visit).

    A volume smaller than the patch is zero-padded (raw 0, affinities 0, masked out of the loss).
    """

    def __init__(self, samples: Sequence[EMSample], patch: Sequence[int], count: int, seed: int) -> None:
        self.samples, self.patch, self.count, self.seed = list(samples), tuple(patch), count, seed
        self._visits = 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self._visits += 1
        rng = np.random.default_rng([self.seed, index, self._visits])
        sample = self.samples[index % len(self.samples)]
        shape = sample.raw.shape[1:]
        pad = [max(p - s, 0) for p, s in zip(self.patch, shape)]
        start = [int(rng.integers(max(s - p, 0) + 1)) for s, p in zip(shape, self.patch)]
        region = tuple(slice(b, b + p) for b, p in zip(start, self.patch))
        raw, affinities = sample.raw[(slice(None), *region)], sample.affinities[(slice(None), *region)]
        mask = torch.ones_like(affinities)
        if any(pad):
            widths = [w for p in reversed(pad) for w in (0, p)]
            raw, affinities, mask = (F.pad(t, widths) for t in (raw, affinities, mask))
        return {"image": raw, "affinities": affinities, "mask": mask}


class EMDataModule(L.LightningDataModule):
    """Random ``input_shape`` training patches; whole validation volumes.

    ``samples_per_epoch`` patches make an epoch (default 16). ``cache_dir`` applies to the embedded
    volumes only.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        seed: int = 0,
        patch_size: Sequence[int] = (32, 32, 32),
        batch_size: int = 2,
        samples_per_epoch: int = 16,
        cache_dir: str | Path | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if data_dir is not None and cache_dir is not None:
            raise ValueError("cache_dir applies to the embedded volumes only, not to a data_dir")
        self.seed, self.patch_size, self.batch_size = seed, tuple(patch_size), batch_size
        self.samples_per_epoch, self.cache_dir, self.num_workers = samples_per_epoch, cache_dir, num_workers
        # Check a user's layout now, so a wrong path fails before any model is built.
        self._sources = None if data_dir is None else split_volumes(data_dir)
        self.samples: dict[str, list[EMSample]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.samples:
            return
        sources = self._sources
        if sources is None:
            root = embedded_em(self.cache_dir)
            sources = {split: find_volumes(root / split) for split in ("train", "val", "test")}
        self.samples = {split: [EMSample(source.read()) for source in members] for split, members in sources.items()}

    def train_dataloader(self) -> DataLoader:
        patches = RandomPatches(self.samples["train"], self.patch_size, self.samples_per_epoch, self.seed)
        return DataLoader(
            patches,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _volumes(self, split: str) -> DataLoader:
        return DataLoader([s.item() for s in self.samples[split]], batch_size=1, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._volumes("val")

    def test_dataloader(self) -> DataLoader:
        return self._volumes("test" if "test" in self.samples else "val")


class AffinityLoss(nn.Module):
    """BCE on affinity logits (or MSE of their sigmoid), averaged over the edges ``batch["mask"]`` keeps."""

    def __init__(self, kind: str = "bce") -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown affinity loss {kind!r}; choose from {', '.join(LOSS_KINDS)}")
        self.kind = kind

    def forward(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = batch["affinities"].to(logits.dtype)
        mask = batch.get("mask")
        if self.kind == "bce":
            per_edge = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            per_edge = (torch.sigmoid(logits) - target) ** 2
        if mask is None:
            return per_edge.mean()
        return (per_edge * mask).sum() / mask.sum().clamp_min(1.0)


class VolumeScores(SegmentationScores):
    """:class:`SegmentationScores` segmenting each volume at its own resolution (``batch["resolution"]``)."""

    def update(self, prediction: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        resolution = batch.get("resolution")
        if resolution is not None:
            self.resolution = tuple(float(r) for r in torch.as_tensor(resolution).reshape(-1, 3)[0])
        super().update(prediction, batch)


@register_task
class EMTask(Task):
    name = "em"
    backbone = "unet3d"
    backbone_hparams: ClassVar[Mapping[str, Any]] = {"in_channels": 1, "num_classes": 3}  # 3 = z, y, x affinities
    class_names = ("z_affinity", "y_affinity", "x_affinity")
    input_shape = (1, 32, 32, 32)  # training patches and sliding windows (CPU-small); costs are quoted here
    metric = "vi_sum"  # variation of information, split + merge, bits
    metric_direction = "minimize"
    metric_range = (0.0, 8.0)
    default_space = "em_unet3d"
    loss_kind = "bce"
    # The quick profile sized for this task (docs/benchmarks/em.md, "The default search run"): at the quick
    # profile's 2-4 full-width steps at lr 1e-3 no network learns the affinities and VI ranks nothing. A
    # quarter-width proxy at lr 1e-2 for 64 steps (4 epochs x 64 patches, batch 4) does separate networks
    # (conv3d VI 2.07 / 1.74 bits against csn_ip's 2.59 / 3.08, seeds 0 / 1), at about 18 CPU-seconds. No
    # retraining: in the time left on 2 loaded cores a full-width UNet3D got 3 epochs x 32 patches at lr 1e-2
    # and stayed all-merged (VI 6.71), so the whole time goes to the search and best.yaml is the search's knee.
    profile_overrides: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "quick": {
            "epochs": (4, 8),
            "data_options": {"samples_per_epoch": 64, "batch_size": 4},
            "evaluator_options": {"width": 0.25, "lr": 1e-2},
            "retrain": None,
        }
    }

    def loss(self) -> AffinityLoss:
        return AffinityLoss(self.loss_kind)

    def metrics(self) -> VolumeScores:
        log.info("em: segmenting affinities with %s", SEGMENTATION_BACKEND)
        return VolumeScores(backend=SEGMENTATION_BACKEND)

    def predict(self, net: nn.Module, batch: Batch) -> torch.Tensor:
        """Affinity logits of whole volumes, inferred in task-sized windows (MONAI sliding window)."""
        inferer = SlidingWindowInferer(roi_size=self.input_shape[1:], sw_batch_size=4, overlap=0.25)
        return inferer(batch[self.input_key], net)

    def datamodule(self, data_dir: str | Path | None = None, *, seed: int = 0, **options: Any) -> EMDataModule:
        """Options: ``batch_size``, ``samples_per_epoch``, ``cache_dir``, ``num_workers``."""
        return EMDataModule(data_dir, seed=seed, patch_size=self.input_shape[1:], **options)

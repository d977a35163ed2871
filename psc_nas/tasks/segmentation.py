"""Shared pieces of volumetric segmentation tasks: checked NIfTI reading, loaders, Dice scores.

Training draws random patches (a fixed number per epoch, so an epoch costs the same whatever the
volume size); validation and test yield whole volumes for sliding-window inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.metrics import DiceMetric
from monai.transforms import Compose, EnsureTyped, RandCropByLabelClassesd, RandCropByPosNegLabeld, SpatialPadd

from psc_nas.tasks.base import Batch, DataError


@dataclass(frozen=True)
class Volume:
    """One subject: a z-scored image and its label map, both (1, D, H, W)."""

    name: str
    image: torch.Tensor  # float32
    label: torch.Tensor  # uint8 class indices

    def as_item(self) -> dict[str, object]:
        return {"name": self.name, "image": self.image, "label": self.label}


def read_nifti(path: Path) -> np.ndarray:
    """The 3D array of a NIfTI file; a trailing singleton 4th axis (as IBSR ships) is dropped."""
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        array = np.asanyarray(nib.load(path).dataobj)
    except Exception as err:  # nibabel/gzip/zlib raise many unrelated types for a damaged file
        raise DataError(path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {array.shape}")
    return array


def zscore_within_brain(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the non-zero (skull-stripped brain) voxels; background stays 0."""
    image = image.astype(np.float32)
    brain = image != 0
    if not brain.any():
        return image
    values = image[brain]
    image[brain] = (values - values.mean()) / max(float(values.std()), 1e-8)
    return image


# Labels are stored as uint8 (a real IBSR cohort as int64 would take >1 GB) and widened per batch
# because cross-entropy and one-hot encoding index with int64.
_as_batch = EnsureTyped(["image", "label"], dtype=[torch.float32, torch.long], track_meta=False)


def patch_loader(
    volumes: Sequence[Volume],
    *,
    patch_size: Sequence[int],
    batch_size: int,
    samples_per_epoch: int,
    seed: int,
    num_workers: int = 0,
    num_classes: int | None = None,
) -> DataLoader:
    """Random patches, subjects taken in turn: three of four centred in the brain (label > 0), or,
    with ``num_classes``, centred on each class (background included) equally often, so that a
    small class (IBSR's CSF) is seen from the first steps (MONAI ``RandCropByLabelClassesd``).

    Volumes smaller than a patch are zero-padded (background) so every patch has the same shape.
    """
    keys = ["image", "label"]
    centre = (
        RandCropByLabelClassesd(keys, "label", spatial_size=list(patch_size), num_classes=num_classes)
        if num_classes
        else RandCropByPosNegLabeld(keys, "label", spatial_size=list(patch_size), pos=3, neg=1)
    )
    crop = Compose([SpatialPadd(keys, spatial_size=list(patch_size)), centre, _as_batch])
    crop.set_random_state(seed)
    items = [volumes[i % len(volumes)].as_item() for i in range(samples_per_epoch)]
    return DataLoader(
        Dataset(items, transform=crop),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def volume_loader(volumes: Sequence[Volume], *, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        Dataset([v.as_item() for v in volumes], transform=_as_batch), batch_size=1, num_workers=num_workers
    )


class DiceScores:
    """Per-class Dice (MONAI ``DiceMetric``, background excluded) averaged over the evaluated volumes.

    ``compute()`` gives ``dice_<class>`` for every foreground class and their mean ``dice_mean``.
    A class absent from both a volume's label and its prediction is left out of that class's average.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.names = [name.lower() for name in class_names[1:]]
        self._dice = DiceMetric(include_background=False, reduction="mean_batch", num_classes=len(class_names))

    def reset(self) -> None:
        self._dice.reset()

    def update(self, logits: torch.Tensor, batch: Batch) -> None:
        """``logits`` (N, classes, D, H, W); ``batch["label"]`` (N, 1, D, H, W) class indices."""
        self._dice(y_pred=logits.argmax(1, keepdim=True), y=batch["label"])

    def compute(self) -> dict[str, float]:
        per_class = self._dice.aggregate()
        scores = {f"dice_{name}": float(value) for name, value in zip(self.names, per_class)}
        scores["dice_mean"] = float(per_class.nanmean())
        return scores

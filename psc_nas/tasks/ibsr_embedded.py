"""The IBSR task's default data: a labelled T1 cohort built from real anatomy that ships in packages.

Nothing is downloaded. Two labelled source brains, both in 1 mm MNI space, are resampled onto one
grid (3 mm by default, 51×63×53 voxels; ``spacing=1`` for full resolution):

- ``deepmriprep``: the IBSR atlas (``data/templates/ibsr.nii.gz``), its regions mapped to CSF/GM/WM
  by ``ibsr.csv``, with deepmriprep's skull-stripped T1 template (``Template_05mm_bet.nii.gz``);
  regions listed as both GM and WM (ventral diencephalon) go to the tissue the T1 intensity is nearer.
- ``nilearn``: the MNI152 (2009) T1 template with labels from the arg-max of its GM and WM
  probability maps and CSF = brain mask − GM − WM, skull-stripped by the brain mask.

Each of the 18 subjects is one source (alternating) under its own random deformation (affine plus
elastic), gamma contrast change, smooth bias field and Gaussian noise, all seeded. Brains keep the
size of MNI space (1.87 l before deformation), larger than native-space brains such as IBSR's. Labels are
warped as tissue probabilities and re-labelled by arg-max, which keeps thin cortex from breaking
up the way nearest-neighbour warping of a label map does. Subjects are written in the IBSR V2.0
layout, so they load and split (11 train / 2 val / 5 test) exactly as the real data does.

**What the scores mean:** train, validation and test subjects share the two source anatomies and
differ only in deformation, contrast, bias and noise: no deformation is shared, but no test brain is
new anatomy. Scores on this cohort rank architectures; they are not comparable with scores on IBSR.

The cohort is built once (about a few seconds at 3 mm) into ``$PSC_NAS_CACHE/ibsr-embedded/<params>``
(default ``~/.cache/psc-nas``) by ``build_cache.cached_build``, as the other embedded data sets: a
manifest of the builder version, the parameters and every file's checksum; a stale or corrupt cache
is rebuilt; an interrupted build leaves nothing that looks complete.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import Rand3DElasticd, RandAdjustContrast, RandBiasField, RandGaussianNoise
from scipy import ndimage

from psc_nas.tasks.base import DataError
from psc_nas.tasks.build_cache import cache_root, cached_build

BUILDER_VERSION = 1
SUBJECTS = 18
DEFAULT_SPACING = 3.0  # mm: 51×63×53 voxels, small enough for searches on a CPU
# MNI bounding box (mm) holding the brain of both sources with a few mm to spare.
_BOX_LOW = np.array([-74.0, -110.0, -72.0])
_BOX_HIGH = np.array([74.0, 76.0, 84.0])


def embedded_cohort(cache_dir: str | Path | None = None, *, spacing: float = DEFAULT_SPACING, seed: int = 0) -> Path:
    """Directory, in IBSR V2.0 layout, of the embedded cohort; built if absent, stale or corrupt."""
    if spacing <= 0:
        raise ValueError(f"spacing must be positive (mm), got {spacing!r}")
    params = {"spacing": float(spacing), "seed": int(seed), "subjects": SUBJECTS}
    parent = Path(cache_dir) if cache_dir is not None else cache_root() / "ibsr-embedded"
    return cached_build(
        parent / f"{spacing:g}mm-seed{seed}",
        version=BUILDER_VERSION,
        params=params,
        write=lambda directory: _write_cohort(directory, params),
    )


def _write_cohort(directory: Path, params: dict) -> None:
    grid_affine, grid_shape = _grid(params["spacing"])
    sources = _sources(grid_affine, grid_shape)
    for index in range(params["subjects"]):
        source = sources[index % len(sources)]
        image, label = _subject(*source, spacing=params["spacing"], seed=params["seed"] * 1000 + index)
        name = f"IBSR_{index + 1:02d}"
        (directory / name).mkdir()
        for suffix, array in (("ana_strip", image), ("segTRI_ana", label)):
            relative = f"{name}/{name}_{suffix}.nii.gz"
            nib.save(nib.Nifti1Image(array, grid_affine), directory / relative)


def _grid(spacing: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    shape = tuple(int(n) for n in np.ceil((_BOX_HIGH - _BOX_LOW) / spacing) + 1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = _BOX_LOW
    return affine, shape


def _sources(grid_affine, grid_shape) -> list[tuple[np.ndarray, np.ndarray]]:
    """(T1 image, background/CSF/GM/WM fractions) of each source brain on the grid."""
    return [_deepmriprep_source(grid_affine, grid_shape), _nilearn_source(grid_affine, grid_shape)]


def _resample(volume: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, grid_shape, order: int = 1):
    """``volume`` (world mapping ``affine``) sampled on the grid, low-pass filtered first when shrinking."""
    ratio = np.abs(np.diag(grid_affine)[:3]) / np.abs(np.diag(affine)[:3])
    volume = ndimage.gaussian_filter(volume.astype(np.float32), sigma=np.maximum(ratio - 1, 0) / 2)
    grid_to_source = np.linalg.inv(affine) @ grid_affine
    return ndimage.affine_transform(
        volume, grid_to_source[:3, :3], grid_to_source[:3, 3], output_shape=grid_shape, order=order
    )


def _tissue_on_grid(tissue: np.ndarray, affine: np.ndarray, grid_affine, grid_shape) -> np.ndarray:
    """(4, ...) background/CSF/GM/WM fractions on the grid from (..., 3) CSF/GM/WM fractions."""
    csf, gm, wm = (_resample(tissue[..., c], affine, grid_affine, grid_shape) for c in range(3))
    background = np.clip(1 - csf - gm - wm, 0, 1)
    return np.stack([background, csf, gm, wm])


def _package_file(package: str, relative: str) -> Path:
    # find_spec locates the package without importing it: importing deepmriprep needs
    # dependencies that --no-deps leaves out, and only its data files are used.
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations))) / relative if spec else None
    if path is None or not path.is_file():
        raise DataError(
            path or package, f"needs package data from {package}; install it (pip install --no-deps {package})"
        )
    return path


def _deepmriprep_source(grid_affine, grid_shape) -> tuple[np.ndarray, np.ndarray]:
    atlas_file = _package_file("deepmriprep", "data/templates/ibsr.nii.gz")
    atlas = nib.load(atlas_file)
    regions = np.asanyarray(atlas.dataobj)
    t1_file = nib.load(_package_file("deepmriprep", "data/templates/Template_05mm_bet.nii.gz"))
    # Every second voxel of the 0.5 mm template: 1 mm, the atlas's resolution, at 1/8 of the memory.
    t1 = np.asarray(t1_file.dataobj[::2, ::2, ::2], dtype=np.float32)
    t1_affine = t1_file.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    t1_on_atlas = _resample(t1, t1_affine, atlas.affine, regions.shape)

    with open(atlas_file.with_suffix("").with_suffix(".csv"), newline="") as table:
        rows = list(csv.DictReader(table, delimiter=";"))
    region_tissue = np.zeros((int(regions.max()) + 1, 3), np.float32)  # region -> CSF, GM, WM flags
    for row in rows:
        region_tissue[int(row["ROIid"])] = [int(row["Vcsf"]), int(row["Vgm"]), int(row["Vwm"])]
    tissue = region_tissue[regions]
    mixed = tissue.sum(-1) > 1
    gm_mean, wm_mean = (t1_on_atlas[(tissue[..., c] == 1) & ~mixed].mean() for c in (1, 2))
    tissue[mixed, 2] = t1_on_atlas[mixed] > (gm_mean + wm_mean) / 2
    tissue[mixed, 1] = 1 - tissue[mixed, 2]
    return _resample(t1, t1_affine, grid_affine, grid_shape), _tissue_on_grid(
        tissue, atlas.affine, grid_affine, grid_shape
    )


def _nilearn_source(grid_affine, grid_shape) -> tuple[np.ndarray, np.ndarray]:
    # These loaders read templates bundled inside nilearn; they never download.
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    t1 = load_mni152_template(resolution=1)
    mask = load_mni152_brain_mask(resolution=1).get_fdata()
    gm = load_mni152_gm_template(resolution=1).get_fdata() * mask
    wm = load_mni152_wm_template(resolution=1).get_fdata() * mask
    csf = np.clip(mask - gm - wm, 0, 1)
    image = _resample(t1.get_fdata() * mask, t1.affine, grid_affine, grid_shape)
    return image, _tissue_on_grid(np.stack([csf, gm, wm], axis=-1), t1.affine, grid_affine, grid_shape)


def _subject(image: np.ndarray, tissue: np.ndarray, *, spacing: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic subject: a deformed, re-contrasted, bias-corrupted, noisy skull-stripped T1."""
    # MONAI takes deformations in voxels; these are mm. Smoothing a random field with a Gaussian of
    # sigma voxels shrinks it by ~sigma**1.5, hence the magnitude's steeper scaling. The result is a
    # mean displacement of ~4 mm (up to ~10 mm) at any spacing.
    warp = Rand3DElasticd(
        ["image", "tissue"],
        sigma_range=(15.0 / spacing, 21.0 / spacing),
        magnitude_range=(100.0 * (3.0 / spacing) ** 2.5, 200.0 * (3.0 / spacing) ** 2.5),
        prob=1.0,
        rotate_range=(0.15, 0.15, 0.15),  # radians
        scale_range=(0.08, 0.08, 0.08),
        translate_range=(6.0 / spacing,) * 3,
        padding_mode="zeros",
    )
    warp.set_random_state(seed)
    warped = warp({"image": image[None], "tissue": tissue})
    label = np.asarray(warped["tissue"]).argmax(0).astype(np.uint8)
    intensity = np.clip(np.asarray(warped["image"]), 0, None)
    for step in (
        RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5)),
        RandBiasField(prob=1.0, coeff_range=(0.1, 0.3)),
        RandGaussianNoise(prob=1.0, std=0.03),
    ):
        step.set_random_state(seed)
        intensity = np.asarray(step(intensity))
    return (intensity[0] * (label > 0)).astype(np.float32), label

"""The EM task's default data: synthetic EM-like volumes with dense neuron labels, nothing downloaded.

Nothing ships real labelled EM, so :func:`synthetic_em_volume` draws it (fixed seed):

- **cells fill space**: neurite skeletons (persistent random walks, tubular cells) and a few small
  balls (blobby cells) are placed one after another where the volume is farthest from every
  skeleton; each voxel belongs to its nearest skeleton (one Euclidean distance transform), seen
  through a smooth random warp so boundaries wander. Every cell is one connected component; pieces
  smaller than ``min_cell`` voxels are absorbed by their neighbours. Labels are dense (no 0).
- **appearance**: light cytoplasm with a per-cell grey level and a faint texture; dark membranes on
  both sides of every cell boundary whose contrast fades along smooth random patches (gaps the
  network must bridge from context); dark mitochondria-like blobs and vesicle dots inside cells
  (boundary look-alikes that are not boundaries); Gaussian blur, then Gaussian noise; 8-bit.
- **optional**: anisotropy (sections ``anisotropy``× farther apart than pixels, resolution
  (10·a, 10, 10) nm: everything above is drawn in physical units on that grid, so cells span fewer
  sections and z blur is narrower) and missing sections (whole sections of raw data blacked out, labels
  kept, as in CREMI's defective sections).

:func:`embedded_em` writes train/val/test volumes as CREMI-style HDF5 files, so they load exactly
as real CREMI data does (:mod:`psc_nas.tasks.em_data`), cached with a checksummed manifest
(:mod:`psc_nas.tasks.build_cache`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from psc_nas.tasks.build_cache import cache_root, cached_build
from psc_nas.tasks.em_data import LABELS_KEY, RAW_KEY

BUILDER_VERSION = 1
SPLITS = {"train": 4, "val": 1, "test": 1}
DEFAULT_SHAPE = (48, 96, 96)  # D, H, W: 442k voxels per volume
VOXEL_NM = 10.0  # the PSC paper's FIB-SEM data is isotropic 10 nm


def embedded_em(
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    anisotropy: int = 1,
    missing_sections: float = 0.0,
) -> Path:
    """Directory with ``train/``, ``val/`` and ``test/`` CREMI-style volumes; built if absent or stale."""
    params = {
        "seed": int(seed),
        "shape": [int(s) for s in shape],
        "anisotropy": int(anisotropy),
        "missing_sections": float(missing_sections),
        "splits": SPLITS,
    }
    variant = f"{'x'.join(map(str, shape))}-a{anisotropy}-m{missing_sections:g}-seed{seed}"
    target = (Path(cache_dir) if cache_dir is not None else cache_root() / "em-embedded") / variant

    def write(directory: Path) -> None:
        index = 0
        for split, count in SPLITS.items():
            (directory / split).mkdir()
            for _ in range(count):
                raw, labels = synthetic_em_volume(
                    shape, seed=seed * 1000 + index, anisotropy=anisotropy, missing_sections=missing_sections
                )
                write_cremi(
                    directory / split / f"volume_{index:02d}.hdf",
                    raw,
                    labels,
                    (VOXEL_NM * anisotropy, VOXEL_NM, VOXEL_NM),
                )
                index += 1

    return cached_build(target, version=BUILDER_VERSION, params=params, write=write)


def write_cremi(path: Path, raw: np.ndarray, labels: np.ndarray, resolution) -> None:
    import h5py

    with h5py.File(path, "w") as file:
        for key, data in ((RAW_KEY, raw), (LABELS_KEY, labels)):
            dataset = file.create_dataset(key, data=data, compression="gzip")
            dataset.attrs["resolution"] = np.asarray(resolution, np.float64)


def synthetic_em_volume(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    *,
    seed: int = 0,
    cell_diameter: float = 14.0,
    anisotropy: int = 1,
    missing_sections: float = 0.0,
    noise: float = 0.09,
    min_cell: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8, neuron ids uint32), both ``shape`` (D, H, W); same seed, same volume."""
    if anisotropy < 1 or not 0 <= missing_sections < 1:
        raise ValueError(
            f"anisotropy must be >= 1 and missing_sections in [0, 1), got {anisotropy}, {missing_sections}"
        )
    rng = np.random.default_rng(seed)
    spacing = np.array([anisotropy, 1.0, 1.0])  # voxel size in units of a pixel
    labels = _cells(tuple(shape), spacing, rng, cell_diameter, min_cell)
    raw = _appearance(labels, spacing, rng, cell_diameter)
    raw = raw + rng.normal(0.0, noise, raw.shape)
    sections = rng.random(shape[0]) < missing_sections
    raw[sections] = 0.0
    return (np.clip(raw, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.uint32)


def _cells(shape, spacing: np.ndarray, rng: np.random.Generator, diameter: float, min_cell: int) -> np.ndarray:
    """Dense neuron ids; lengths (``diameter``, walks, warp) in pixel units, converted by ``spacing``."""
    from skimage.measure import label as connected_components
    from skimage.segmentation import expand_labels

    skeletons = np.zeros(shape, np.int32)
    bundle = rng.normal(size=3)  # neurites run roughly along one direction, as axons in a tract do
    bundle /= np.linalg.norm(bundle)
    distance = np.ones(shape)
    ids = 0
    while distance.max() >= 0.8 * diameter or ids == 0:
        # start new cells where there are none, a few per distance transform, a diameter apart
        far = np.stack(np.nonzero(distance >= 0.7 * distance.max()), 1) * spacing  # physical positions
        for _ in range(8):
            if not len(far):
                break
            start = far[rng.integers(len(far))]
            far = far[np.linalg.norm(far - start, axis=1) > diameter]
            ids += 1
            if rng.random() < 0.8:
                _draw_neurite(skeletons, spacing, start, bundle, ids, rng)
            else:
                _draw_ball(skeletons, spacing, start, rng.uniform(1.5, 3.5), ids)
        distance = ndimage.distance_transform_edt(skeletons == 0, sampling=spacing)
    # each voxel takes the id of its nearest skeleton voxel, looked up through a smooth warp
    _, nearest = ndimage.distance_transform_edt(skeletons == 0, sampling=spacing, return_indices=True)
    grid = np.indices(shape, dtype=np.float32)
    warp = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, shape), diameter / 3 / spacing) for _ in range(3)])
    warp *= (0.25 * diameter / max(float(np.abs(warp).max()), 1e-6)) / spacing.reshape(3, 1, 1, 1)
    lookup = np.clip(np.round(grid + warp).astype(np.int64), 0, np.array(shape).reshape(3, 1, 1, 1) - 1)
    labels = skeletons[tuple(nearest[(slice(None), *lookup)])]
    labels = connected_components(labels, background=-1, connectivity=1)  # one id per connected piece
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < min_cell] = 0
    labels = expand_labels(labels, distance=diameter, spacing=spacing)  # small pieces join their neighbours
    _, dense = np.unique(labels, return_inverse=True)
    return dense.reshape(shape).astype(np.uint32) + 1


def _draw_neurite(
    skeletons: np.ndarray,
    spacing: np.ndarray,
    start: np.ndarray,
    bundle: np.ndarray,
    cell: int,
    rng: np.random.Generator,
) -> None:
    """A persistent random walk through ``start`` near the ``bundle`` direction, drawn both ways
    until it leaves the volume."""
    extent = (np.array(skeletons.shape) - 1) * spacing
    heading = bundle + 0.7 * rng.normal(size=3)
    heading /= np.linalg.norm(heading)
    for direction in (heading, -heading):
        point, step = start.copy(), direction.copy()
        while np.all(point >= 0) and np.all(point <= extent):
            skeletons[tuple(np.round(point / spacing).astype(int))] = cell
            step = step + rng.normal(0, 0.05, 3)
            step /= np.linalg.norm(step)
            point += 0.5 * step


def _draw_ball(skeletons: np.ndarray, spacing: np.ndarray, centre: np.ndarray, radius: float, cell: int) -> None:
    low = np.maximum(np.floor((centre - radius) / spacing).astype(int), 0)
    high = np.minimum(np.ceil((centre + radius) / spacing).astype(int) + 1, skeletons.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    grid = (np.indices(high - low) + low.reshape(3, 1, 1, 1)) * spacing.reshape(3, 1, 1, 1)
    inside = ((grid - centre.reshape(3, 1, 1, 1)) ** 2).sum(0) <= radius**2
    skeletons[box][inside] = cell


def _appearance(labels: np.ndarray, spacing: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    cells = int(labels.max()) + 1
    cytoplasm = rng.uniform(0.62, 0.8, cells).astype(np.float32)[labels]
    cytoplasm += 0.04 * _smooth_noise(labels.shape, 2.0 / spacing, rng)
    # membranes: both sides of every boundary, contrast fading over smooth patches (gaps)
    membrane = find_boundaries(labels, connectivity=1, mode="thick")
    # full contrast over ~85% of the membrane surface, fading to 0.15 where the smooth field is high
    contrast = np.clip(2.0 - _smooth_noise(labels.shape, diameter / 2 / spacing, rng), 0.15, 1.0)
    raw = np.where(membrane, cytoplasm - 0.45 * contrast, cytoplasm)
    # organelles inside cells: mitochondria (dark blobs) and vesicles (small dark dots)
    volume = labels.size * float(np.prod(spacing))  # in cubic pixels
    for count, radius, darkness in ((int(volume // 6000), 2.5, 0.3), (int(volume // 800), 0.9, 0.22)):
        centres = np.stack([rng.integers(0, s, count) for s in labels.shape], 1)
        marks = np.zeros(labels.shape, bool)
        marks[tuple(centres.T)] = True
        distance, nearest = ndimage.distance_transform_edt(~marks, sampling=spacing, return_indices=True)
        blobs = distance <= radius
        own_cell = labels == labels[tuple(nearest)]  # an organelle stays inside the cell it sits in
        raw = np.where(blobs & own_cell & ~membrane, raw - darkness, raw)
    return ndimage.gaussian_filter(raw, 0.8 / spacing)


def _smooth_noise(shape, sigma, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean noise smoothed over ``sigma`` voxels, scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma)
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)

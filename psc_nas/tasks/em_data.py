"""Reading labelled EM volumes: CREMI-style HDF5 files and raw+label TIFF/NIfTI pairs.

A directory holds any mix of

    <name>.hdf | .h5 | .hdf5        CREMI layout: ``volumes/raw`` and ``volumes/labels/neuron_ids``,
                                     each with an optional ``resolution`` attribute (nm, z y x)
    <name>_raw.tif  + <name>_labels.tif          sections stacked along the first axis (z, y, x)
    <name>_raw.nii.gz + <name>_labels.nii.gz     (also .nii); NIfTI (x, y, z) is transposed to (z, y, x)

Every volume is returned as (D, H, W) = (z, y, x): the section axis first, matching the N×C×D×H×W
tensors and the (z, y, x) order of the affinity channels (:mod:`psc_nas.tasks.em_segmentation`).
Raw data becomes float32 in [0, 1] (integer types divided by their maximum; float data kept as is).
Neuron ids are relabelled to consecutive uint32 ids; 0 means "no neuron" (background/boundary) and
so does CREMI's 0xffffffffffffffff. Anything else in a file that cannot be used is a
:class:`~psc_nas.tasks.base.DataError` naming that file.

**Anisotropy.** CREMI sections are 40 nm apart with 4×4 nm pixels. Volumes are kept at their native
resolution (resampling labels across 10× would invent or erase thin neurites); ``resolution`` travels
with the volume, and :func:`pooling_factors` turns it into the UNet3D's per-level ``downsample``
factors, pooling only the finely sampled axes until the voxels are near-isotropic (the rule nnU-Net
uses; Funke et al. pool CREMI by 1×3×3 likewise). Anisotropic 1x3x3 kernels at the fine levels are then
the search's to find: PmSCn and CAKES orientations include them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from psc_nas.tasks.base import DataError

RAW_KEY = "volumes/raw"
LABELS_KEY = "volumes/labels/neuron_ids"
HDF5_SUFFIXES = (".hdf", ".h5", ".hdf5")
PAIR_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz")
CREMI_UNLABELLED = np.iinfo(np.uint64).max

Resolution = tuple[float, float, float]


@dataclass(frozen=True)
class EMVolume:
    """One labelled volume, (D, H, W) = (z, y, x)."""

    name: str
    raw: np.ndarray  # float32 in [0, 1]
    labels: np.ndarray  # uint32 consecutive neuron ids, 0 = no neuron
    resolution: Resolution  # nm (or any unit) per voxel along D, H, W


@dataclass(frozen=True)
class VolumeSource:
    """Where one volume is stored: one HDF5 file (``raw == labels``) or a raw and a label file."""

    name: str
    raw: Path
    labels: Path

    def read(self) -> EMVolume:
        if self.raw == self.labels:
            return read_cremi(self.raw, name=self.name)
        return read_pair(self.raw, self.labels, name=self.name)


def find_volumes(directory: str | Path) -> list[VolumeSource]:
    """The volumes in ``directory`` sorted by name; a ``*_raw`` file without its ``*_labels`` is an error."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataError(directory, "EM data directory not found")
    sources = []
    for path in sorted(directory.iterdir()):
        suffix = _suffix(path)
        if path.suffix in HDF5_SUFFIXES:
            sources.append(VolumeSource(path.stem, path, path))
        elif suffix in PAIR_SUFFIXES and path.name.endswith(f"_raw{suffix}"):
            name = path.name[: -len(f"_raw{suffix}")]
            labels = path.with_name(f"{name}_labels{suffix}")
            if not labels.is_file():
                raise DataError(path, f"raw volume without its label volume {labels.name}")
            sources.append(VolumeSource(name, path, labels))
    if not sources:
        raise DataError(
            directory, "no EM volumes (CREMI-style .hdf/.h5/.hdf5, or <name>_raw + <name>_labels .tif/.nii[.gz])"
        )
    return sources


def read_cremi(path: str | Path, *, name: str | None = None) -> EMVolume:
    """A CREMI-style HDF5 volume. Labels with an ``offset`` attribute (nm, as CREMI's padded files
    have) select their region of a larger raw volume."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with h5py.File(path, "r") as file:
            raw_set, labels_set = (_dataset(file, key, path) for key in (RAW_KEY, LABELS_KEY))
            resolution = _resolution(labels_set.attrs.get("resolution", raw_set.attrs.get("resolution")), path)
            region = _labelled_region(raw_set.shape, labels_set, resolution, path)
            raw, labels = _checked(raw_set[region], labels_set[()], path, path)
    except OSError as err:  # h5py reports a file that is not HDF5 (or is truncated) as OSError
        raise DataError(path, f"not a readable HDF5 file ({err})") from None
    return EMVolume(name or path.stem, raw, labels, resolution)


def read_pair(raw_path: str | Path, labels_path: str | Path, *, name: str | None = None) -> EMVolume:
    """A raw and a label volume in TIFF or NIfTI files; the resolution is read from the raw file."""
    raw_path, labels_path = Path(raw_path), Path(labels_path)
    raw, resolution = _read_array(raw_path)
    labels, _ = _read_array(labels_path)
    raw, labels = _checked(raw, labels, raw_path, labels_path)
    return EMVolume(name or raw_path.name.split("_raw")[0], raw, labels, resolution)


def pooling_factors(resolution: Sequence[float], levels: int) -> list[list[int]]:
    """Per-level (D, H, W) pooling factors of 1 or 2 for a UNet3D on data of this resolution.

    An axis is pooled at a level only while its voxel size is less than half the coarsest one,
    so anisotropic data is first pooled in-plane until it is near-isotropic, then isotropically:
    CREMI's (40, 4, 4) gives [1,2,2], [1,2,2], [1,2,2], [2,2,2] (voxels 40×32×32 before the last).
    """
    spacing = [float(s) for s in resolution]
    factors = []
    for _ in range(levels):
        coarsest = max(spacing)
        level = [2 if 2 * s <= coarsest else 1 for s in spacing]
        if level == [1, 1, 1]:  # near-isotropic: pool every axis
            level = [2, 2, 2]
        spacing = [s * f for s, f in zip(spacing, level)]
        factors.append(level)
    return factors


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def _dataset(file, key: str, path: Path):
    import h5py

    found = file.get(key)
    if not isinstance(found, h5py.Dataset):
        present = []
        file.visititems(lambda name, item: present.append(name) if isinstance(item, h5py.Dataset) else None)
        raise DataError(path, f"no dataset {key!r} (datasets: {', '.join(present) or 'none'})")
    return found


def _resolution(value, path: Path) -> Resolution:
    if value is None:
        return (1.0, 1.0, 1.0)
    values = np.asarray(value, dtype=np.float64).ravel() if np.size(value) else np.zeros(0)
    if values.shape != (3,) or not np.all(values > 0):
        raise DataError(path, f"resolution must be three positive numbers (z, y, x), got {np.asarray(value).tolist()}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _labelled_region(raw_shape, labels_set, resolution: Resolution, path: Path) -> tuple[slice, ...]:
    offset = labels_set.attrs.get("offset")
    if offset is None:  # without an offset, labels cover the raw volume exactly (checked by the caller)
        return (slice(None),) * len(raw_shape)
    start = [round(o / r) for o, r in zip(np.ravel(offset), resolution)]
    region = tuple(slice(s, s + n) for s, n in zip(start, labels_set.shape))
    if len(raw_shape) != 3 or any(r.stop > n or r.start < 0 for r, n in zip(region, raw_shape)):
        raise DataError(
            path, f"{LABELS_KEY} {labels_set.shape} at voxel offset {start} lies outside {RAW_KEY} {raw_shape}"
        )
    return region


def _read_array(path: Path) -> tuple[np.ndarray, Resolution]:
    if not path.is_file():
        raise DataError(path, "file not found")
    suffix = _suffix(path)
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            image = nib.load(path)
            array = np.asanyarray(image.dataobj)
            zooms = image.header.get_zooms()
            if array.ndim == 4 and array.shape[3] == 1:  # a trailing singleton (time) axis
                array = array[..., 0]
            array = array.transpose(2, 1, 0) if array.ndim == 3 else array
            resolution = tuple(float(z) for z in zooms[:3][::-1])
        else:
            array, resolution = _read_tiff(path)
    except DataError:
        raise
    except Exception as err:  # the readers raise many unrelated types for a damaged file
        raise DataError(path, f"not a readable {suffix} file ({type(err).__name__}: {err})") from None
    if array.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {array.shape}")
    return array, _resolution(resolution, path)


def _read_tiff(path: Path) -> tuple[np.ndarray, Resolution]:
    """Sections of a TIFF stack; z spacing from ImageJ metadata, pixel size from the resolution tags."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        array = tif.asarray()
        page = tif.pages[0]
        z = float((tif.imagej_metadata or {}).get("spacing", 1.0))
        y, x = (_pixel_size(page.tags.get(tag)) for tag in ("YResolution", "XResolution"))
    return array, (z, y, x)


def _pixel_size(tag) -> float:
    """The pixel size from a TIFF resolution tag (pixels per unit, a rational); 1 when absent."""
    if tag is None:
        return 1.0
    numerator, denominator = tag.value
    return float(denominator / numerator) if numerator else 1.0


def _checked(raw: np.ndarray, labels: np.ndarray, raw_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    if raw.ndim != 3:
        raise DataError(raw_path, f"raw data must be a 3D volume, got shape {raw.shape}")
    if labels.shape != raw.shape:
        raise DataError(labels_path, f"labels have shape {labels.shape} but raw data has shape {raw.shape}")
    if raw.dtype.kind not in "uif":
        raise DataError(raw_path, f"raw data must be integer or float intensities, got dtype {raw.dtype}")
    if labels.dtype.kind not in "ui":
        raise DataError(labels_path, f"neuron labels must be integer ids, got dtype {labels.dtype}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise DataError(labels_path, f"neuron labels must be non-negative ids, found {labels.min()}")
    if raw.dtype.kind == "f":
        intensities = raw.astype(np.float32)
        if not np.isfinite(intensities).all():
            raise DataError(raw_path, "raw data contains NaN or infinite values")
    else:
        intensities = raw.astype(np.float32) / max(float(np.iinfo(raw.dtype).max), 1.0)
    return intensities, relabel(labels)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive uint32 ids in order of the original ids; 0 and CREMI's unlabelled id become 0."""
    ids, inverse = np.unique(labels, return_inverse=True)
    background = (ids == 0) | (ids == CREMI_UNLABELLED)
    new_ids = np.cumsum(~background, dtype=np.uint32) * ~background
    return new_ids[inverse].reshape(labels.shape)

"""EM groundwork: readers and their errors, affinities, watershed + agglomeration, VI, the embedded volumes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from psc_nas.tasks import DataError
from psc_nas.tasks.em_data import (
    CREMI_UNLABELLED,
    LABELS_KEY,
    RAW_KEY,
    find_volumes,
    pooling_factors,
    read_cremi,
    read_pair,
)
from psc_nas.tasks.em_embedded import embedded_em, synthetic_em_volume
from psc_nas.tasks.em_segmentation import (
    SegmentationScores,
    affinities_from_labels,
    score_segmentation,
    segment_affinities,
    watershed_fragments,
)

SHAPE = (6, 10, 12)


def blocks(shape=SHAPE) -> np.ndarray:
    """Four neurons: the volume cut in halves along H and along W."""
    labels = np.zeros(shape, np.uint64)
    labels[:, : shape[1] // 2, : shape[2] // 2] = 7
    labels[:, : shape[1] // 2, shape[2] // 2 :] = 2**40
    labels[:, shape[1] // 2 :, : shape[2] // 2] = 3
    labels[:, shape[1] // 2 :, shape[2] // 2 :] = 12
    return labels


def write_cremi(path: Path, raw, labels, *, resolution=(40.0, 4.0, 4.0), label_attrs=None) -> Path:
    with h5py.File(path, "w") as file:
        file.create_dataset(RAW_KEY, data=raw).attrs["resolution"] = resolution
        dataset = file.create_dataset(LABELS_KEY, data=labels)
        dataset.attrs["resolution"] = resolution
        for key, value in (label_attrs or {}).items():
            dataset.attrs[key] = value
    return path


def raw_like(shape=SHAPE, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape).astype(dtype)


def stardist_labels() -> np.ndarray:
    """Real 3D instance labels (nuclei, 31×61×57) shipped inside the stardist package."""
    spec = importlib.util.find_spec("stardist")
    assert spec is not None, "install the test data package: pip install --no-deps stardist"
    path = Path(next(iter(spec.submodule_search_locations))) / "data/images/mask3d.tif"
    return read_pair(path, path).labels  # read through the EM reader, as any TIFF label volume


# --- readers -----------------------------------------------------------------------------------


def test_cremi_file_is_read_with_resolution_and_relabelled_ids(tmp_path):
    labels = blocks()
    labels[0, 0, 0] = CREMI_UNLABELLED
    raw = raw_like()
    volume = read_cremi(write_cremi(tmp_path / "sample_A.hdf", raw, labels))
    assert volume.name == "sample_A" and volume.resolution == (40.0, 4.0, 4.0)
    assert volume.raw.dtype == np.float32 and np.allclose(volume.raw, raw / 255.0)
    assert volume.labels.dtype == np.uint32
    # ids in the order of the original ids, CREMI's "no label" becomes background 0
    assert volume.labels[0, 0, 0] == 0 and volume.labels[0, 0, 1] == 2  # 7 is the second smallest id
    assert sorted(np.unique(volume.labels)) == [0, 1, 2, 3, 4]
    assert volume.labels[0, 0, -1] == 4  # 2**40, the largest


def test_cremi_labels_with_an_offset_select_their_region_of_padded_raw(tmp_path):
    raw = raw_like((10, 20, 24))
    labels = blocks()
    path = write_cremi(
        tmp_path / "padded.hdf", raw, labels, resolution=(40.0, 4.0, 4.0), label_attrs={"offset": (80.0, 16.0, 20.0)}
    )
    volume = read_cremi(path)
    assert np.allclose(volume.raw, raw[2:8, 4:14, 5:17] / 255.0)


def bad_cremi(tmp_path, case) -> Path:
    path = tmp_path / f"{case}.hdf"
    if case == "missing dataset":
        with h5py.File(path, "w") as file:
            file.create_dataset(RAW_KEY, data=raw_like())
    elif case == "shape mismatch":
        write_cremi(path, raw_like(), blocks((6, 10, 10)))
    elif case == "float labels":
        write_cremi(path, raw_like(), blocks().astype(np.float32))
    elif case == "negative labels":
        write_cremi(path, raw_like(), blocks().astype(np.int64) - 5)
    elif case == "boolean raw":
        write_cremi(path, raw_like() > 100, blocks())
    elif case == "2D raw":
        write_cremi(path, raw_like((10, 12)), blocks()[0])
    elif case == "bad resolution":
        write_cremi(path, raw_like(), blocks(), resolution=(40.0, 0.0, 4.0))
    elif case == "offset outside":
        write_cremi(path, raw_like(), blocks(), label_attrs={"offset": (40.0, 0.0, 0.0)})
    elif case == "not HDF5":
        path.write_bytes(b"this is not an HDF5 file" * 10)
    elif case == "truncated":
        write_cremi(path, raw_like(), blocks())
        path.write_bytes(path.read_bytes()[:1000])
    return path


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("missing dataset", "no dataset 'volumes/labels/neuron_ids' (datasets: volumes/raw)"),
        ("shape mismatch", "labels have shape (6, 10, 10) but raw data has shape (6, 10, 12)"),
        ("float labels", "neuron labels must be integer ids, got dtype float32"),
        ("negative labels", "must be non-negative ids, found -2"),
        ("boolean raw", "raw data must be integer or float intensities, got dtype bool"),
        ("2D raw", "raw data must be a 3D volume, got shape (10, 12)"),
        ("bad resolution", "resolution must be three positive numbers"),
        ("offset outside", "at voxel offset [1, 0, 0] lies outside volumes/raw (6, 10, 12)"),
        ("not HDF5", "not a readable HDF5 file"),
        ("truncated", "not a readable HDF5 file"),
    ],
)
def test_bad_cremi_files_fail_in_one_line_naming_the_file(tmp_path, case, says):
    path = bad_cremi(tmp_path, case)
    with pytest.raises(DataError) as error:
        read_cremi(path)
    assert str(error.value).startswith(f"{path}: ") and says in str(error.value)
    assert "\n" not in str(error.value)


def test_tiff_and_nifti_pairs_are_read_as_z_y_x_with_their_resolution(tmp_path):
    labels = blocks().astype(np.uint16)
    raw = raw_like()
    tifffile.imwrite(
        tmp_path / "stack_raw.tif", raw, imagej=True, resolution=(1 / 4.0, 1 / 4.0), metadata={"spacing": 40.0}
    )
    tifffile.imwrite(tmp_path / "stack_labels.tif", labels, imagej=True)
    # NIfTI stores (x, y, z): the same volume transposed, with zooms (x, y, z)
    affine = np.diag([6.0, 6.0, 30.0, 1.0])
    nib.save(nib.Nifti1Image(raw.transpose(2, 1, 0).copy(), affine), tmp_path / "brainbow_raw.nii.gz")
    nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0).copy(), affine), tmp_path / "brainbow_labels.nii.gz")
    (tmp_path / "notes.txt").write_text("not a volume")

    sources = find_volumes(tmp_path)
    assert [s.name for s in sources] == ["brainbow", "stack"]
    nifti, tiff = (s.read() for s in sources)
    assert tiff.resolution == pytest.approx((40.0, 4.0, 4.0)) and nifti.resolution == (30.0, 6.0, 6.0)
    for volume in (tiff, nifti):
        assert volume.raw.shape == SHAPE and np.allclose(volume.raw, raw / 255.0)
        assert np.array_equal(volume.labels > 0, labels > 0) and len(np.unique(volume.labels)) == 4


def test_pair_errors_name_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "a_raw.tif", raw_like())
    with pytest.raises(DataError, match="a_raw.tif: raw volume without its label volume a_labels.tif"):
        find_volumes(tmp_path)
    tifffile.imwrite(tmp_path / "a_labels.tif", blocks((6, 10, 11)).astype(np.uint16))
    with pytest.raises(DataError, match=r"a_labels.tif: labels have shape \(6, 10, 11\)"):
        find_volumes(tmp_path)[0].read()
    (tmp_path / "a_labels.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match=r"a_labels.tif: not a readable .tif file"):
        find_volumes(tmp_path)[0].read()
    with pytest.raises(DataError, match="a_raw.tif: EM data directory not found"):
        find_volumes(tmp_path / "a_raw.tif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no EM volumes"):
        find_volumes(tmp_path / "empty")


def test_anisotropic_data_is_pooled_in_plane_until_near_isotropic():
    assert pooling_factors((40, 4, 4), 4) == [[1, 2, 2], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert pooling_factors((10, 10, 10), 3) == [[2, 2, 2]] * 3
    assert pooling_factors((30, 10, 10), 3) == [[1, 2, 2], [2, 2, 2], [2, 2, 2]]


# --- affinities, segmentation, scores ----------------------------------------------------------


def test_affinities_link_a_voxel_to_its_predecessor_within_one_neuron():
    labels = np.array([[[1, 1, 2], [1, 0, 2]]], np.uint32)  # (D=1, H=2, W=3)
    affinities, mask = affinities_from_labels(labels)
    assert affinities.shape == mask.shape == (3, 1, 2, 3)
    assert not affinities[0].any() and not mask[0].any()  # one section: no z edges
    assert affinities[1, 0].tolist() == [[0, 0, 0], [1, 0, 1]]  # y edges: (1,x) with (0,x); background never links
    assert affinities[2, 0].tolist() == [[0, 1, 0], [0, 0, 0]]  # x edges: (y,x) with (y,x-1)
    assert mask[1, 0].tolist() == [[0, 0, 0], [1, 1, 1]] and mask[2, 0].tolist() == [[0, 1, 1], [0, 1, 1]]


@pytest.mark.parametrize("backend", ["waterz", "skimage"])
def test_vi_on_real_instance_labels(backend):
    """Nuclei nobody here drew: perfect affinities score VI ~0, degraded ones clearly worse, and a
    merge and a split move the right half of VI."""
    truth = stardist_labels()
    affinities, _ = affinities_from_labels(truth)
    perfect = segment_affinities(affinities, (0.5,), backend=backend)
    assert perfect.backend == backend
    assert score_segmentation(perfect.segmentations[0], truth)["vi_sum"] < 0.05

    rng = np.random.default_rng(0)
    smooth_noise = ndimage.gaussian_filter(rng.normal(0, 2.5, affinities.shape), (0, 1, 1, 1))
    degraded = segment_affinities(np.clip(affinities + smooth_noise, 0, 1), (0.3, 0.5, 0.7), backend=backend)
    scores = [score_segmentation(s, truth) for s in degraded.segmentations]
    assert min(s["vi_sum"] for s in scores) > 0.05

    two_nuclei = np.unique(truth[truth > 0])[:2]
    merged = np.where(truth == two_nuclei[1], two_nuclei[0], truth)
    split = truth.astype(np.int64) + 1000 * ((truth == two_nuclei[0]) & (np.arange(truth.shape[2]) % 2 == 0))
    merge_score, split_score = score_segmentation(merged, truth), score_segmentation(split, truth)
    assert merge_score["vi_merge"] > 0.01 and merge_score["vi_split"] < 1e-9
    assert split_score["vi_split"] > 0.01 and split_score["vi_merge"] < 1e-9
    assert score_segmentation(np.where(truth == 0, 99, truth), truth)["vi_sum"] < 1e-9  # truth's 0 is ignored


def test_both_backends_agglomerate_the_same_fragments_identically():
    truth = stardist_labels()
    affinities, _ = affinities_from_labels(truth)
    rng = np.random.default_rng(1)
    # continuous values: no exact ties, whose merge order the two implementations may break differently
    noisy = 1 / (1 + np.exp(-(6 * affinities - 3) - rng.normal(0, 1.5, affinities.shape)))
    fragments = watershed_fragments(noisy)
    before = fragments.copy()
    thresholds = (0.95, 0.7, 0.5, 0.3)
    by_waterz = segment_affinities(noisy, thresholds, backend="waterz", fragments=fragments)
    by_skimage = segment_affinities(noisy, thresholds, backend="skimage", fragments=fragments)
    assert np.array_equal(fragments, before)  # waterz agglomerates in place; the caller's array is untouched
    counts = []
    for a, b in zip(by_waterz.segmentations, by_skimage.segmentations):
        assert np.array_equal(a == 0, b == 0)
        assert score_segmentation(a.astype(np.int64) + 1, b.astype(np.int64) + 1)["vi_sum"] < 1e-9
        counts.append(len(np.unique(a)))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]  # lower thresholds merge more


def test_waterz_keeps_quiet_and_bad_arguments_are_refused(capfd):
    affinities, _ = affinities_from_labels(blocks().astype(np.uint32))
    segment_affinities(affinities, (0.5,), backend="waterz")
    assert capfd.readouterr().out == ""
    with pytest.raises(ValueError, match="unknown segmentation backend 'mws'"):
        segment_affinities(affinities, backend="mws")
    with pytest.raises(ValueError, match=r"affinities must have shape \(3, D, H, W\)"):
        segment_affinities(affinities[:2])
    with pytest.raises(ValueError, match="thresholds must be merge affinities in"):
        segment_affinities(affinities, (1.5,))


def test_segmentation_scores_pick_the_best_threshold_over_volumes():
    truth = torch.from_numpy(blocks().astype(np.int64))
    affinities, _ = affinities_from_labels(truth.numpy())
    logits = torch.from_numpy(np.where(affinities > 0, 6.0, -6.0).astype(np.float32))
    unsure = logits.clone()
    unsure[2, :, 5:, 6] = 0.0  # affinity 0.5 across the boundary of the lower two neurons
    scores = SegmentationScores(thresholds=(0.4, 0.7), backend="skimage")
    with pytest.raises(ValueError, match="before any update"):
        scores.compute()
    batch = {SegmentationScores.LABELS: torch.stack([truth, truth])[:, None]}
    scores.update(torch.stack([logits, unsure]), batch)
    result = scores.compute()
    assert set(result) == {"vi_split", "vi_merge", "vi_sum", "arand", "merge_threshold"}
    assert result["merge_threshold"] == 0.7 and result["vi_sum"] < 1e-9  # 0.4 merges across the 0.5s
    scores.reset()
    scores.update(unsure[None], {SegmentationScores.LABELS: truth[None]})
    assert scores.compute()["merge_threshold"] == 0.7
    only_low = SegmentationScores(thresholds=(0.4,), backend="skimage")
    only_low.update(unsure[None], {SegmentationScores.LABELS: truth[None]})
    assert only_low.compute()["vi_merge"] > 0.3  # two of four equal neurons merged: 0.5 bit


# --- embedded volumes --------------------------------------------------------------------------


def test_synthetic_volume_is_dense_em_like_and_hard_for_a_naive_boundary_detector():
    raw, labels = synthetic_em_volume((24, 64, 64), seed=3)
    again = synthetic_em_volume((24, 64, 64), seed=3)
    assert np.array_equal(raw, again[0]) and np.array_equal(labels, again[1])
    assert raw.dtype == np.uint8 and labels.dtype == np.uint32 and labels.min() == 1  # dense: every voxel a neuron
    ids = np.unique(labels)
    assert 15 <= len(ids) <= 400
    for cell in ids[:10]:
        assert ndimage.label(labels == cell)[1] == 1  # one connected piece per neuron
    boundary = ndimage.morphological_gradient(labels.astype(np.int64), size=3) > 0
    assert raw[boundary].mean() < raw[~boundary].mean() - 30  # dark membranes

    affinities, _ = affinities_from_labels(labels)
    assert score_segmentation(segment_affinities(affinities, (0.5,)).segmentations[0], labels)["vi_sum"] < 1e-9
    # a "network" that reads boundaries off smoothed intensity alone is far off
    smoothed = ndimage.gaussian_filter(raw.astype(np.float32) / 255, 1.0)
    naive = np.stack([np.minimum(smoothed, np.roll(smoothed, 1, axis)) for axis in range(3)])
    naive = np.clip((naive - 0.3) / 0.4, 0, 1)
    result = segment_affinities(naive, (0.3, 0.5, 0.7))
    assert min(score_segmentation(s, labels)["vi_sum"] for s in result.segmentations) > 1.5


def test_anisotropy_and_missing_sections():
    raw, labels = synthetic_em_volume((16, 32, 32), seed=1, anisotropy=4, missing_sections=0.3)
    assert raw.shape == labels.shape == (16, 32, 32)
    missing = (raw == 0).all(axis=(1, 2))
    assert 1 <= missing.sum() <= 10 and labels[missing].min() > 0  # labels stay where raw data is lost


def test_embedded_volumes_are_cremi_files_built_once(tmp_path):
    root = embedded_em(tmp_path, shape=(8, 32, 32), anisotropy=2)
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "test", "train", "val"]
    assert [len(find_volumes(root / split)) for split in ("train", "val", "test")] == [4, 1, 1]
    volume = find_volumes(root / "val")[0].read()
    assert volume.resolution == (20.0, 10.0, 10.0) and volume.raw.shape == (8, 32, 32)
    stamp = os.stat(root / "train" / "volume_00.hdf").st_mtime_ns
    assert embedded_em(tmp_path, shape=(8, 32, 32), anisotropy=2) == root
    assert os.stat(root / "train" / "volume_00.hdf").st_mtime_ns == stamp  # reused
    (root / "test" / "volume_05.hdf").write_bytes(b"damaged")
    assert embedded_em(tmp_path, shape=(8, 32, 32), anisotropy=2) == root
    assert find_volumes(root / "test")[0].read().raw.shape == (8, 32, 32)  # rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build left behind

"""IBSR task: the IBSR V2.0 layout reader and split, its errors, the embedded cohort and its cache."""

from __future__ import annotations

import gzip
import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from psc_nas.tasks import DataError, get_task, ibsr_embedded
from psc_nas.tasks.ibsr import IBSRDataModule
from psc_nas.tasks.ibsr_embedded import embedded_cohort

SHAPE = (12, 10, 14)


def write_subject(root, number, *, shape=SHAPE, labels=None, seed=0):
    """One IBSR_NN subject as IBSR ships it: 4D (x, y, z, 1) NIfTI files, brain in the middle."""
    rng = np.random.default_rng(seed + number)
    if labels is None:
        labels = np.zeros(shape, np.uint8)
        labels[2:-2, 2:-2, 2:-2] = rng.integers(1, 4, size=[s - 4 for s in shape])
    image = np.where(labels > 0, 50.0 * labels + rng.normal(0, 5, labels.shape), 0).astype(np.float32)
    name = f"IBSR_{number:02d}"
    (root / name).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image[..., None], np.eye(4)), root / name / f"{name}_ana_strip.nii.gz")
    nib.save(nib.Nifti1Image(labels[..., None], np.eye(4)), root / name / f"{name}_segTRI_ana.nii.gz")
    return root / name


@pytest.fixture
def ibsr_dir(tmp_path):
    for number in range(1, 19):
        write_subject(tmp_path / "ibsr", number)
    return tmp_path / "ibsr"


def datamodule(data_dir, **options):
    return IBSRDataModule(data_dir, patch_size=(8, 8, 8), batch_size=2, samples_per_epoch=6, **options)


def test_real_layout_is_split_11_2_5_in_subject_order(ibsr_dir):
    write_subject(ibsr_dir, 19)  # sorted by number, not by name: IBSR_19 comes last
    (ibsr_dir / "IBSR_19").rename(ibsr_dir / "IBSR_100")
    (ibsr_dir / "notes").mkdir()
    for path in (ibsr_dir / "IBSR_100").iterdir():
        path.rename(path.with_name(path.name.replace("IBSR_19", "IBSR_100")))
    dm = datamodule(ibsr_dir)
    dm.setup()
    names = {split: [v.name for v in volumes] for split, volumes in dm.volumes.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [12, 2, 5]  # 19 subjects, same proportions
    assert names["val"] == ["IBSR_13", "IBSR_14"]
    assert names["test"] == ["IBSR_15", "IBSR_16", "IBSR_17", "IBSR_18", "IBSR_100"]


def test_loaders_give_patches_and_whole_normalized_volumes(ibsr_dir):
    dm = datamodule(ibsr_dir)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert [b["image"].shape for b in batches] == [(2, 1, 8, 8, 8)] * 3
    assert batches[0]["label"].dtype == torch.long and set(batches[0]["label"].unique().tolist()) <= {0, 1, 2, 3}
    val = list(dm.val_dataloader())
    assert len(val) == 2 and val[0]["image"].shape == (1, 1, *SHAPE) and val[0]["label"].shape == (1, 1, *SHAPE)
    image, label = val[0]["image"][0, 0], val[0]["label"][0, 0]
    brain = image[label > 0]
    assert abs(float(brain.mean())) < 1e-4 and abs(float(brain.std(unbiased=False)) - 1) < 1e-3
    assert torch.all(image[label == 0] == 0)
    # intensities still order the classes as the fixture made them
    assert image[label == 1].mean() < image[label == 2].mean() < image[label == 3].mean()


def test_patches_follow_the_seed(ibsr_dir):
    def first_batch(seed):
        dm = datamodule(ibsr_dir, seed=seed)
        dm.setup()
        return next(iter(dm.train_dataloader()))["image"]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_class_balanced_patches_centre_on_each_class_equally_often(tmp_path):
    # CSF (label 1) is 8 voxels of each brain: brain-centred patches almost never see it
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:-2, 2:-2, 2:-2] = 3
    labels[2:-2, 2:-2, 2:5] = 2
    labels[5:7, 5:7, 6:8] = 1
    for number in range(1, 19):
        write_subject(tmp_path / "ibsr", number, labels=labels)

    def centre_classes(**options):  # 1-voxel patches: a patch's label is its centre's class
        dm = get_task("ibsr").datamodule(
            tmp_path / "ibsr", batch_size=50, samples_per_epoch=400, patch_size=1, **options
        )
        dm.setup()
        found = torch.cat([b["label"].flatten() for b in dm.train_dataloader()])
        assert next(iter(dm.val_dataloader()))["image"].shape == (1, 1, *SHAPE)  # validation stays whole volumes
        return torch.bincount(found, minlength=4) / len(found)

    balanced, default = centre_classes(class_balanced=True), centre_classes()
    assert all(0.17 < share < 0.33 for share in balanced.tolist()), balanced
    assert default[1] < 0.05, default


def test_volumes_smaller_than_a_patch_are_padded(ibsr_dir):
    dm = get_task("ibsr").datamodule(ibsr_dir, batch_size=2, samples_per_epoch=2)  # 32³ patches, 12×10×14 volumes
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32, 32)
    assert int((batch["label"] > 0).sum()) == 2 * 8 * 6 * 10  # every brain voxel, nothing invented


def break_label_values(ibsr_dir):
    path = ibsr_dir / "IBSR_07" / "IBSR_07_segTRI_ana.nii.gz"
    labels = np.zeros(SHAPE, np.uint8)
    labels[3, 3, 3] = 5
    nib.save(nib.Nifti1Image(labels, np.eye(4)), path)
    return path, "unexpected label values [5]"


def break_shape(ibsr_dir):
    path = ibsr_dir / "IBSR_03" / "IBSR_03_segTRI_ana.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 13), np.uint8), np.eye(4)), path)
    return path, "label shape (12, 10, 13) differs from image shape (12, 10, 14)"


def break_gzip(ibsr_dir):
    path = ibsr_dir / "IBSR_11" / "IBSR_11_ana_strip.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
    return path, "not a readable NIfTI file"


def break_not_gzip(ibsr_dir):
    path = ibsr_dir / "IBSR_12" / "IBSR_12_ana_strip.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a NIfTI header"))
    return path, "not a readable NIfTI file"


def break_4d(ibsr_dir):
    path = ibsr_dir / "IBSR_02" / "IBSR_02_ana_strip.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((*SHAPE, 2), np.float32), np.eye(4)), path)
    return path, "expected a 3D volume, got shape (12, 10, 14, 2)"


@pytest.mark.parametrize("damage", [break_label_values, break_shape, break_gzip, break_not_gzip, break_4d])
def test_bad_file_contents_name_the_file(ibsr_dir, damage):
    path, message = damage(ibsr_dir)
    dm = datamodule(ibsr_dir)
    with pytest.raises(DataError) as err:
        dm.setup()
    assert err.value.path == str(path) and message in str(err.value)
    assert str(err.value).count("\n") == 0
    assert dm.volumes == {}


def test_missing_directory_and_missing_file_fail_at_construction(tmp_path, ibsr_dir):
    with pytest.raises(DataError, match="IBSR data directory not found") as err:
        datamodule(tmp_path / "nowhere")
    assert err.value.path == str(tmp_path / "nowhere")
    missing = ibsr_dir / "IBSR_05" / "IBSR_05_segTRI_ana.nii.gz"
    missing.unlink()
    with pytest.raises(DataError, match="missing IBSR subject file") as err:
        datamodule(ibsr_dir)
    assert err.value.path == str(missing)


def test_too_few_subjects_is_an_empty_split(tmp_path):
    for number in (1, 2, 3, 4):
        write_subject(tmp_path, number)
    with pytest.raises(DataError, match="leave the val split empty"):
        datamodule(tmp_path)
    write_subject(tmp_path, 5)
    assert [len(s) for s in datamodule(tmp_path)._subjects.values()] == [3, 1, 1]


def test_task_interface():
    task = get_task("ibsr")
    assert (task.backbone, dict(task.backbone_hparams)) == ("densenet3d", {"in_channels": 1, "num_classes": 4})
    assert task.class_names == ("background", "CSF", "GM", "WM") and task.input_shape == (1, 32, 32, 32)
    with pytest.raises(ValueError, match="unknown task 'brats'; known: .*ibsr"):
        get_task("brats")


def test_dice_scores_and_loss():
    task = get_task("ibsr")
    target = torch.zeros(1, 1, 5, 4, 4, dtype=torch.long)  # D=4 stays background
    target[0, 0, :2] = 1  # CSF: 32 voxels
    target[0, 0, 2:4, :2] = 2  # GM: 16
    target[0, 0, 2:4, 2:] = 3  # WM: 16
    perfect = torch.nn.functional.one_hot(target[:, 0], 4).permute(0, 4, 1, 2, 3).float() * 10
    wrong = perfect.clone()
    wrong[0, :, :4, :, 0] = torch.tensor([0, 0, 10.0, 0])[:, None, None]  # W=0 of the brain predicted GM
    metrics = task.metrics()
    metrics.update(wrong, {"label": target})
    scores = metrics.compute()
    # CSF loses 8 of its 32 voxels and WM 4 of its 16, all to GM, which predicts 16 + 12.
    assert scores["dice_csf"] == pytest.approx(2 * 24 / (24 + 32))
    assert scores["dice_gm"] == pytest.approx(2 * 16 / (16 + 28))
    assert scores["dice_wm"] == pytest.approx(2 * 12 / (12 + 16))
    assert scores[task.metric] == pytest.approx(np.mean([scores["dice_csf"], scores["dice_gm"], scores["dice_wm"]]))
    metrics.reset()
    metrics.update(perfect, {"label": target})
    assert metrics.compute() == {"dice_csf": 1.0, "dice_gm": 1.0, "dice_wm": 1.0, "dice_mean": 1.0}
    loss = task.loss()
    assert loss(perfect, {"label": target}) < 0.01 < 1 < loss(wrong * -1, {"label": target})


@pytest.mark.slow
def test_embedded_cohort_is_real_anatomy_in_ibsr_layout(tmp_path):
    root = embedded_cohort(tmp_path, spacing=6.0)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["params"] == {"spacing": 6.0, "seed": 0, "subjects": 18} and len(manifest["files"]) == 36
    dm = datamodule(None, cache_dir=tmp_path, spacing=6.0)
    dm.setup()
    assert [len(dm.volumes[s]) for s in ("train", "val", "test")] == [11, 2, 5]
    volumes = [v for split in dm.volumes.values() for v in split]
    counts = np.array([np.bincount(v.label.ravel().numpy(), minlength=4) for v in volumes])
    brain_ml = counts[:, 1:].sum(1) * 6.0**3 / 1000
    assert np.all((brain_ml > 1400) & (brain_ml < 2400))  # both sources hold 1.87 l (MNI-sized) brains
    assert np.all(counts[:, 2] + counts[:, 3] > 10 * counts[:, 1])  # mostly GM and WM, some CSF
    assert np.all(counts[:, 1] > 0)
    # every subject is its own deformation: no two label maps agree everywhere
    labels = torch.stack([v.label for v in volumes]).flatten(1)
    agreement = (labels[:, None] == labels[None]).float().mean(-1)
    assert agreement[~torch.eye(len(volumes), dtype=torch.bool)].max() < 0.97
    # tissue contrast of a T1: CSF darker than GM darker than WM
    for v in volumes:
        means = [float(v.image[v.label == c].mean()) for c in (1, 2, 3)]
        assert means == sorted(means)


def fake_sources(grid_affine, grid_shape):
    """Two tiny labelled 'brains' so cache tests run without the 1 mm templates."""
    tissue = np.zeros((4, *grid_shape), np.float32)
    tissue[0] = 1
    tissue[:, 3:-3, 3:-3, 3:-3] = np.array([0, 0.2, 0.5, 0.3])[:, None, None, None]
    image = np.where(tissue[0] < 1, 0.6, 0).astype(np.float32)
    return [(image, tissue), (image * 0.9, tissue[[0, 1, 3, 2]])]


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(ibsr_embedded, "_sources", fake_sources)
    monkeypatch.setattr(ibsr_embedded, "SUBJECTS", 3)
    monkeypatch.setenv("PSC_NAS_CACHE", str(tmp_path))
    return tmp_path / "ibsr-embedded"


def test_cache_is_reused_and_rebuilt_when_stale_or_corrupt(fake_cache):
    root = embedded_cohort(spacing=12.0)  # PSC_NAS_CACHE decides where
    assert root == fake_cache / "12mm-seed0"
    image = root / "IBSR_02" / "IBSR_02_ana_strip.nii.gz"
    original = image.read_bytes()
    built = image.stat().st_mtime_ns
    assert embedded_cohort(spacing=12.0) == root and image.stat().st_mtime_ns == built

    image.write_bytes(original[:-10])  # corrupt
    embedded_cohort(spacing=12.0)
    assert image.read_bytes() == original

    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = 0  # built by an older builder
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "IBSR_02" / "stray").write_text("")
    embedded_cohort(spacing=12.0)
    assert json.loads((root / "manifest.json").read_text())["version"] == ibsr_embedded.BUILDER_VERSION
    assert not (root / "IBSR_02" / "stray").exists()
    assert sorted(p.name for p in fake_cache.iterdir()) == ["12mm-seed0"]  # no temporary directories left


def test_builds_killed_long_ago_are_cleaned_up(fake_cache):
    abandoned, running = fake_cache / ".build-abandoned", fake_cache / ".build-running"
    for directory in (abandoned, running):
        (directory / "IBSR_01").mkdir(parents=True)
    os.utime(abandoned, (time.time() - 7200,) * 2)
    embedded_cohort(spacing=12.0)
    assert sorted(p.name for p in fake_cache.iterdir()) == [".build-running", "12mm-seed0"]


def test_interrupted_build_leaves_nothing(fake_cache, monkeypatch):
    calls = []

    def failing_subject(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_subject(*args, **kwargs)

    real_subject = ibsr_embedded._subject
    monkeypatch.setattr(ibsr_embedded, "_subject", failing_subject)
    with pytest.raises(KeyboardInterrupt):
        embedded_cohort(spacing=12.0)
    assert list(fake_cache.iterdir()) == []

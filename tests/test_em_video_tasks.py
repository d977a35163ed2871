"""The EM and UCF101 tasks: their problem definitions, their data folders and losses, and both trained,
searched and exported through the real command-line tools (tiny options, CPU)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from cli_process import one_line, run_cli
from rich.console import Console

import psc_nas
from psc_nas.arch import ArchConfig
from psc_nas.evaluators import train as train_evaluator
from psc_nas.presets import PRESETS, preset_config
from psc_nas.search.budget import Budget
from psc_nas.search.profiles import PROFILES, get_profile
from psc_nas.search.runner import SearchSettings, run_search
from psc_nas.space import SearchSpace
from psc_nas.tasks import DataError, get_task
from psc_nas.tasks.em import AffinityLoss, EMTask, split_volumes
from psc_nas.tasks.em_embedded import synthetic_em_volume, write_cremi
from psc_nas.tasks.em_segmentation import affinities_from_labels
from psc_nas.tasks.video_embedded import write_video

# The tasks' own backbones at a small width: the real task, data and CLI, seconds per trial.
EM_SPACE = """\
name: em_tiny
task: em
backbone: unet3d
hparams: {in_channels: 1, num_classes: 3, base_channels: 4}
blocks:
  share: false
  ops:
    conv3d: {}
    csn_ip: {}
    pmscn: {m: [1, 2], n: [1, 2], orientations: all}
"""
VIDEO_SPACE = """\
name: video_tiny
task: ucf101
backbone: resnet3d
hparams: {in_channels: 3, num_classes: 101, depth: 34, base_channels: 8}
blocks:
  share: true
  ops:
    conv3d: {}
    p3d: {orientation: 1x3x3}
    csn_ir: {}
  groups:
    - {name: conv2, slots: "conv2.*"}
    - {name: conv3, slots: "conv3.*"}
    - {name: conv4, slots: "conv4.*"}
    - {name: conv5, slots: "conv5.*"}
"""


# ---------------------------------------------------------------------- the problems
@pytest.mark.parametrize(
    ("name", "metric", "direction", "space", "shape"),
    [
        ("em", "vi_sum", "minimize", "em_unet3d", (1, 32, 32, 32)),
        ("ucf101", "clip_top1", "maximize", "video_resnet3d", (3, 16, 32, 32)),
    ],
)
def test_em_and_ucf101_state_their_problem_and_every_preset_fits(name, metric, direction, space, shape):
    task = get_task(name)
    assert (task.metric, task.metric_direction, task.default_space, task.input_shape) == (
        metric,
        direction,
        space,
        shape,
    )
    task.check_space(SearchSpace.load(space))
    for preset in PRESETS:  # psc-train --arch <preset> builds and runs on the task's input
        config = task.check_config(preset_config(preset, task.backbone, **task.backbone_hparams))
        assert psc_nas.cost(config, shape[1:]).params > 0
    net = psc_nas.build_model(preset_config("csn_ir", task.backbone, **task.backbone_hparams))
    out = net(torch.zeros(1, *shape))
    assert out.shape == ((1, 3, *shape[1:]) if name == "em" else (1, 101))


def _benchmark_module():
    """benchmarks/tasks.py, which is a script, not a package module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tasks.py"
    spec = importlib.util.spec_from_file_location("benchmark_tasks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_temporal_checks_networks_mix_frames_only_where_they_say():
    """conv3d has temporal kernels everywhere; all_1x3x3 only in the backbone's 3x7x7 stem; 2d_only
    nowhere (its stem made 1x7x7 while it is built and priced, and restored after)."""
    from psc_nas.nets import resnet3d
    from psc_nas.nets.build import build_model

    bench, task = _benchmark_module(), get_task("ucf101")
    temporal: dict[str, list[int]] = {}
    costs = {}
    for name in bench.TEMPORAL_VARIANTS:
        config, context = bench.variant_config(name, task, width=0.125)
        with context:
            net = build_model(config)
            costs[name] = psc_nas.cost(config, task.input_shape[1:])
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (1, 1, 1)]
        temporal[name] = [m.kernel_size[0] for m in convs]
        assert resnet3d.STEM_KERNEL == (3, 7, 7)
    assert set(temporal["conv3d"]) == {3}
    assert temporal["all_1x3x3"][0] == 3 and set(temporal["all_1x3x3"][1:]) == {1}
    assert set(temporal["2d_only"]) == {1} and len(temporal["2d_only"]) == len(temporal["all_1x3x3"])
    stem = costs["all_1x3x3"].params - costs["2d_only"].params  # 3 -> 1 frames in the stem's kernel only
    assert stem == 3 * 8 * (3 - 1) * 7 * 7


def test_affinity_loss_is_masked_and_lowest_at_the_truth():
    labels = np.repeat(np.arange(4), 8).reshape(2, 4, 4)[None].repeat(4, 0).reshape(8, 4, 4) + 1
    affinities, _ = affinities_from_labels(labels)
    target = torch.from_numpy(affinities)[None]
    batch = {"affinities": target, "mask": torch.ones_like(target)}
    right, wrong = 10 * (2 * target - 1), -10 * (2 * target - 1)
    for kind in ("bce", "mse"):
        loss = AffinityLoss(kind)
        assert loss(right, batch) < 1e-3 and loss(wrong, batch) > 0.9
    masked = {"affinities": target, "mask": torch.zeros_like(target)}
    masked["mask"][:, :, 0] = 1
    wrong_elsewhere = right.clone()
    wrong_elsewhere[:, :, 1:] *= -1  # wrong only where the mask is 0
    assert AffinityLoss()(wrong_elsewhere, masked) < 1e-3
    with pytest.raises(ValueError, match="unknown affinity loss 'l1'"):
        AffinityLoss("l1")


def write_em_dir(root: Path, names: list[str], shape=(16, 32, 32)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        raw, labels = synthetic_em_volume(shape, seed=index)
        write_cremi(root / f"{name}.hdf", raw, labels, (10.0, 10.0, 10.0))
    return root


def test_em_data_folders_split_into_train_and_val(tmp_path):
    flat = write_em_dir(tmp_path / "flat", ["a", "b", "c"])
    assert {k: [s.name for s in v] for k, v in split_volumes(flat).items()} == {"train": ["a", "b"], "val": ["c"]}
    write_em_dir(tmp_path / "nested" / "train", ["a", "b"])
    write_em_dir(tmp_path / "nested" / "val", ["c"])
    assert [s.name for s in split_volumes(tmp_path / "nested")["val"]] == ["c"]
    lonely = write_em_dir(tmp_path / "lonely", ["a"])
    with pytest.raises(DataError, match=r"lonely: 1 volume\(s\): need train/ and val/ folders or at least 2"):
        split_volumes(lonely)
    (tmp_path / "halfnested" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"halfnested/train: no EM volumes"):
        split_volumes(tmp_path / "halfnested")


def test_ucf101_refuses_more_classes_than_its_outputs(tmp_path):
    (tmp_path / "ucfTrainTestlist").mkdir()
    (tmp_path / "ucfTrainTestlist/classInd.txt").write_text("".join(f"{i} C{i}\n" for i in range(1, 103)))
    with pytest.raises(DataError, match=r"classInd\.txt: 102 classes, but the ucf101 task's networks have 101"):
        get_task("ucf101").datamodule(tmp_path)


# ---------------------------------------------------------------------- the real command-line tools
@pytest.mark.slow
def test_psc_train_em_on_a_data_folder_writes_vi_metrics(tmp_path):
    write_em_dir(tmp_path / "data", ["a", "b"], shape=(32, 32, 32))
    train = run_cli(
        "psc-train",
        "--task",
        "em",
        "--arch",
        "csn_ir",
        "--epochs",
        "2",
        "--samples-per-epoch",
        "2",
        "--batch-size",
        "2",
        "--data-dir",
        "data",
        "--out",
        "trained",
        "--no-progress",
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr
    record = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert set(record["metrics"]) == {"vi_split", "vi_merge", "vi_sum", "arand", "merge_threshold"}
    assert record["best_metric"] == min(row["vi_sum"] for row in record["curve"])  # minimised
    for row in record["curve"]:
        assert row["vi_sum"] == pytest.approx(row["vi_split"] + row["vi_merge"])
    assert (tmp_path / "trained" / "best.ckpt").is_file()

    with h5py_file(tmp_path / "data" / "b.hdf") as file:
        del file["volumes/labels/neuron_ids"]
    bad = run_cli(
        "psc-train",
        "--task",
        "em",
        "--arch",
        "csn_ir",
        "--data-dir",
        "data",
        "--out",
        "bad",
        "--no-progress",
        cwd=tmp_path,
    )
    one_line(bad, "psc-train", "data/b.hdf: no dataset 'volumes/labels/neuron_ids'", optuna_lines=False)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def h5py_file(path: Path):
    import h5py

    return h5py.File(path, "a")


@pytest.mark.slow
def test_psc_train_ucf101_on_a_data_folder_writes_clip_and_video_accuracy(tmp_path):
    root = tmp_path / "ucf"
    train, test = [], []
    rng = np.random.default_rng(0)
    for label, name in enumerate(("JumpRope", "Surfing")):
        (root / name).mkdir(parents=True)
        for group in (1, 2, 8, 9):
            relative = f"{name}/v_{name}_g{group:02d}_c01.avi"
            write_video(root / relative, rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
            (test.append(relative) if group < 8 else train.append(f"{relative} {label + 1}"))
    (root / "ucfTrainTestlist").mkdir()
    (root / "ucfTrainTestlist/classInd.txt").write_text("1 JumpRope\n2 Surfing\n")
    (root / "ucfTrainTestlist/trainlist01.txt").write_text("\n".join(train) + "\n")
    (root / "ucfTrainTestlist/testlist01.txt").write_text("\n".join(test) + "\n")
    result = run_cli(
        "psc-train",
        "--task",
        "ucf101",
        "--arch",
        "csn_ir",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--data-dir",
        "ucf",
        "--out",
        "trained",
        "--no-progress",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert set(record["metrics"]) == {"clip_top1", "video_top1"}
    assert record["best_metric"] == max(row["clip_top1"] for row in record["curve"])  # maximised
    # 4 test videos × 4 clips: clip accuracy in sixteenths, video accuracy in quarters
    assert record["metrics"]["clip_top1"] * 16 == round(record["metrics"]["clip_top1"] * 16)
    assert record["metrics"]["video_top1"] * 4 == round(record["metrics"]["video_top1"] * 4)

    (root / "Surfing/v_Surfing_g08_c01.avi").write_bytes(b"\0" * 500)  # a corrupt training video
    bad = run_cli(
        "psc-train",
        "--task",
        "ucf101",
        "--arch",
        "csn_ir",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--data-dir",
        "ucf",
        "--out",
        "bad",
        "--no-progress",
        cwd=tmp_path,
    )
    one_line(bad, "psc-train", "v_Surfing_g08_c01.avi: not a readable video", optuna_lines=False)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "space", "budget", "metric", "direction"),
    [("em", EM_SPACE, "400k", "vi_sum", "MINIMIZE"), ("ucf101", VIDEO_SPACE, "2M", "clip_top1", "MAXIMIZE")],
)
def test_psc_search_and_psc_export_on_the_embedded_data(tmp_path, task, space, budget, metric, direction):
    (tmp_path / "space.yaml").write_text(space)
    found = run_cli(
        "psc-search",
        "--task",
        task,
        "--space",
        "space.yaml",
        "--budget",
        budget,
        "--trials",
        "2",
        "--out",
        "search",
        "--no-retrain",  # retraining is tested in test_retrain.py
        cwd=tmp_path,
        plugins="quick_schedules",  # the task's quick schedule, a few steps per candidate
    )
    assert found.returncode == 0, found.stderr
    out = tmp_path / "search"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    shape = list(get_task(task).input_shape)
    assert study.user_attrs["input_shape"] == shape
    assert study.user_attrs["objectives"][0]["name"] == metric
    assert study.user_attrs["objectives"][0]["direction"] == direction.lower()
    assert [d.name for d in study.directions] == [direction, "MINIMIZE"]
    trained = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs["fidelity"] > 0]
    assert len(trained) == 2
    for trial in trained:  # the plugin's epochs and samples, the task's quarter-width proxy
        assert re.match(r"[12] epochs? × 8 samples, width 0\.25", trial.user_attrs["fidelity_words"])
        assert trial.values[0] == trial.user_attrs["metrics"][metric]
        config = ArchConfig.from_dict(trial.user_attrs["arch"])
        assert trial.user_attrs["params"] == psc_nas.cost(config, tuple(shape[1:])).params
    knee = study.trials[json.loads((out / "pareto.json").read_text())["knee"]]
    assert ArchConfig.load(out / "best.yaml").hash == knee.user_attrs["arch_hash"]
    assert (out / "dashboard.html").is_file()

    exported = run_cli("psc-export", "search", "--pick", "best", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    sign = 1 if direction == "MAXIMIZE" else -1
    picked = max(trained, key=lambda t: (sign * t.values[0], -t.number))  # ties: the earliest
    assert exported.stdout.startswith(f"trial {picked.number} (best)")
    (config_file,) = (out / "export").glob("*.yaml")
    assert psc_nas.cost(ArchConfig.load(config_file), tuple(shape[1:])).params == picked.user_attrs["params"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    [
        ("--evaluator", "supernet", "--evaluator-option", "steps=3", "--evaluator-option", "val_patches=2"),
        ("--engine", "nni", "--strategy", "random"),
        ("--engine", "cakes", "--engine-option", "steps=3", "--engine-option", "epochs=1"),
    ],
    ids=["supernet", "nni", "cakes"],
)
@pytest.mark.parametrize(("task", "space", "budget"), [("em", EM_SPACE, "400k"), ("ucf101", VIDEO_SPACE, "2M")])
def test_every_evaluator_and_engine_searches_em_and_ucf101(tmp_path, task, space, budget, how):
    (tmp_path / "space.yaml").write_text(space)
    trials = [] if "cakes" in how else ["--trials", "2"]
    retrain = ["--retrain"] if "cakes" in how else ["--no-retrain"]
    found = run_cli(
        "psc-search", "--task", task, "--space", "space.yaml", "--budget", budget, *trials, *retrain, *how,
        "--timeout", "4m", "--out", "search",
        cwd=tmp_path, plugins="quick_schedules",
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    out = tmp_path / "search"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    scored = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("fidelity", 0) > 0]
    assert scored, [t.user_attrs.get("fail_reason") for t in study.trials]
    metric = get_task(task).metric
    assert all(t.values[0] == t.user_attrs["metrics"][metric] for t in scored)
    for name in ("trials.csv", "pareto.json", "best.yaml", "dashboard.html"):
        assert (out / name).is_file(), name
    exported = run_cli("psc-export", "search", "--pick", "best", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr


# ---------------------------------------------------------------------- the task's own search schedule
def test_em_and_ucf101_size_the_quick_profile_and_ibsr_keeps_its_own():
    for name in ("em", "ucf101"):
        task = get_task(name)
        quick, overrides = get_profile("quick", task), task.profile_overrides["quick"]
        assert quick.name == "quick" and quick.evaluator == "train"
        assert quick.evaluator_options == overrides["evaluator_options"]
        assert quick.evaluator_options["width"] == 0.25  # a quarter-width proxy per candidate
        assert quick.data_options == overrides["data_options"]
        assert quick.epochs == tuple(overrides["epochs"])
        assert quick.retrain is None  # the whole time budget searches
        assert quick.timeout == PROFILES["quick"].timeout  # within the same 15 minutes
    # none of em's or ucf101's schedule; only its own pre-screen (300 architectures, each scored at width 0.25)
    # and 5 trained (the two presets that fit, then the screen's first 3), the rest of the time retraining, with the
    # fidelity reference's optimiser (AdamW 2e-3, weight decay 1e-4) in place of the profile's Adam 1e-3
    quick = PROFILES["quick"]
    assert get_profile("quick", get_task("ibsr")) == replace(
        quick,
        prescreen="zico+macs",
        prescreen_size=300,
        prescreen_width=0.25,
        trials=5,
        retrain=replace(quick.retrain, lr=2e-3, weight_decay=1e-4),
    )


def test_a_task_changes_the_fields_of_a_retraining_it_names_and_no_retraining_it_lacks():
    class Tuned:
        profile_overrides = {"quick": {"retrain": {"epochs": 7}}, "paper": {"retrain": None}}

    assert get_profile("quick", Tuned()).retrain == replace(PROFILES["quick"].retrain, epochs=7)
    assert get_profile("paper", Tuned()).retrain is None  # None still switches it off
    Tuned.profile_overrides = {"quick": {"retrain": {"epochs": 0}}}
    with pytest.raises(ValueError, match="positive counts"):
        get_profile("quick", Tuned())
    Tuned.profile_overrides = {"quick": {"retrain": {"epochs": 7}}}
    no_retraining = {**PROFILES, "quick": replace(PROFILES["quick"], retrain=None)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("psc_nas.search.profiles.PROFILES", no_retraining)
        with pytest.raises(ValueError, match="retrains nothing"):
            get_profile("quick", Tuned())


def test_the_benchmark_trains_as_the_tasks_quick_profile_does():
    bench = _benchmark_module()
    em = bench.parse_args(["--task", "em", "--quick-schedule"])
    bench.use_quick_schedule(em, get_task("em"))
    assert (em.epochs, em.samples_per_epoch, em.batch_size, em.width, em.lr, em.lr_schedule) == (
        8,
        64,
        4,
        0.25,
        1e-2,
        "constant",
    )
    video = bench.parse_args(["--task", "ucf101", "--quick-schedule"])
    bench.use_quick_schedule(video, get_task("ucf101"))
    assert (video.epochs, video.samples_per_epoch, video.width, video.lr, video.lr_schedule) == (
        4,
        768,
        0.25,
        None,
        "onecycle",
    )


def test_a_tasks_profile_overrides_reach_the_trained_candidates(tmp_path, monkeypatch):
    """A real em study on tiny volumes: its one candidate was trained at the width, learning rate,
    epochs and patches the task's overrides give, and its trial says so."""
    overrides = {
        "trials": 1,
        "epochs": (1,),
        "data_options": {"samples_per_epoch": 2, "batch_size": 2},
        "evaluator_options": {"width": 0.5, "lr": 0.05},
        "retrain": None,
    }
    monkeypatch.setattr(EMTask, "profile_overrides", {"quick": overrides})
    trained = []
    real_fit = train_evaluator.fit

    def fit(config, task, **options):
        trained.append((config, options))
        return real_fit(config, task, **options)

    monkeypatch.setattr(train_evaluator, "fit", fit)
    (tmp_path / "space.yaml").write_text(EM_SPACE)
    settings = SearchSettings(
        task="em",
        space=str(tmp_path / "space.yaml"),
        budget=Budget(params=400_000),
        data_dir=write_em_dir(tmp_path / "data", ["a", "b"], shape=(32, 32, 32)),
        out=tmp_path / "search",
        seed_presets=False,
    )
    run_search(settings, console=Console(quiet=True))
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}")
    (trial,) = [t for t in study.trials if t.state.name == "COMPLETE"]  # trials: 1, the task's
    assert trial.user_attrs["fidelity_words"] == "1 epoch × 2 samples, width 0.5, lr 0.05"
    assert not list((tmp_path / "search").glob("front/*.weights.pt"))  # retrain: None, the task's
    ((config, options),) = trained
    assert options["lr"] == 0.05 and options["epochs"] == 1
    assert options["data_options"] == {"samples_per_epoch": 2, "batch_size": 2}
    searched = ArchConfig.from_dict(trial.user_attrs["arch"])
    assert config.hparams["width"] == 0.5 * searched.hparams.get("width", 1.0)
    assert trial.user_attrs["params"] == psc_nas.cost(searched, (32, 32, 32)).params  # priced at full width
    assert psc_nas.cost(config, (32, 32, 32)).params < trial.user_attrs["params"]

"""Training: real (tiny) runs of ``fit`` on the embedded IBSR cohort, and the ``psc-train`` command."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from cli_process import one_line
from lightning.pytorch.callbacks import Callback
from typer.testing import CliRunner

from psc_nas import build_model
from psc_nas.arch import ArchConfig, ConfigError
from psc_nas.cli import train_app
from psc_nas.presets import preset_config
from psc_nas.tasks.ibsr import IBSRTask
from psc_nas.train import TrainingFailed, fit, fit_into

# A DenseNet3D small enough for CPU tests: 3 blocks of 2 layers at a quarter of the width, with
# (2+1)D convs: at these few channels p2sc2 and even conv3d hit slow CPU kernels (4-15x slower).
TINY = {"width": 0.25, "num_blocks": 3, "layers_per_block": 2}
# 4 mm volumes (38x48x40) and two patches per step keep an epoch to a few seconds.
TINY_DATA = {"samples_per_epoch": 4, "batch_size": 2, "spacing": 4.0}
DICE_KEYS = {"dice_csf", "dice_gm", "dice_wm", "dice_mean"}


class SmallPatchIBSR(IBSRTask):
    """IBSR with 16^3 training patches and sliding windows: an eighth of the compute of 32^3."""

    input_shape = (1, 16, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core test machines two OpenMP threads that wait on each
    other at every barrier made these tiny steps up to 40x slower (1.7 s vs 0.044 s measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task():
    return SmallPatchIBSR()


@pytest.fixture(scope="module")
def tiny_config(task):
    return preset_config("p1sc1", task.backbone, **task.backbone_hparams, **TINY)


@pytest.fixture(scope="module")
def trained(task, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "run"
    return out, fit(tiny_config, task, epochs=3, seed=0, out_dir=out, data_options=TINY_DATA)


def test_fit_learns_and_reports_per_class_dice(trained):
    _, result = trained
    assert result.epochs == len(result.curve) == 3
    assert [row["epoch"] for row in result.curve] == [1, 2, 3]
    assert result.curve[-1]["train_loss"] < result.curve[0]["train_loss"]
    assert set(result.metrics) == DICE_KEYS
    assert all(0.0 <= value <= 1.0 for value in result.metrics.values())
    per_class = [result.metrics[key] for key in ("dice_csf", "dice_gm", "dice_wm")]
    assert result.metrics["dice_mean"] == pytest.approx(sum(per_class) / 3)
    assert result.best_metric == max(row["dice_mean"] for row in result.curve)
    assert 0.0 < result.fwd_bwd_seconds < result.wall_seconds


def test_fit_writes_a_run_that_rebuilds_the_network(trained, tiny_config):
    out, result = trained
    assert ArchConfig.load(out / "config.yaml") == tiny_config
    record = json.loads((out / "metrics.json").read_text())
    assert record["metrics"] == result.metrics and record["checkpoint"] == "best.ckpt"
    with open(out / "curve.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["dice_mean"]) for row in rows] == [row["dice_mean"] for row in result.curve]
    checkpoint = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    net = build_model(checkpoint["hyper_parameters"]["arch"])
    net.load_state_dict({k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()})


def test_fit_is_deterministic_for_a_seed(trained, task, tiny_config):
    _, first = trained
    again = fit(tiny_config, task, epochs=3, seed=0, data_options=TINY_DATA)

    def scores(curve):  # every row but its wall time (epoch_s), which no seed fixes
        return [{k: v for k, v in row.items() if k != "epoch_s"} for row in curve]

    assert scores(again.curve) == scores(first.curve)
    assert all(row["epoch_s"] > 0 for row in again.curve)
    other_seed = fit(tiny_config, task, epochs=1, seed=1, data_options=TINY_DATA)
    assert scores(other_seed.curve)[0] != scores(first.curve)[0]


class NanLossTask(SmallPatchIBSR):
    def loss(self):
        return lambda logits, batch: logits.mean() * float("nan")


def test_nan_loss_fails_clearly_and_leaves_nothing(tiny_config, tmp_path):
    with pytest.raises(TrainingFailed, match=r"loss became nan at epoch 0, step 0"):
        fit_into(tmp_path / "run", tiny_config, NanLossTask(), epochs=1, limit_train_batches=1, data_options=TINY_DATA)
    assert list(tmp_path.iterdir()) == []


def test_config_must_fit_the_task(task):
    three_classes = preset_config("conv3d", "densenet3d", in_channels=1, num_classes=3, **TINY)
    with pytest.raises(ConfigError, match=r"hparams.num_classes: task ibsr needs 4, the config has 3"):
        task.check_config(three_classes)


def invoke(*args: str):
    return CliRunner().invoke(train_app, list(args))


def test_psc_train_writes_the_run(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_config.save("tiny.yaml")
    result = invoke(
        "--arch", "tiny.yaml", "--epochs", "1", "--samples-per-epoch", "2", "--batch-size", "2", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / f"ibsr-tiny-{tiny_config.hash}-s0"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run_dir.name]
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.ckpt", "config.yaml", "curve.csv", "metrics.json"]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1
    assert str(run_dir.relative_to(tmp_path)) in result.stdout

    again = invoke("--arch", "tiny.yaml", "--epochs", "1", "--no-progress")
    assert again.exit_code == 1 and "already exists" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "mnist", "--arch", "conv3d"], "unknown task 'mnist'"),
        (["--arch", "p9sc9"], "neither a preset"),
        (["--arch", "missing.yaml"], "cannot read missing.yaml"),
        (["--arch", "bad.yaml"], "bad.yaml:blocks"),
        (["--arch", "unet.yaml"], "backbone: task ibsr trains densenet3d, the config is for unet3d"),
        (["--arch", "conv3d", "--data-dir", "no-such-dir"], "no-such-dir: IBSR data directory not found"),
    ],
)
def test_psc_train_user_errors_are_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("backbone: densenet3d\nblocks: [{op: pmscn, m: 7}]\n")
    preset_config("conv3d", "unet3d", in_channels=1, num_classes=4).save(tmp_path / "unet.yaml")
    result = invoke(*args, "--no-progress")
    one_line(result, "psc-train", message, optuna_lines=False)
    assert not (tmp_path / "runs").exists()


class LearningRates(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_onecycle_warms_up_decays_and_the_test_split_is_scored(task, tiny_config):
    rates = LearningRates()
    result = fit(
        tiny_config,
        task,
        epochs=2,
        seed=0,
        lr=2e-3,
        weight_decay=1e-4,
        lr_schedule="onecycle",
        evaluate_test=True,
        data_options={**TINY_DATA, "samples_per_epoch": 20},
        callbacks=[rates],
    )
    assert len(rates.rates) == 20  # 2 epochs x 10 batches of 2
    peak = rates.rates.index(max(rates.rates))
    assert rates.rates[0] < max(rates.rates) == pytest.approx(2e-3, rel=0.05)
    assert all(a >= b for a, b in zip(rates.rates[peak:], rates.rates[peak + 1 :]))  # cosine decay after the peak
    assert rates.rates[-1] < 2e-3 / 20
    assert {"test_dice_mean", "test_dice_csf", "dice_mean"} <= set(result.metrics)
    assert 0.0 <= result.metrics["test_dice_mean"] <= 1.0


def test_unknown_lr_schedule_is_refused(task, tiny_config):
    with pytest.raises(ValueError, match="unknown lr_schedule 'cosine'"):
        fit(tiny_config, task, epochs=1, lr_schedule="cosine", data_options=TINY_DATA)


class Layouts(Callback):
    """Whether every 5-D weight of the network was channels_last_3d at each training step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = [p for p in pl_module.net.parameters() if p.dim() == 5]
        layout = [torch.empty(p.shape, memory_format=torch.channels_last_3d).stride() for p in weights]
        self.seen.append(bool(weights) and [p.stride() for p in weights] == layout)


def test_fit_on_the_cpu_trains_in_channels_last_3d(task, tiny_config):
    # device.place: oneDNN's fast layout for the whole network (docs/benchmarks/ops.md), not only inside the ops
    layouts = Layouts()
    fit(tiny_config, task, epochs=1, seed=0, data_options=TINY_DATA, callbacks=[layouts], accelerator="cpu")
    assert layouts.seen and all(layouts.seen)

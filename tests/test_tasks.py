"""The task owns the problem: its registry, what it refuses before anything is written, psc-space
pricing at its input shape, and a task defined in a test file (tiny_task.py) trained and searched
through the real command-line tools as a plugin, with no edit to psc_nas/."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import search_standin
import tiny_task
import torch
from cli_process import one_line, run_cli
from rich.console import Console
from typer.testing import CliRunner

import psc_nas
from psc_nas.arch import ArchConfig, ConfigError
from psc_nas.cli import space_app
from psc_nas.presets import preset_config
from psc_nas.search.budget import Budget
from psc_nas.search.runner import SearchSettings, run_search
from psc_nas.space import SearchSpace
from psc_nas.tasks import Task, get_task, register_task, registry
from psc_nas.tasks.ibsr import IBSRTask
from psc_nas.train import fit


def write_space(path: Path, **changes) -> Path:
    data = {
        "task": "ibsr",
        "backbone": "densenet3d",
        "hparams": {"in_channels": 1, "num_classes": 4},
        "blocks": {"ops": {"conv3d": {}, "csn_ir": {}}},
        **changes,
    }
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def search(tmp_path: Path, name: str = "run", **overrides) -> Path:
    settings = SearchSettings(
        **{
            "task": "ibsr",
            "budget": Budget(params=5_000_000),
            "trials": 2,
            "out": tmp_path / name,
            "retrain": False,
            "prescreen": "none",  # IBSR's quick profile screens 300 real networks first; tested in test_prescreen
            **overrides,
        }
    )
    run_search(settings, evaluator=search_standin.StandinEvaluator(), console=Console(quiet=True))
    return tmp_path / name


# ---------------------------------------------------------------------- registry
def test_the_registry_checks_a_task_states_its_problem(monkeypatch):
    monkeypatch.setattr(registry, "TASKS", dict(registry.TASKS))

    class Unstated(Task):
        name, backbone, backbone_hparams, class_names = "unstated", "densenet3d", {}, ("a", "b")
        input_shape, metric = (1, 16, 16, 16), "dice"

    with pytest.raises(TypeError, match=r"test_tasks\..*Unstated does not set metric_direction, metric_range"):
        register_task(Unstated)

    class Sideways(tiny_task.BarAxisTask):
        name, metric_direction = "sideways", "lower"

    with pytest.raises(TypeError, match=r"metric_direction must be one of \('maximize', 'minimize'\), got 'lower'"):
        register_task(Sideways)

    class Impostor(tiny_task.BarAxisTask):
        pass

    with pytest.raises(TypeError, match=r"task name 'bar_axis' of .*Impostor is taken by tiny_task\.BarAxisTask"):
        register_task(Impostor)
    assert isinstance(get_task("bar_axis"), tiny_task.BarAxisTask)
    known = ", ".join(registry.task_names())  # other test modules' plugin tasks (slow_bar) may be registered too
    assert {"bar_axis", "em", "ibsr", "ucf101"} <= set(registry.task_names())
    with pytest.raises(ValueError, match=rf"unknown task 'segment_everything'; known: {known}$"):
        get_task("segment_everything")


def test_ibsr_states_its_problem():
    task = get_task("ibsr")
    assert (task.input_shape, task.metric, task.metric_direction, task.metric_range) == (
        (1, 32, 32, 32),
        "dice_mean",
        "maximize",
        (0.0, 1.0),
    )
    assert task.default_space == "ibsr_densenet3d"
    task.check_space(SearchSpace.load(task.default_space))


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "em"}, r"x\.yaml: task: space 'x' is for task em, not ibsr; the ibsr task's space is ibsr_densenet"),
        (
            {"hparams": {"in_channels": 1, "num_classes": 3}},
            r"x\.yaml: hparams\.num_classes: task ibsr needs 4, the space has 3",
        ),
        (
            {"hparams": {"num_classes": 4}, "backbone": "unet3d"},
            r"x\.yaml: backbone: task ibsr trains densenet3d, the space is for unet3d",
        ),
        (
            {"hparams": {"in_channels": 1, "num_classes": 4, "num_blocks": 7}},
            r"x\.yaml: task ibsr's input 1x32x32x32 does not fit the space: .*at least 64",
        ),
    ],
)
def test_a_space_for_another_problem_is_refused_before_anything_is_written(tmp_path, changes, message):
    space = write_space(tmp_path / "x.yaml", **changes)
    with pytest.raises(ConfigError, match=message):
        search(tmp_path, space=str(space))
    assert not (tmp_path / "run").exists()


def test_a_mac_budget_no_architecture_comes_near_is_refused(tmp_path):
    # 60G is about the presets' MACs at 64^3; at the task's 32^3 the costliest network has 26.4G.
    with pytest.raises(
        ValueError,
        match=r"--macs-budget 60G is above the costliest architecture of space "
        r"'ibsr_densenet3d' \(26\.4G MACs\), so it excludes nothing; MACs count at "
        r"task ibsr's input 1x32x32x32",
    ):
        search(tmp_path, budget=Budget(params=5_000_000, macs=60 * 10**9))
    assert not (tmp_path / "run").exists()


def test_resuming_a_study_priced_at_another_input_shape_is_refused(tmp_path, monkeypatch):
    out = search(tmp_path)
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["input_shape"] == [1, 32, 32, 32]
    assert study.user_attrs["objectives"] == [
        {"name": "dice_mean", "direction": "maximize", "range": [0.0, 1.0]},
        {"name": "params", "direction": "minimize", "range": [0.0, 5_000_000.0]},
    ]
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(IBSRTask, "input_shape", (1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"searches input_shape=\[1, 32, 32, 32\], not input_shape=\[1, 16, 16, 16\]"):
        search(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
def test_psc_search_with_a_space_of_another_task_is_one_line_and_writes_nothing(tmp_path):
    result = run_cli("psc-search", "--task", "ibsr", "--space", "em_unet3d", cwd=tmp_path)
    one_line(
        result,
        "psc-search",
        "search_spaces/em_unet3d.yaml: task: space 'em_unet3d' is for task em, not ibsr",
        optuna_lines=False,
    )
    assert list(tmp_path.iterdir()) == []
    missing = run_cli("psc-search", "--task", "ibsr", cwd=tmp_path, plugins="no_such_plugin")
    one_line(missing, "psc-search", "$PSC_NAS_PLUGINS: cannot import plugin 'no_such_plugin'", optuna_lines=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- psc-space
def table_rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells of every row of the rich tables in ``text``."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_psc_space_prices_the_presets_at_the_task_input_shape():
    result = CliRunner().invoke(space_app, ["ibsr_densenet3d"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    task = get_task("ibsr")
    assert "ibsr_densenet3d at 1x32x32x32" in result.stdout
    rows = table_rows(result.stdout)
    space = SearchSpace.load("ibsr_densenet3d")
    for name, config in space.presets().items():
        price = psc_nas.cost(config, task.input_shape)
        assert rows[name] == [psc_nas.format_count(price.params), psc_nas.format_count(price.macs)]
    assert rows["ibsr_densenet3d"][:2] == ["ibsr", "1x32x32x32"]


def test_psc_space_prices_every_shipped_space_and_says_which_spaces_have_no_installed_task(tmp_path):
    listing = CliRunner().invoke(space_app, [], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    assert "presets not priced" not in listing.stdout
    for space, task in (("em_unet3d", "em"), ("ibsr_densenet3d", "ibsr"), ("video_resnet3d", "ucf101")):
        assert f"{space} at {get_task(task).describe_input()}" in listing.stdout
    orphan = write_space(tmp_path / "orphan.yaml", task="segment_everything")
    alone = CliRunner().invoke(space_app, [str(orphan)])
    assert alone.exit_code == 1 and alone.stdout == ""
    assert alone.stderr == (
        f"psc-space: {orphan}: task 'segment_everything' is not installed "
        f"(installed: {', '.join(registry.task_names())})\n"
    )


def test_an_old_space_with_input_size_is_told_the_task_sets_it(tmp_path):
    space = write_space(tmp_path / "old.yaml", input_size=[64, 64, 64])
    result = CliRunner().invoke(space_app, [str(space)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"psc-space: {space}: input_size: no longer part of a space: its task sets the input size now; remove it\n"
    )


# ---------------------------------------------------------------------- a task from a test file
@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: two threads waiting on each other are slower (tests/test_train.py)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_plugin_task_learns_and_keeps_its_best_epoch_by_its_direction(tmp_path, one_thread):
    task = tiny_task.BarAxisTask()
    config = preset_config("conv3d", task.backbone, **task.backbone_hparams)
    result = fit(
        config, task, epochs=4, seed=0, out_dir=tmp_path, data_options={"samples_per_epoch": 256, "batch_size": 16}
    )
    errors = [row["error"] for row in result.curve]
    assert errors[-1] < 1 / 3 < 2 / 3 <= errors[0] + 0.05  # from chance (2/3) to well below half of it
    assert result.best_metric == min(errors)
    callbacks = torch.load(result.checkpoint, map_location="cpu", weights_only=False)["callbacks"]
    (kept,) = [state for name, state in callbacks.items() if name.startswith("ModelCheckpoint")]
    assert float(kept["best_model_score"]) == pytest.approx(min(errors))


def test_psc_space_prices_a_plugin_space_at_its_task_input_shape(tmp_path):
    space = tmp_path / "bars.yaml"
    space.write_text(tiny_task.SPACE_YAML)
    result = CliRunner().invoke(space_app, [str(space)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    csn_ir = preset_config("csn_ir", "resnet3d", **tiny_task.BarAxisTask.backbone_hparams)
    assert rows["csn_ir"][1] == psc_nas.format_count(psc_nas.cost(csn_ir, (16, 16, 16)).macs)


@pytest.mark.slow
def test_psc_train_and_psc_search_run_a_task_defined_in_a_test_file(tmp_path):
    train = run_cli(
        "psc-train",
        "--task",
        "bar_axis",
        "--arch",
        "p1sc1",
        "--epochs",
        "2",
        "--samples-per-epoch",
        "16",
        "--batch-size",
        "8",
        "--out",
        "trained",
        "--no-progress",
        cwd=tmp_path,
        plugins="tiny_task",
    )
    assert train.returncode == 0, train.stderr
    record = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert set(record["metrics"]) == {"accuracy", "error"}
    assert record["best_metric"] == min(row["error"] for row in record["curve"])
    assert ArchConfig.load(tmp_path / "trained" / "config.yaml").hparams["width"] == 0.125

    (tmp_path / "bars.yaml").write_text(tiny_task.SPACE_YAML)
    found = run_cli(
        "psc-search",
        "--task",
        "bar_axis",
        "--space",
        "bars.yaml",
        "--budget",
        "400k",
        "--trials",
        "2",
        "--no-retrain",
        "--out",
        "search",
        cwd=tmp_path,
        plugins="tiny_task",
    )
    assert found.returncode == 0, found.stderr
    out = tmp_path / "search"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["input_shape"] == [1, 16, 16, 16]
    assert study.user_attrs["objectives"][0] == {"name": "error", "direction": "minimize", "range": [0.0, 1.0]}
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    trained = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs["fidelity"] > 0]
    assert len(trained) == 2 and trained[0].user_attrs["preset"] == "csn_ir"
    for trial in trained:
        assert trial.values[0] == trial.user_attrs["metrics"]["error"]
        config = ArchConfig.from_dict(trial.user_attrs["arch"])
        assert trial.user_attrs["params"] == psc_nas.cost(config, (16, 16, 16)).params
    summary = json.loads((out / "pareto.json").read_text())
    knee = study.trials[summary["knee"]]
    assert ArchConfig.load(out / "best.yaml").hash == knee.user_attrs["arch_hash"]
    assert (out / "dashboard.html").is_file()

"""psc-export on a real SQLite Optuna study (tests/_search_run.py): picks, rebuilds, formats, errors; trained
weights from a real search with retraining and from psc-train through ``psc_nas.load_model``."""

from __future__ import annotations

import io
import json
import pickle
import shutil

import numpy as np
import optuna
import pytest
import search_standin
import tiny_task
import torch
from _search_run import SPATIAL, make_run
from optuna.trial import TrialState
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import psc_nas
from psc_nas.arch import ArchConfig
from psc_nas.cli import export_app
from psc_nas.dashboard import payload
from psc_nas.evaluators import Evaluation, Fidelity
from psc_nas.export import Pick, export
from psc_nas.ops import implementation
from psc_nas.presets import preset_config
from psc_nas.results import Run
from psc_nas.search.budget import Budget
from psc_nas.search.outputs import write_outputs
from psc_nas.search.profiles import PROFILES, RetrainPolicy
from psc_nas.search.record import Retrained, StudyRecord, read_trials, save_retrained
from psc_nas.search.runner import SearchSettings, run_search
from psc_nas.train import fit_into
from psc_nas.weights import save_weights


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def run(run_dir):
    return Run.open(run_dir)


def cli(*args: str):
    return CliRunner().invoke(export_app, list(args))


@pytest.mark.parametrize(
    "text, pick",
    [
        ("knee", Pick("knee")),
        ("BEST", Pick("best")),
        ("trial 12", Pick("trial", number=12)),
        ("under 2M", Pick("under", limit=2_000_000)),
        ("under 1.5G macs", Pick("under", limit=1_500_000_000, cost="macs")),
    ],
)
def test_pick_forms(text, pick):
    assert Pick.parse(text) == pick


@pytest.mark.parametrize("text", ["knees", "trial", "trial x", "under", "under 5X", "under 2M flops", ""])
def test_pick_rejects_anything_else(text):
    with pytest.raises(ValueError, match="--pick must be one of|expected a count"):
        Pick.parse(text)


def test_default_pick_is_the_knee_and_rebuilds_with_the_recorded_cost(run, tmp_path):
    done = export(run.path, out_dir=tmp_path)
    assert done.record.number == run.knee()
    path = done.files["config"]
    assert path == tmp_path / f"trial-{run.knee()}.yaml"
    with implementation("reference"):  # the MAC-exact convs: FlopCounterMode counts the analytic cost
        model = psc_nas.build_model(str(path))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, *SPATIAL))
    assert sum(p.numel() for p in model.parameters()) == done.record.params
    assert counter.get_total_flops() // 2 == done.record.macs


def test_best_and_under_pick_the_most_accurate_candidate(run, tmp_path):
    table = run.table()
    candidates = table[(table.state == "COMPLETE") & table.feasible]
    best = export(run.path, "best", out_dir=tmp_path)
    assert best.record.number == candidates.sort_values("quality", ascending=False).number.iloc[0]

    limit = int(candidates.params.median())
    under = export(run.path, f"under {limit}", fmt="json", out_dir=tmp_path)
    fitting = candidates[candidates.params <= limit]
    assert under.record.number == fitting.sort_values("quality", ascending=False).number.iloc[0]
    assert under.record.params <= limit
    assert ArchConfig.load(under.files["config"]) == run.config(under.record.number)


def test_cli_exports_a_named_trial(run, tmp_path):
    number = next(r.number for r in run.records if r.state == TrialState.COMPLETE and r.preset == "csn_ip")
    result = cli(str(run.path), "--pick", f"trial {number}", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"trial {number} (trial {number}): ")
    assert ArchConfig.load(tmp_path / f"trial-{number}.yaml") == run.config(number)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_and_onnx_compute_the_same_network(run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    done = export(run.path, "best", out_dir=tmp_path, torchscript=True, onnx=True, allow_untrained=True)
    assert done.weights is None and done.warnings[0].startswith("WARNING: ")
    x = torch.randn(1, 1, *SPATIAL)
    scripted = torch.jit.load(str(done.files["torchscript"]))
    expected = scripted(x).detach().numpy()
    assert expected.shape == (1, 4, *SPATIAL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"trial-{done.record.number}.{ext}" for ext in ("onnx", "torchscript.pt", "yaml")
    ]
    session = ort.InferenceSession(str(done.files["onnx"]))
    (got,) = session.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pick", "under 1k"], "no finished trial has params <= 1k"),
        (["--pick", "trial 99"], "has no trial 99"),
        (["--pick", "nearest"], "--pick must be one of"),
        (["--format", "toml"], "--format must be one of"),
    ],
)
def test_cli_errors_are_one_line(run, args, message):
    result = cli(str(run.path), *args)
    assert result.exit_code == 1
    assert message in result.output and result.output.count("\n") == 1, result.output


def test_cli_refuses_failed_running_and_over_budget_trials(run):
    running = next(r for r in run.records if r.state == TrialState.RUNNING)
    result = cli(str(run.path), "--pick", f"trial {running.number}")
    assert result.exit_code == 1
    assert result.output == f"psc-export: trial {running.number} still running; only finished trials can be exported\n"
    failed = next(r for r in run.records if r.state == TrialState.FAIL)
    result = cli(str(run.path), "--pick", f"trial {failed.number}")
    assert result.exit_code == 1
    assert (
        result.output == f"psc-export: trial {failed.number} failed: at 3 epochs: non-finite loss; "
        "only finished trials can be exported\n"
    )
    conv3d = next(r for r in run.records if r.preset == "conv3d")
    result = cli(str(run.path), "--pick", f"trial {conv3d.number}")
    assert result.exit_code == 1
    used = conv3d.params
    assert result.output == (
        f"psc-export: trial {conv3d.number} is over budget (params {used:,} > budget {used - 1:,}, "
        f"+{100 / (used - 1):.2g}%) and was never trained; over-budget trials are priced, not "
        "evaluated\n"
    )


def test_cli_refuses_a_folder_without_a_study(tmp_path):
    result = cli(str(tmp_path))
    assert result.exit_code == 1
    assert result.output == f"psc-export: {tmp_path} is not a search run: no study.db in it\n"


@pytest.mark.slow
def test_a_real_search_run_exports_its_best_yaml_and_the_dashboard_agrees(tmp_path):
    """psc-search (with the search tests' stand-in evaluator) writes the run; we read it back."""
    out = tmp_path / "ibsr-2M"
    run_search(
        SearchSettings(
            task="ibsr", budget=Budget(params=2_000_000), trials=6, out=out, retrain=False, prescreen="none"
        ),
        evaluator=search_standin.StandinEvaluator(),
        console=Console(quiet=True),
    )
    pareto = json.loads((out / "pareto.json").read_text())
    done = export(out, out_dir=tmp_path / "export")
    assert done.record.number == pareto["knee"]
    assert done.files["config"].read_text() == (out / "best.yaml").read_text()
    with implementation("reference"):
        model = psc_nas.build_model(str(out / "best.yaml"))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, *search_standin.SPATIAL))
    assert sum(p.numel() for p in model.parameters()) == done.record.params
    assert counter.get_total_flops() // 2 == done.record.macs

    data = payload(Run.open(out))
    assert data["knee"] == pareto["knee"]
    assert data["hypervolume"][-1]["hypervolume"] == pytest.approx(pareto["hypervolume"])


# ------------------------------------------------------------------------------ trained weights
def validate(net: torch.nn.Module, task) -> dict[str, float]:
    """The task's validation, run here by hand (no Lightning): its val loader, predict() and metrics."""
    data = task.datamodule(seed=0)
    data.setup("validate")
    metrics = task.metrics()
    metrics.reset()
    with torch.no_grad():
        for batch in data.val_dataloader():
            metrics.update(task.predict(net, batch), batch)
    return metrics.compute()


def retrained_copy(run_dir, tmp_path, *, number=None, write=True):
    """A copy of the demo run in which trial ``number`` (default: the knee) was retrained and kept its
    weights (random ones, saved as a search would save them): (run folder, trial number, the weights)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    study = optuna.load_study(study_name=run_dir.name, storage=f"sqlite:///{copy / 'study.db'}")
    run = Run.open(copy)
    number = run.knee() if number is None else number
    record = run.trial(number)
    torch.manual_seed(3)
    net = psc_nas.build_model(record.config())
    relative = f"front/{number}.weights.pt"
    if write:
        save_weights(net, copy / relative)
    words = "retrained: 4 epochs × 8 samples, one-cycle, full width"
    evaluation = Evaluation("retrain", Fidelity(4, words), {"dice_mean": 0.7}, [], wall_s=5.0, evaluated_by=number)
    save_retrained(study, Retrained(record.arch_hash, evaluation, 0, number, relative))
    write_outputs(copy, StudyRecord.read(study), read_trials(study))  # front/, best.yaml (+ best.weights.pt)
    return copy, number, net.eval()


def test_export_writes_the_searchs_weights_and_load_model_rebuilds_that_network(run_dir, tmp_path):
    copy, number, net = retrained_copy(run_dir, tmp_path)
    out = tmp_path / "export"
    result = cli(str(copy), "--pick", f"trial {number}", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"  weights: {out / f'trial-{number}.weights.pt'}" in result.output
    assert "  trained: retrained: 4 epochs × 8 samples, one-cycle, full width, dice_mean 0.7000" in result.output
    assert sorted(p.name for p in out.iterdir()) == [f"trial-{number}.weights.pt", f"trial-{number}.yaml"]
    x = torch.randn(1, 1, *SPATIAL)
    expected = net(x)
    fresh = psc_nas.build_model(out / f"trial-{number}.yaml").eval()
    assert not torch.allclose(fresh(x), expected)  # an untrained rebuild differs: the weights carry the network
    for path in (
        out / f"trial-{number}.yaml",
        out,
        out / f"trial-{number}.weights.pt",
        copy / "front" / f"{number}.yaml",
    ):
        model = psc_nas.load_model(path)
        assert not model.training
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model = psc_nas.load_model(copy)  # the run folder: best.yaml is this retrained trial's, with best.weights.pt
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_carries_the_trained_weights(run_dir, tmp_path):
    copy, number, net = retrained_copy(run_dir, tmp_path)
    done = export(copy, f"trial {number}", out_dir=tmp_path / "export", torchscript=True)
    assert done.warnings == () and done.weights.startswith("retrained: 4 epochs")
    x = torch.randn(1, 1, *SPATIAL)
    torch.testing.assert_close(torch.jit.load(str(done.files["torchscript"]))(x), net(x))


def test_torchscript_and_onnx_refuse_untrained_weights_unless_allowed(run, tmp_path):
    number = run.knee()
    result = cli(str(run.path), "--torchscript", "--onnx", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert result.output == (
        f"psc-export: --torchscript and --onnx need trained weights and trial {number} was not retrained after "
        "the search; add --retrain to train it, or --allow-untrained to export random weights\n"
    )
    assert not list(tmp_path.iterdir())  # refused before writing anything
    result = cli(str(run.path), "--torchscript", "--allow-untrained", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "no trained weights: build_model(config) gives an untrained network" in result.output
    assert (
        f"WARNING: trial-{number}.torchscript.pt carry UNTRAINED, randomly initialized weights "
        f"(trial {number} was not retrained after the search)\n"
    ) in result.output
    assert (tmp_path / f"trial-{number}.torchscript.pt").is_file()
    assert not (tmp_path / f"trial-{number}.weights.pt").exists()


def test_export_names_the_trials_with_weights_when_refusing(run_dir, tmp_path):
    copy, number, _ = retrained_copy(run_dir, tmp_path)
    other = next(r.number for r in Run.open(copy).completed() if r.number != number)
    result = cli(str(copy), "--pick", f"trial {other}", "--torchscript")
    assert result.exit_code == 1
    assert f"trial {other} was not retrained after the search (trials with weights: {number});" in result.output


def test_export_of_missing_or_corrupt_weights_is_one_line(run_dir, tmp_path):
    copy, number, _ = retrained_copy(run_dir, tmp_path, write=False)
    result = cli(str(copy), "--pick", f"trial {number}", "--out", str(tmp_path / "a"))
    assert result.exit_code == 1
    assert result.output == (
        f"psc-export: trial {number}'s retrained weights {copy / 'front' / f'{number}.weights.pt'} are missing "
        "(moved or deleted?); --retrain trains the network again\n"
    )
    assert not (tmp_path / "a").exists()
    weights = copy / "front" / f"{number}.weights.pt"
    weights.write_bytes(b"not a torch file")
    result = cli(str(copy), "--pick", f"trial {number}", "--out", str(tmp_path / "b"))
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"psc-export: {weights}: not a readable weights file (not written by torch.save; ")


def test_load_model_errors_are_one_line(run, tmp_path):
    config = run.config(run.knee())
    path = config.save(tmp_path / "net.yaml")
    cases = []
    with pytest.raises(psc_nas.WeightsError) as error:
        psc_nas.load_model(path)
    cases.append(error)
    assert str(error.value) == (
        f"{path}: no trained weights beside it (expected net.weights.pt); build_model(path) gives the untrained network"
    )
    weights = tmp_path / "net.weights.pt"
    full = psc_nas.build_model(config).state_dict()
    weights.write_bytes(pickle.dumps(full)[:100])  # a truncated file
    with pytest.raises(psc_nas.WeightsError, match=r"net.weights.pt: not a readable weights file \(") as error:
        psc_nas.load_model(path)
    cases.append(error)
    truncated = io.BytesIO()
    torch.save(full, truncated)
    weights.write_bytes(truncated.getvalue()[: len(truncated.getvalue()) // 2])
    with pytest.raises(
        psc_nas.WeightsError, match=r"weights.pt: not a readable weights file \(truncated or damaged; "
    ) as error:
        psc_nas.load_model(path)
    cases.append(error)
    torch.save([1, 2, 3], weights)
    with pytest.raises(psc_nas.WeightsError, match=r"net.weights.pt: holds no state dict") as error:
        psc_nas.load_model(path)
    cases.append(error)
    other = run.config(next(r.number for r in run.completed() if r.arch_hash != config.hash))
    save_weights(psc_nas.build_model(other), weights)  # another architecture's weights
    with pytest.raises(psc_nas.WeightsError, match=r"net.weights.pt: the weights do not fit the network: ") as error:
        psc_nas.load_model(path)
    cases.append(error)
    state = dict(full)
    state.pop(next(iter(state)))
    save_weights(state, weights)
    with pytest.raises(psc_nas.WeightsError, match=r"do not fit the network: 1 missing \(") as error:
        psc_nas.load_model(path)
    cases.append(error)
    with pytest.raises(psc_nas.WeightsError, match=r"nowhere.yaml: no such file or folder") as error:
        psc_nas.load_model(tmp_path / "nowhere.yaml")
    cases.append(error)
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    with pytest.raises(psc_nas.WeightsError, match=r"bad.ckpt: not a readable checkpoint \(") as error:
        psc_nas.load_model(tmp_path / "bad.ckpt")
    cases.append(error)
    save_weights(full, tmp_path / "net.weights.pt")
    config.save(tmp_path / "twin.yaml")
    save_weights(full, tmp_path / "twin.weights.pt")
    with pytest.raises(psc_nas.WeightsError, match=r"holds 2 networks with weights \(net.yaml, twin.yaml\)") as error:
        psc_nas.load_model(tmp_path)
    cases.append(error)
    assert all("\n" not in str(case.value) for case in cases)


# ------------------------------------------------------------------------------ end to end, real training
# enough to learn the bar axis (error well below chance, 2/3), so a wrong or untrained network shows
TINY_RETRAIN = RetrainPolicy(count=2, epochs=5, samples_per_epoch=128, batch_size=8, lr=1e-2, lr_schedule="onecycle")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_a_retrained_search_exports_weights_that_reproduce_the_retrained_score(tmp_path, monkeypatch):
    """A real tiny search with retraining -> psc-export -> load_model -> the task's validation again."""
    monkeypatch.setitem(PROFILES, "tiny", tiny_task.retraining_profile(TINY_RETRAIN))
    (tmp_path / "bars.yaml").write_text(tiny_task.SPACE_YAML)
    out = tmp_path / "bars"
    settings = SearchSettings(
        task="bar_axis", space=str(tmp_path / "bars.yaml"), budget=Budget(params=400_000), profile="tiny", out=out
    )
    run_search(settings, console=Console(quiet=True))
    task = tiny_task.BarAxisTask()
    run = Run.open(out)
    retrained = {r.retrained.trial: r.retrained for r in run.records if r.retrained is not None}
    assert retrained, "the tiny search retrained nothing"
    pareto = json.loads((out / "pareto.json").read_text())
    assert {m["number"]: m["weights"] for m in pareto["retrained"]["members"]} == {
        n: f"front/{n}.weights.pt" for n in retrained
    }
    for number, result in retrained.items():  # every retrained network kept, beside its config
        assert result.weights == f"front/{number}.weights.pt"
        model = psc_nas.load_model(out / "front" / f"{number}.yaml")
        assert validate(model, task)["error"] == pytest.approx(result.metrics["error"], rel=1e-6)

    best = run.knee()
    result = cli(str(out), "--out", str(tmp_path / "export"))
    assert result.exit_code == 0, result.output
    assert f"  trained: {retrained[best].fidelity.words}" in result.output
    assert retrained[best].metrics["error"] < 0.5  # it learned: a score an untrained network would not match
    model = psc_nas.load_model(tmp_path / "export" / f"trial-{best}.yaml")
    scores = validate(model, task)
    assert scores["error"] == pytest.approx(retrained[best].metrics["error"], rel=1e-6)
    assert scores["accuracy"] == pytest.approx(retrained[best].metrics["accuracy"], rel=1e-6)
    x = torch.randn(2, *task.input_shape)
    torch.testing.assert_close(psc_nas.load_model(out)(x), model(x), rtol=0, atol=0)  # best.weights.pt

    # --retrain trains the pick again here: its own weights, loadable the same way, and a TorchScript of them
    again = tmp_path / "again"
    result = cli(str(out), "--retrain", "--epochs", "1", "--torchscript", "--out", str(again))
    assert result.exit_code == 0, result.output
    assert "  trained: retrained here: 1 epoch, best epoch" in result.output and "WARNING" not in result.output
    model = psc_nas.load_model(again / f"trial-{best}.yaml")
    scripted = torch.jit.load(str(again / f"trial-{best}.torchscript.pt"))
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.slow
def test_a_psc_train_checkpoint_loads_the_same_way(tmp_path):
    task = tiny_task.BarAxisTask()
    config = preset_config("p2sc2", task.backbone, **task.backbone_hparams)
    trained = fit_into(
        tmp_path / "run",
        config,
        task,
        epochs=4,
        lr=1e-2,
        lr_schedule="onecycle",
        data_options={"samples_per_epoch": 128},
    )
    assert trained.best_metric < 0.5
    assert trained.checkpoint == tmp_path / "run" / "best.ckpt"
    model = psc_nas.load_model(trained.checkpoint)
    assert not model.training and sum(p.numel() for p in model.parameters()) == psc_nas.cost(config, (16,) * 3).params
    assert validate(model, task)["error"] == pytest.approx(trained.best_metric, rel=1e-6)  # the best epoch's weights
    x = torch.randn(2, *task.input_shape)
    torch.testing.assert_close(psc_nas.load_model(tmp_path / "run")(x), model(x), rtol=0, atol=0)

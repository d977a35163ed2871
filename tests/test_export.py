"""psc-export on a real SQLite Optuna study (tests/_search_run.py): picks, rebuilds, formats, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import search_standin
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
from psc_nas.export import Pick, export
from psc_nas.results import Run
from psc_nas.search.budget import Budget
from psc_nas.search.runner import SearchSettings, run_search


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
    done = export(run.path, "best", out_dir=tmp_path, torchscript=True, onnx=True)
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
        SearchSettings(task="ibsr", budget=Budget(params=2_000_000), trials=6, out=out, retrain=False),
        evaluator=search_standin.StandinEvaluator(),
        console=Console(quiet=True),
    )
    pareto = json.loads((out / "pareto.json").read_text())
    done = export(out, out_dir=tmp_path / "export")
    assert done.record.number == pareto["knee"]
    assert done.files["config"].read_text() == (out / "best.yaml").read_text()
    model = psc_nas.build_model(str(out / "best.yaml"))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, *search_standin.SPATIAL))
    assert sum(p.numel() for p in model.parameters()) == done.record.params
    assert counter.get_total_flops() // 2 == done.record.macs

    data = payload(Run.open(out))
    assert data["knee"] == pareto["knee"]
    assert data["hypervolume"][-1]["hypervolume"] == pytest.approx(pareto["hypervolume"])

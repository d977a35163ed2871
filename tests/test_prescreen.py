"""The zero-cost pre-screen (``psc-search --prescreen``): real proxies on the IBSR networks the search prices, a
real SQLite study, the real CLI and a real Ctrl-C."""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import optuna
import pandas as pd
import pytest
from cli_process import cli_env, ctrl_c_when, run_cli
from test_search import search

from psc_nas.evaluators.zero_cost import proxy_score, training_batch
from psc_nas.nets.budget import with_width
from psc_nas.search.budget import Budget
from psc_nas.search.prescreen import Prescreen, Screened, choose, draw, ranks_with_macs, screening_batch, write_csv
from psc_nas.search.record import SETUP_PROGRESS, read_trials, set_planned_trials, wait_until_set_up
from psc_nas.search.runner import SearchSettings, plan_search
from psc_nas.tasks import get_task


def rows(points: list[tuple[float, int]]) -> list[Screened]:
    return [Screened(f"h{i}", params, 0, score, {}) for i, (score, params) in enumerate(points)]


def test_choose_takes_whole_fronts_in_turn_and_thins_the_last_by_spread():
    # front 0: (9, 100), (8, 50), (5, 10), (3, 5); front 1: (7, 60), (4, 20); the rest dominated further
    screened = rows([(9, 100), (8, 50), (7, 60), (5, 10), (4, 20), (3, 5), (1, 200), (-math.inf, 1)])
    assert choose(screened, 4) == [0, 1, 3, 5]  # exactly the first front
    assert choose(screened, 6) == [0, 1, 3, 5, 2, 4]  # then the whole second one, front by front
    assert set(choose(screened, 2)) == {0, 5}  # a front cut short keeps its extremes: both ends of the cost range
    assert choose(screened, 8)[-1] == 7  # a score that is not finite comes last
    assert choose(screened, 0) == []


def test_prescreen_refuses_an_unknown_proxy_or_an_empty_screen():
    with pytest.raises(ValueError, match="unknown --prescreen proxy 'nope'; choose from grad_norm"):
        Prescreen("nope")
    with pytest.raises(ValueError, match="unknown --prescreen proxy 'nope\\+macs'.*zico\\+macs"):
        Prescreen("nope+macs")
    with pytest.raises(ValueError, match="unknown --prescreen proxy 'zico\\+params'"):
        Prescreen("zico+params")
    assert (Prescreen("zico+macs").zero_cost, Prescreen("zico+macs").with_macs) == ("zico", True)
    assert (Prescreen("zico").zero_cost, Prescreen("zico").with_macs) == ("zico", False)
    with pytest.raises(ValueError, match="--prescreen-size must be at least 1"):
        Prescreen("grad_norm", 0)
    for width in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="--prescreen-width must be in \\(0, 1\\]"):
            Prescreen("zico", width=width)


@pytest.mark.slow
def test_a_prescreened_search_trains_the_screen_s_best_after_the_presets_and_keeps_every_score(tmp_path):
    study, _ = search(tmp_path, trials=5, prescreen="grad_norm", prescreen_size=6, prescreen_width=1.0)
    screen = study.user_attrs["prescreen"]
    assert (screen["proxy"], screen["scored"], len(screen["rows"])) == ("grad_norm", 6, 6)
    records = read_trials(study)
    presets = [r for r in records if r.preset]
    assert {r.preset for r in presets} == {"csn_ip", "csn_ir"}  # the space's presets under 5M come first
    queued = {row["arch_hash"] for row in screen["rows"] if row["queued"]}
    assert len(queued) == screen["queued"] == 5 - len(presets)
    screened_trials = [r for r in records if not r.preset]
    assert {r.arch_hash for r in screened_trials} == queued  # the screen's picks are what was trained
    assert all(r.state == optuna.trial.TrialState.COMPLETE for r in records)
    assert not queued & {r.arch_hash for r in presets}
    # whole non-dominated fronts of (grad_norm, params) in turn: whatever dominates a queued row is queued too
    by_hash = {row["arch_hash"]: row for row in screen["rows"]}
    for h in queued:
        mine = (by_hash[h]["score"], by_hash[h]["params"])
        dominating = [
            o["arch_hash"]
            for o in screen["rows"]
            if o["score"] >= mine[0] and o["params"] <= mine[1] and (o["score"], o["params"]) != mine
        ]
        assert set(dominating) <= queued
    # every recorded score is the proxy of the full network (--prescreen-width 1): recomputed for one architecture
    trial = screened_trials[0]
    task = get_task("ibsr")
    batch = training_batch(task, seed=0, patch_size=(16, 16, 16))  # IBSR's screen_data_options
    again = proxy_score("grad_norm", trial.config(), task, seed=0, batch=batch)
    assert by_hash[trial.arch_hash]["score"] == pytest.approx(again, rel=1e-4)
    assert study.trials[trial.number].user_attrs["prescreen"].startswith("grad_norm ")
    table = pd.read_csv(tmp_path / "run" / "prescreen.csv")
    assert list(table.columns) == ["arch_hash", "params", "macs", "grad_norm", "queued"]
    assert len(table) == 6 and table["grad_norm"].is_monotonic_decreasing and table["queued"].sum() == 3
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert trials["prescreen"].notna().sum() == 3 and trials.loc[trials["preset"].notna(), "prescreen"].isna().all()
    pareto = json.loads((tmp_path / "run" / "pareto.json").read_text())
    assert pareto["prescreen"]["scored"] == 6 and pareto["prescreen"]["file"] == "prescreen.csv"
    assert "rows" not in pareto["prescreen"]


def test_ranks_with_macs_adds_the_two_ranks_ties_averaged_and_keeps_failures_last():
    values = [0.5, 3.0, -math.inf, 2.0, 2.0]
    macs = [40, 10, 1, 30, 20]
    # finite values ranked 1, 4, -, 2.5, 2.5; their MACs among the same rows 4, 1, -, 3, 2
    assert ranks_with_macs(values, macs) == [5.0, 5.0, -math.inf, 5.5, 4.5]
    assert ranks_with_macs([], []) == []


def test_the_screen_csv_names_the_proxy_and_for_a_combined_screen_both_columns(tmp_path):
    rows = [
        {"arch_hash": "a", "params": 10, "macs": 5, "score": 1.0, "queued": False},
        {"arch_hash": "b", "params": 20, "macs": 6, "score": 2.0, "queued": True},
    ]
    write_csv(tmp_path, {"proxy": "zico", "rows": rows})
    table = pd.read_csv(tmp_path / "prescreen.csv")
    assert list(table.columns) == ["arch_hash", "params", "macs", "zico", "queued"]
    assert list(table["arch_hash"]) == ["b", "a"]  # best first
    combined = [{**row, "proxy_value": 100.0 - row["score"]} for row in rows]
    write_csv(tmp_path, {"proxy": "zico+macs", "rows": combined})
    table = pd.read_csv(tmp_path / "prescreen.csv")
    assert list(table.columns) == ["arch_hash", "params", "macs", "zico", "zico+macs", "queued"]
    assert list(table["zico"]) == [98.0, 99.0] and list(table["zico+macs"]) == [2.0, 1.0]


@pytest.mark.slow
def test_a_combined_screen_ranks_by_the_proxy_s_rank_plus_the_macs_rank_on_the_task_s_screening_batch(tmp_path):
    study, out = search(tmp_path, trials=4, prescreen="grad_norm+macs", prescreen_size=6)
    screen = study.user_attrs["prescreen"]
    assert screen["proxy"] == "grad_norm+macs" and screen["batch"] == "4 samples of 1x16x16x16"  # IBSR: 16³
    assert screen["width"] == 0.25  # IBSR's quick profile scores each network's copy at width 0.25
    rows = screen["rows"]
    assert [r["score"] for r in rows] == ranks_with_macs([r["proxy_value"] for r in rows], [r["macs"] for r in rows])
    # the raw proxy is grad_norm of the network's width-0.25 copy on the screening batch: recomputed for one
    # architecture; its costs are the full network's, as the search prices it
    trial = next(r for r in read_trials(study) if r.prescreen)
    task = get_task("ibsr")
    batch = screening_batch(Prescreen("grad_norm+macs"), task)
    again = proxy_score("grad_norm", with_width(trial.config(), 0.25), task, seed=0, batch=batch)
    full = proxy_score("grad_norm", trial.config(), task, seed=0, batch=batch)
    row = next(r for r in rows if r["arch_hash"] == trial.arch_hash)
    assert row["proxy_value"] == pytest.approx(again, rel=1e-4) and row["proxy_value"] != pytest.approx(full, rel=1e-2)
    assert (row["params"], row["macs"]) == (trial.params, trial.macs)
    assert trial.prescreen.startswith("grad_norm+macs ")
    table = pd.read_csv(out / "prescreen.csv")
    assert list(table.columns) == ["arch_hash", "params", "macs", "grad_norm", "grad_norm+macs", "queued"]
    pareto = json.loads((out / "pareto.json").read_text())["prescreen"]
    assert "rank plus the MAC count's rank" in pareto["what"] and "1x16x16x16" in pareto["what"]
    assert "copy at width 0.25 (its costs the full network's)" in pareto["what"]


@pytest.mark.slow
def test_psc_search_with_a_bad_prescreen_is_one_line_and_writes_nothing(tmp_path):
    for args, message in (
        (("--prescreen", "nope"), "unknown --prescreen proxy 'nope'"),
        (("--prescreen", "grad_norm", "--prescreen-size", "0"), "--prescreen-size must be at least 1"),
        (("--prescreen-width", "0"), "--prescreen-width must be in (0, 1], got 0"),
    ):
        result = run_cli("psc-search", "--task", "ibsr", "--budget", "5M", "--out", "run", *args, cwd=tmp_path)
        assert result.returncode != 0 and result.returncode != 130, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ctrl_c_during_the_prescreen_exits_130_and_leaves_no_run_behind(tmp_path):
    result = ctrl_c_when(
        "pre-screen: scoring",
        "psc-search",
        *("--task", "ibsr", "--budget", "5M", "--out", "run", "--trials", "4", "--no-retrain"),
        *("--prescreen", "grad_norm", "--prescreen-size", "200"),
        cwd=tmp_path,
        env=cli_env(),
        settle=1.0,
    )
    assert result.returncode == 130, (result.stdout, result.stderr)
    assert "interrupted" in result.stderr
    assert not (tmp_path / "run").exists()  # the study was never set up: nothing to resume, nothing half-written


def test_draw_gives_distinct_architectures_within_the_budget():
    plan = plan_search(SearchSettings(task="ibsr", budget=Budget(params=2_000_000), out=None))
    configs = draw(plan.pricing, 30, seed=1, avoid=set())
    assert len({c.hash for c in configs}) == 30
    assert all(plan.pricing.price(c).params <= 2_000_000 for c in configs)
    assert [c.hash for c in draw(plan.pricing, 30, seed=1, avoid=set())] == [c.hash for c in configs]  # seeded


def test_a_prescreen_asked_on_a_resume_says_it_is_ignored(tmp_path, caplog):
    search(tmp_path, trials=2)
    study, _ = search(tmp_path, trials=2, prescreen="grad_norm", prescreen_size=3)  # the same run, resumed
    assert "--prescreen ignored: study 'run' exists" in caplog.text
    assert "prescreen" not in study.user_attrs and not (tmp_path / "run" / "prescreen.csv").exists()


def test_a_joining_worker_waits_while_the_creator_s_screen_progresses_and_not_longer(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    creator = optuna.create_study(storage=storage, study_name="s")
    joiner = optuna.load_study(storage=storage, study_name="s")

    def screen_then_set_up() -> None:
        for done in range(1, 8):  # 7 × 0.3 s of screening: past the joiner's 0.8 s patience, which it resets
            time.sleep(0.3)
            creator.set_user_attr(SETUP_PROGRESS, done)
        set_planned_trials(creator, 4)

    worker = threading.Thread(target=screen_then_set_up)
    worker.start()
    started = time.monotonic()
    wait_until_set_up(joiner, timeout=0.8)
    worker.join()
    assert time.monotonic() - started > 2.0
    stalled = optuna.create_study(storage=storage, study_name="stalled")
    stalled.set_user_attr(SETUP_PROGRESS, 3)  # a creator that stopped screening: the joiner gives up
    with pytest.raises(ValueError, match="exists but was never set up"):
        wait_until_set_up(optuna.load_study(storage=storage, study_name="stalled"), timeout=0.8)


def test_draw_near_the_space_s_minimum_returns_what_fits_and_stops():
    plan = plan_search(SearchSettings(task="ibsr", budget=Budget(params=740_000), out=None))  # the cheapest: 724k
    configs = draw(plan.pricing, 50, seed=0, avoid=set())
    assert 0 < len(configs) < 50 and len({c.hash for c in configs}) == len(configs)
    assert all(plan.pricing.price(c).params <= 740_000 for c in configs)


def test_an_architecture_whose_proxy_fails_is_ranked_last_and_the_screen_goes_on(monkeypatch, caplog):
    from psc_nas.search import prescreen as module

    plan = plan_search(SearchSettings(task="ibsr", budget=Budget(params=5_000_000), out=None))
    victim = draw(plan.pricing, 4, seed=0, avoid=set())[1].hash

    def proxy(name, config, task, **kwargs):
        if config.hash == victim:
            raise RuntimeError("out of memory")
        return float(cost_of(config))

    def cost_of(config):
        return plan.pricing.price(config).params / 1e6

    monkeypatch.setattr(module, "proxy_score", proxy)
    rows, _, _ = module.screen(Prescreen("grad_norm", 4), plan.pricing, plan.task, keep=3)
    assert [r.arch_hash for r in rows if not math.isfinite(r.score)] == [victim]
    assert [r.queued for r in rows if r.arch_hash == victim] == [False]  # 3 finite rows fill the 3 places
    assert "pre-screen: grad_norm of" in caplog.text and "out of memory" in caplog.text


def test_a_prescreen_with_no_free_place_in_the_queue_is_skipped_saying_so(tmp_path, caplog):
    study, _ = search(tmp_path, trials=2, prescreen="snip")
    assert "--prescreen skipped: the 2 presets fill all 2 trials" in caplog.text
    assert "prescreen" not in study.user_attrs


def test_ibsr_s_quick_profile_screens_by_zico_plus_macs_unless_told_otherwise():
    def planned(**settings):
        return plan_search(SearchSettings(**{"task": "ibsr", "budget": Budget(params=5_000_000), **settings})).prescreen

    # psc-search --task ibsr's default: 300 screened, each scored at width 0.25
    assert planned() == Prescreen("zico+macs", 300, asked=False, width=0.25)
    assert planned(prescreen="none") is None
    assert planned(prescreen="snip", prescreen_size=7, seed=3) == Prescreen("snip", 7, seed=3, width=0.25)
    assert planned(prescreen_width=1.0, prescreen_size=50) == Prescreen("zico+macs", 50, asked=False, width=1.0)
    assert planned(profile="paper") is None  # a profile without a screen
    assert planned(profile="paper", prescreen="zico") == Prescreen("zico", 100, width=1.0)  # the screen's defaults
    assert planned(engine="nni") is None  # the profile's screen fills Optuna's queue; NNI has none to fill
    with pytest.raises(ValueError, match="--prescreen fills the queue of --engine optuna; --engine nni has none"):
        planned(engine="nni", prescreen="zico")


def test_the_profile_s_screen_skipped_or_ignored_is_no_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="psc_nas.search")
    search(tmp_path, trials=2, prescreen=None)  # the presets fill both trials: no room for the profile's screen
    search(tmp_path, trials=2, prescreen=None)  # resumed
    assert "--prescreen skipped" in caplog.text and "--prescreen ignored" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "--prescreen" in r.getMessage()]

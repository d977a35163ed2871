"""The dashboard in a real headless Chromium, on a real SQLite Optuna study (tests/_search_run.py)."""

from __future__ import annotations

import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from _search_run import FIDELITY, SPATIAL, make_run
from optuna.trial import TrialState
from PIL import Image, ImageChops
from test_search_workers import postgres_url  # noqa: F401  (the throw-away PostgreSQL server fixture)
from typer.testing import CliRunner

import psc_nas
from psc_nas.arch import ArchConfig
from psc_nas.cli import dashboard_app, export_app
from psc_nas.dashboard import architecture, make_server, payload, write_snapshot
from psc_nas.evaluators import Evaluation, Fidelity
from psc_nas.ops import label
from psc_nas.presets import PRESETS
from psc_nas.results import Run
from psc_nas.search import prescreen
from psc_nas.search.budget import Budget
from psc_nas.search.prescreen import Screened
from psc_nas.search.record import (
    Objective,
    Retrained,
    StudyRecord,
    TrialRecord,
    save_retrained,
    set_violations,
    tell_evaluated,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


LOW = Fidelity(1, "1 epoch × 8 samples")
RETRAINED = Fidelity(6, "retrained: 6 epochs × 32 samples, one-cycle, full width")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


def add_trial(study: optuna.Study, config: ArchConfig, dice: float, fidelity: Fidelity = FIDELITY) -> int:
    """Tell one trial scored at ``fidelity`` as psc-search records it: priced, evaluated, within budget."""
    price = psc_nas.cost(config, SPATIAL)
    trial = study.ask()
    metrics = {"dice_mean": dice, "dice_gm": dice - 0.01, "dice_wm": dice + 0.01}
    curve = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "dice_mean": dice * (e + 1) / fidelity.key}
        for e in range(fidelity.key)
    ]
    evaluation = Evaluation("train", fidelity, metrics, curve, wall_s=2.0, evaluated_by=trial.number)
    TrialRecord(trial.number).priced(config, price).with_evaluation(evaluation).save(trial)
    set_violations(trial, StudyRecord.read(study).budget.violations(price))
    tell_evaluated(study, trial, [dice, price.params])
    return trial.number


def retrain(run: Run, number: int, dice: float) -> None:
    """Store a retraining of trial ``number``'s architecture, as psc-search does after the search."""
    record = run.trial(number)
    metrics = {"dice_mean": dice, "dice_gm": dice - 0.02, "dice_wm": dice + 0.02}
    curve = [{"epoch": e, "train_loss": 0.5 / (e + 1), "dice_mean": dice * (e + 1) / 6} for e in range(6)]
    evaluation = Evaluation("retrain", RETRAINED, metrics, curve, wall_s=20.0, evaluated_by=number)
    save_retrained(run.study, Retrained(record.arch_hash, evaluation, seed=0, trial=number))


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> Path:
    """A run scored at two search fidelities whose front was partly retrained: best.yaml's trial is the
    knee of the retrained members, which need not be the knee by search scores."""
    run_dir = make_run(tmp_path_factory.mktemp("mixed"))
    run = Run.open(run_dir, writable=True)
    replace(run.record, input_shape=(1, *SPATIAL)).write(run.study)  # as psc-search records it now
    base = run.config(run.records[0].number)
    add_trial(run.study, base.with_blocks([PRESETS["csn_ir"]] * len(base.blocks)), 0.5, LOW)
    run.refresh()
    members = sorted(run.front().members, key=lambda r: r.params)
    retrain(run, members[0].number, 0.7)
    retrain(run, members[-1].number, 0.75)
    return run_dir


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


class Page:
    """A browser tab that records console errors and every URL the page asks for."""

    def __init__(self, browser, *, offline: bool = False) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.set_default_timeout(TIMEOUT_MS)  # the 5 MB snapshot loads slowly on a busy machine
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        if offline:  # a snapshot must not need the network at all
            self.page.route("http*://**", lambda route: route.abort())

    # The points of the traces that draw each finished trial once (not the retrained scores, the ring
    # around the selected trial or the legend's keys).
    COUNT_TRIALS = """plot => [...document.querySelectorAll(`#${plot} .scatterlayer .trace`)]
        .filter(g => g.__data__ && g.__data__[0] && g.__data__[0].trace.meta === 'trials')
        .reduce((n, g) => n + g.querySelectorAll('.point').length, 0)"""

    def points(self, plot: str = "front-params") -> int:
        return self.page.evaluate(self.COUNT_TRIALS, plot)

    def wait_points(self, expected: int, plot: str = "front-params") -> None:
        self.page.wait_for_function(
            f"([plot, n]) => ({self.COUNT_TRIALS})(plot) === n", arg=[plot, expected], timeout=TIMEOUT_MS
        )

    def click_trial(self, number: int, plot: str = "front-params") -> None:
        """Click the marker of trial ``number`` where plotly drew it."""
        box = self.page.evaluate(
            """([plot, number]) => {
                for (const g of document.querySelectorAll(`#${plot} .scatterlayer .trace`)) {
                    const trace = g.__data__ && g.__data__[0] && g.__data__[0].trace;
                    if (!trace || trace.meta !== 'trials') continue;
                    const j = (trace.customdata || []).indexOf(number);
                    if (j < 0) continue;
                    const r = g.querySelectorAll('.point')[j].getBoundingClientRect();
                    return {x: r.x + r.width / 2, y: r.y + r.height / 2};
                }
                return null;
            }""",
            [plot, number],
        )
        assert box is not None, f"trial {number} is not plotted"
        self.page.mouse.move(box["x"], box["y"])
        self.page.mouse.click(box["x"], box["y"])

    def close(self) -> None:
        self.page.close()


def finished(run_dir: Path) -> list[TrialRecord]:
    return [r for r in Run.open(run_dir).records if r.state.is_finished()]


# ------------------------------------------------------------------------------------ data
def test_architecture_splits_each_block_by_sub_kernel(run_dir):
    run = Run.open(run_dir)
    cakes = next(r for r in run.records if r.preset == "cakes_uniform")
    blocks = architecture(run.config(cakes.number))
    assert [b["slot"] for b in blocks] == ["block1.layer1", "block1.layer2", "block2.layer1", "block2.layer2"]
    for block in blocks:  # 6 channels over the seven CAKES shapes: six of them get one each
        assert block["segments"] == [["1x1x3", 1], ["1x3x1", 1], ["3x1x1", 1], ["1x3x3", 1], ["3x1x3", 1], ["3x3x1", 1]]
    p2sc2 = next(r for r in run.records if r.preset == "p2sc2")
    assert architecture(run.config(p2sc2.number))[0]["segments"] == [["1x3x3×2→3x1x1", 3], ["3x1x3×2→1x3x1", 3]]


def test_payload_marks_states_budget_and_fronts(run_dir):
    data = payload(Run.open(run_dir))
    by_number = {t["number"]: t for t in data["trials"]}
    conv3d = next(t for t in data["trials"] if t["preset"] == "conv3d")
    assert conv3d["state"] == "PRUNED" and conv3d["over_budget"] and not conv3d["feasible"]
    assert conv3d["quality"] is None and conv3d["dice_mean"] is None  # never evaluated, so no score at all
    assert conv3d["params"] > data["run"]["budget_params"]
    assert data["run"]["states"]["FAIL"] == data["run"]["states"]["RUNNING"] == 1
    measured = [t for t in data["trials"] if t["state"] == "COMPLETE" and t["feasible"]]
    assert all(t["quality"] is not None and t["params"] <= data["run"]["budget_params"] for t in measured)
    for number in data["fronts"]["params"]:
        assert by_number[number] in measured
    assert data["knee"] in data["fronts"]["params"]  # two objectives: quality and params
    hv = [h["hypervolume"] for h in data["hypervolume"]]
    assert len(hv) == len(measured) and hv == sorted(hv) and hv[-1] > 0


def test_payload_says_how_each_score_was_measured(mixed_run):
    run = Run.open(mixed_run)
    data = payload(run)
    assert data["run"]["fidelities"] == [
        {"key": FIDELITY.key, "words": FIDELITY.words, "trials": sum(1 for r in run.records if r.feasible) - 1},
        {"key": LOW.key, "words": LOW.words, "trials": 1},
    ]
    assert data["run"]["retrained_fidelities"] == [RETRAINED.words]
    assert data["run"]["input_shape"] == [1, *SPATIAL]
    assert data["knee"] == run.knee() and run.trial(run.knee()).retrained is not None
    retrained = next(t for t in data["trials"] if t["number"] == data["knee"])
    assert retrained["retrained_metrics"] == run.trial(data["knee"]).retrained.metrics


def test_decisions_are_the_blocks_choices(run_dir):
    """One decision per dense block (the space's groups), its value the op label every layer shares."""
    data = payload(Run.open(run_dir))
    for trial in data["trials"]:
        config = Run.open(run_dir).config(trial["number"])
        assert list(trial["decisions"]) == ["block1", "block2"]  # 4 slots, 2 blocks
        for index, block in enumerate(trial["decisions"]):
            layers = dict.fromkeys(label(choice) for choice in config.blocks[2 * index : 2 * index + 2])
            assert trial["decisions"][block] == " + ".join(layers)


def test_cli_reads_a_study_from_storage(run_dir, tmp_path):
    """--storage names the study's database (as psc-search's does); RUN_DIR only receives the outputs."""
    url = f"sqlite:///{run_dir / 'study.db'}"
    before = (run_dir / "study.db").read_bytes()
    elsewhere = tmp_path / "demo"  # the folder name is the study's name, as psc-search names it
    result = CliRunner().invoke(dashboard_app, [str(elsewhere), "--snapshot", "--storage", url])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {elsewhere / 'dashboard.html'}\n"
    page = (elsewhere / "dashboard.html").read_text()
    data = json.loads(page.split('id="run-data">')[1].split("</script>")[0].replace("<\\/", "</"))
    assert len(data["trials"]) == len(Run.open(run_dir).records) and data["knee"] == Run.open(run_dir).knee()

    other = tmp_path / "any-name"  # another folder name: --study-name says which study
    result = CliRunner().invoke(export_app, [str(other), "--storage", url, "--study-name", "demo", "--pick", "knee"])
    assert result.exit_code == 0, result.output
    knee = Run.open(run_dir).knee()
    assert psc_nas.cost(other / "export" / f"trial-{knee}.yaml", SPATIAL).params == Run.open(run_dir).trial(knee).params
    assert (run_dir / "study.db").read_bytes() == before  # readers never write the study

    result = CliRunner().invoke(dashboard_app, [str(other), "--snapshot", "--storage", url, "--study-name", "nope"])
    assert result.exit_code == 1
    assert result.output == f"psc-dashboard: storage {url} holds no study 'nope'; it holds 'demo'\n"
    result = CliRunner().invoke(export_app, [str(other), "--storage", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 1 and not (tmp_path / "none.db").exists()
    assert (
        result.output
        == f"psc-export: --storage sqlite:///{tmp_path / 'none.db'}: no database file {tmp_path / 'none.db'}\n"
    )
    result = CliRunner().invoke(dashboard_app, [str(other), "--storage", "study.db"])
    assert (
        result.exit_code == 1
        and "must be a database URL (sqlite:///..., postgresql://...) or journal:PATH" in result.output
    )


def test_cli_reads_a_journal_study(run_dir, tmp_path):
    journal = tmp_path / "study.log"
    source = Run.open(run_dir).study
    optuna.copy_study(
        from_study_name="demo",
        from_storage=source._storage,
        to_storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))),
    )
    out = tmp_path / "viewer"
    result = CliRunner().invoke(dashboard_app, [str(out), "--snapshot", "--storage", f"journal:{journal}"])
    assert result.exit_code == 0, result.output  # one study there: no name needed
    run = Run.open(out, storage=f"journal:{journal}")
    assert [(r.number, r.state, r.values) for r in run.records] == [
        (r.number, r.state, r.values) for r in Run.open(run_dir).records
    ]
    assert run.knee() == Run.open(run_dir).knee()
    result = CliRunner().invoke(dashboard_app, [str(out), "--storage", f"journal:{tmp_path / 'missing.log'}"])
    assert result.exit_code == 1 and not (tmp_path / "missing.log").exists()
    assert (
        result.output
        == f"psc-dashboard: --storage journal:{tmp_path / 'missing.log'}: no journal file {tmp_path / 'missing.log'}\n"
    )


@pytest.mark.slow
def test_dashboard_and_export_read_a_postgres_study(run_dir, tmp_path, postgres_url):  # noqa: F811
    optuna.copy_study(from_study_name="demo", from_storage=Run.open(run_dir).study._storage, to_storage=postgres_url)
    server = make_server(tmp_path / "demo", port=0, storage=postgres_url)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with urllib.request.urlopen(server.url + "api/run.json") as response:
            data = json.load(response)
    finally:
        server.shutdown()
        server.server_close()
    expected = payload(Run.open(run_dir))
    assert [t["number"] for t in data["trials"]] == [t["number"] for t in expected["trials"]]
    assert data["knee"] == expected["knee"] and data["fronts"] == expected["fronts"]
    result = CliRunner().invoke(export_app, [str(tmp_path / "demo"), "--storage", postgres_url, "--pick", "best"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "export").is_dir()
    wrong = postgres_url.replace("@127.0.0.1", ":secret@127.0.0.1").replace("/postgres", "/nodb")
    result = CliRunner().invoke(dashboard_app, [str(tmp_path / "demo"), "--storage", wrong])
    assert result.exit_code == 1 and "secret" not in result.output and result.output.count("\n") == 1


def test_server_binds_localhost_and_serves_json(run_dir):
    server = make_server(run_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(server.url + "api/run.json") as response:
            data = json.load(response)
        assert len(data["trials"]) == len(Run.open(run_dir).records)
        with urllib.request.urlopen(server.url + "plotly.min.js") as response:
            assert b"plotly.js" in response.read()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(server.url + "nope")
    finally:
        server.shutdown()
        server.server_close()


def test_cli_writes_a_snapshot_or_says_why_not(run_dir, tmp_path):
    result = CliRunner().invoke(dashboard_app, [str(run_dir), "--snapshot"])
    assert result.exit_code == 0 and result.output == f"wrote {run_dir / 'dashboard.html'}\n"
    assert 'id="run-data"' in (run_dir / "dashboard.html").read_text()
    result = CliRunner().invoke(dashboard_app, [str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == f"psc-dashboard: {tmp_path} is not a search run: no study.db in it\n"


# ------------------------------------------------------------------------------------ browser
@pytest.mark.slow
@needs_browser
def test_live_page(tmp_path, browser):
    """Every finished trial plotted once; a click shows that trial; sorting; new trials appear."""
    run_dir = make_run(tmp_path)
    server = make_server(run_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tab = Page(browser)
    try:
        tab.page.goto(server.url)
        done = finished(run_dir)
        tab.wait_points(len(done))
        tab.wait_points(len(done), "front-macs")
        assert tab.page.locator("#front-latency_ms").is_hidden()  # nothing measured latency

        run = Run.open(run_dir, writable=True)  # it plays the search, telling a trial below
        layout = tab.page.evaluate("""() => {
            const gd = document.getElementById('front-params');
            const presets = gd.data.find(t => t.name === 'hand-designed preset');
            return {budget: gd.layout.shapes.map(s => s.x0), presets: presets.text};
        }""")
        assert layout["budget"] == [run.record.budget.params]
        assert sorted(layout["presets"]) == sorted(r.preset for r in run.completed() if r.preset)

        target = next(r for r in run.records if r.preset is None and r.state == TrialState.COMPLETE)
        tab.click_trial(target.number)
        hover = tab.page.locator("#front-params .hoverlayer .hovertext").text_content()
        assert (
            f"trial {target.number} (complete)" in hover
            and f"dice_mean (search): {run.quality_of(target):.4f}" in hover
        )
        assert_shows_trial(tab, run, target.number)
        assert tab.page.locator("#curve .scatterlayer .trace").count() == 2  # train_loss and dice_mean

        tab.page.click("#trial-table th[data-key=params]")
        shown = tab.page.locator("#trial-table tbody tr").evaluate_all("rows => rows.map(r => +r.dataset.number)")
        assert shown == list(run.table().sort_values(["params", "number"], kind="stable").number)

        running = next(r for r in run.records if r.state == TrialState.RUNNING)
        run.study.tell(running.number, [0.75, running.params])
        tab.wait_points(len(done) + 1)  # picked up by polling, no reload

        assert tab.errors == []
        assert all(url.startswith(server.url) for url in tab.requests), tab.requests
    finally:
        tab.close()
        server.shutdown()
        server.server_close()


def assert_shows_trial(tab: Page, run: Run, number: int) -> None:
    """The trial panel shows trial ``number``: its architecture drawn as data, config, export command."""
    tab.page.wait_for_function(
        "n => document.getElementById('arch-title').textContent.startsWith(`Trial ${n}:`)", arg=number
    )
    drawn = tab.page.evaluate("() => document.getElementById('arch').data.map(t => ({kind: t.name, shares: t.y}))")
    expected = architecture(run.config(number))
    for trace in drawn:
        shares = [sum(c for kind, c in b["segments"] if kind == trace["kind"]) / b["channels"] for b in expected]
        assert trace["shares"] == pytest.approx(shares)
    assert {t["kind"] for t in drawn} == {kind for b in expected for kind, _ in b["segments"]}
    assert tab.page.locator("#arch .bars path").count() >= len(expected)
    assert f"--pick 'trial {number}'" in tab.page.locator("#trial-export").text_content()
    assert run.config(number).to_yaml().strip() == tab.page.locator("#trial-config").text_content().strip()


@pytest.mark.slow
@needs_browser
def test_snapshot_works_offline(run_dir, browser):
    path = write_snapshot(run_dir)
    assert path == run_dir / "dashboard.html"
    tab = Page(browser, offline=True)
    tab.page.goto(path.as_uri())
    tab.wait_points(len(finished(run_dir)))
    assert tab.page.locator("#status").text_content() == "static snapshot"
    run = Run.open(run_dir)
    tab.click_trial(run.knee())
    assert_shows_trial(tab, run, run.knee())
    assert tab.errors == []
    assert [url for url in tab.requests if not url.startswith("file:")] == []
    tab.close()


@pytest.mark.slow
@needs_browser
def test_page_of_a_search_that_has_not_finished_a_trial(tmp_path, browser):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    study = optuna.create_study(
        study_name="fresh", storage=f"sqlite:///{run_dir / 'study.db'}", directions=["maximize", "minimize"]
    )
    StudyRecord(
        "ibsr",
        "ibsr_densenet3d",
        Budget(params=5_000_000),
        (Objective("dice_mean", maximize=True), Objective("params", maximize=False)),
    ).write(study)
    tab = Page(browser, offline=True)
    tab.page.goto(write_snapshot(run_dir, study).as_uri())
    tab.page.wait_for_function("() => document.getElementById('run-facts').textContent.includes('none yet')")
    assert tab.points() == 0
    assert tab.errors == []
    tab.close()


def open_snapshot(browser, run_dir: Path) -> Page:
    tab = Page(browser, offline=True)
    tab.page.goto(write_snapshot(run_dir).as_uri())
    tab.wait_points(len(finished(run_dir)))
    return tab


@pytest.fixture(scope="module")
def mixed_tab(mixed_run, browser):
    """The mixed run's snapshot as it opens, shared by the tests below (none of them clicks)."""
    tab = open_snapshot(browser, mixed_run)
    yield tab
    assert tab.errors == []
    tab.close()


@pytest.mark.slow
@needs_browser
def test_page_opens_on_the_knee(mixed_run, mixed_tab):
    """No click needed: best.yaml's trial is shown, ringed on the fronts, its scores side by side once each."""
    run = Run.open(mixed_run)
    knee = run.knee()
    assert knee is not None and knee != run.search_knee()  # the retrained knee, not the search's
    tab = mixed_tab
    assert_shows_trial(tab, run, knee)
    assert "best.yaml" in tab.page.locator("#arch-role").text_content()
    ring = tab.page.evaluate("""() => document.getElementById('front-params').data
        .filter(t => t.name === 'selected').map(t => ({x: t.x, y: t.y}))""")
    record = run.trial(knee)
    assert ring == [
        {"x": [record.params] * 2, "y": [pytest.approx(run.quality_of(record)), record.retrained.metrics["dice_mean"]]}
    ]
    figures = tab.page.locator("#trial-figures tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    assert figures[0] == ["", f"search ({FIDELITY.words})", RETRAINED.words]
    assert [row[0] for row in figures].count("dice_mean") == 1
    dice = next(row for row in figures if row[0] == "dice_mean")
    assert dice == ["dice_mean", f"{run.quality_of(record):.4f}", f"{record.retrained.metrics['dice_mean']:.4f}"]


@pytest.mark.slow
@needs_browser
def test_axis_titles_and_symbols_say_how_scores_were_measured(mixed_run, mixed_tab):
    run = Run.open(mixed_run)
    tab = mixed_tab
    titles = tab.page.evaluate("""() => Object.fromEntries(['front-params', 'front-macs'].map(id => {
        const gd = document.getElementById(id);
        return [id, {x: gd.querySelector('.g-xtitle').textContent, y: gd.querySelector('.g-ytitle').textContent}];
    }))""")
    for plot in titles.values():
        assert plot["y"].startswith("validation dice_mean")
        for words in (FIDELITY.words, LOW.words, RETRAINED.words):
            assert words in plot["y"]
    assert titles["front-macs"]["x"] == "MACs of one forward pass at input 1×32×32×32"
    # each trial's marker symbol is its fidelity's: one symbol per fidelity, the retrained scores their own
    symbols = tab.page.evaluate("""() => {
        const found = {};
        for (const t of document.getElementById('front-params')._fullData) {
            if (t.meta !== 'trials' && t.name !== 'retrained') continue;
            t.customdata.forEach((n, i) => {
                const symbol = Array.isArray(t.marker.symbol) ? t.marker.symbol[i] : t.marker.symbol;
                found[t.name === 'retrained' ? `r${n}` : n] = symbol;
            });
        }
        return found;
    }""")
    by_fidelity: dict[str, set] = {}
    for record in run.records:
        if record.feasible:
            by_fidelity.setdefault(record.fidelity.words, set()).add(symbols[str(record.number)])
        if record.retrained:
            by_fidelity.setdefault(record.retrained.fidelity.words, set()).add(symbols[f"r{record.number}"])
    assert set(by_fidelity) == {FIDELITY.words, LOW.words, RETRAINED.words}
    assert all(len(shown) == 1 for shown in by_fidelity.values())  # one symbol per fidelity ...
    assert len(set.union(*by_fidelity.values())) == 3  # ... and a different one for each
    legend = tab.page.locator("#front-params .legend .legendtext").all_text_contents()
    assert f"search: after {LOW.words}" in legend and RETRAINED.words in legend


@pytest.mark.slow
@needs_browser
def test_titles_fit_and_the_toolbar_covers_none(mixed_tab):
    """Every plot's title and 2D axis titles lie inside its box; the plotly toolbar, shown on hover,
    overlaps no title (it used to cover the architecture chart's)."""
    tab = mixed_tab
    plots = ["front-params", "front-macs", "arch", "curve", "view3d", "hypervolume", "parcoords"]
    for plot in plots:
        box = tab.page.locator(f"#{plot}").bounding_box()
        tab.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        tab.page.wait_for_timeout(300)
        found = tab.page.evaluate(
            """plot => {
            const gd = document.getElementById(plot);
            const rect = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
            const bar = gd.querySelector('.modebar');
            const titles = [...gd.querySelectorAll('.gtitle, .g-xtitle text, .g-ytitle text')]
                .filter(e => e.textContent.trim()).map(e => ({text: e.textContent, box: rect(e)}));
            return {div: rect(gd), bar: bar && getComputedStyle(bar).opacity !== '0' ? rect(bar) : null, titles};
        }""",
            plot,
        )
        assert found["bar"] is not None, f"{plot}: no toolbar on hover"
        assert found["titles"], plot
        left, top, right, bottom = found["div"]
        for title in found["titles"]:
            x0, y0, x1, y1 = title["box"]
            assert left <= x0 and x1 <= right + 0.5 and top <= y0 and y1 <= bottom + 0.5, (plot, title)
            bx0, by0, bx1, by1 = found["bar"]
            assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0, (plot, title["text"], "under the toolbar")


@pytest.mark.slow
@needs_browser
def test_3d_axis_titles_are_not_clipped(mixed_tab):
    """WebGL draws the 3D view's axis titles, out of reach of the DOM: the pixels that change when they
    are blanked must lie inside the scene, off its edges (at plotly's default camera "params" was cut to
    "arams"; there the changed pixels reach the scene's bottom edge)."""
    page = mixed_tab.page

    def shot() -> Image.Image:
        page.wait_for_timeout(500)
        return Image.open(io.BytesIO(page.locator("#view3d").screenshot())).convert("RGB")

    titled = shot()
    titles = page.evaluate("""() => {
        const scene = document.getElementById('view3d').layout.scene;
        const titles = ['xaxis', 'yaxis', 'zaxis'].map(a => scene[a].title.text);
        Plotly.relayout('view3d', Object.fromEntries(['x', 'y', 'z'].map(a => [`scene.${a}axis.title.text`, ''])));
        return titles;
    }""")
    blank = shot()
    page.evaluate(
        "t => Plotly.relayout('view3d', {'scene.xaxis.title.text': t[0], 'scene.yaxis.title.text': t[1], "
        "'scene.zaxis.title.text': t[2]})",
        titles,
    )
    assert titles == ["params", "MACs", "validation dice_mean"]
    changed = ImageChops.difference(titled, blank).getbbox()
    assert changed is not None, "blanking the axis titles changed nothing: were they drawn?"
    size = page.evaluate("() => document.getElementById('view3d')._fullLayout._size")
    border = 1  # the element's screenshot includes its 1 px border
    scene = (size["l"] + border, size["t"] + border, size["l"] + size["w"] + border, size["t"] + size["h"] + border)
    margin = 3
    assert scene[0] + margin <= changed[0] and scene[1] + margin <= changed[1], (changed, scene)
    assert changed[2] <= scene[2] - margin and changed[3] <= scene[3] - margin, (changed, scene)


@pytest.mark.slow
@needs_browser
def test_parallel_coordinates_show_only_decisions_that_vary(tmp_path, browser):
    """block2 is conv3d in every trial: no axis for it (named in the title instead); block1 varies."""
    run_dir = tmp_path / "fixed"
    run_dir.mkdir()
    study = optuna.create_study(
        study_name="fixed", storage=f"sqlite:///{run_dir / 'study.db'}", directions=["maximize", "minimize"]
    )
    base = ArchConfig.from_dict(Run.open(make_run(tmp_path)).trial(0).arch)
    StudyRecord(
        "ibsr", "ibsr_densenet3d", Budget(params=10**9), (Objective("dice_mean", True), Objective("params", False))
    ).write(study)
    for i, op in enumerate(["conv3d", "p1sc1", "csn_ip"]):
        add_trial(study, base.with_blocks([PRESETS[op]] * 2 + [PRESETS["conv3d"]] * 2), 0.6 + 0.05 * i)
    tab = open_snapshot(browser, run_dir)
    drawn = tab.page.evaluate("""() => {
        const gd = document.getElementById('parcoords');
        return {labels: gd.data[0].dimensions.map(d => d.label), title: gd.layout.title.text,
                ticks: gd.data[0].dimensions[0].ticktext};
    }""")
    assert drawn["labels"] == ["block1", "params", "MACs", "dice_mean (search)"]
    assert "1 of 2" in drawn["title"] and "block2 = conv3d" in drawn["title"]
    assert sorted(drawn["ticks"]) == sorted(label(PRESETS[op]) for op in ["conv3d", "p1sc1", "csn_ip"])
    tab.close()


def prescreened(tmp_path: Path) -> Path:
    """make_run's study with the record a pre-screen leaves: its finished trials queued, 4 more screened only."""
    run_dir = make_run(tmp_path)
    run = Run.open(run_dir, writable=True)
    trained = [r for r in run.records if r.arch_hash and r.params]
    rows = [Screened(r.arch_hash, r.params, r.macs or 0, 40.0 + i, {}, queued=True) for i, r in enumerate(trained)]
    rows += [Screened(f"other{i}", 10**6 * (i + 1), 10**9, 30.0 + i, {}) for i in range(4)]
    prescreen.record(run.study, prescreen.Prescreen("grad_norm", len(rows)), rows, 12.3)
    return run_dir


def test_payload_carries_the_prescreen_or_none(run_dir, tmp_path):
    assert payload(Run.open(run_dir))["prescreen"] is None
    screen = payload(Run.open(prescreened(tmp_path)))["prescreen"]
    assert screen["proxy"] == "grad_norm" and len(screen["rows"]) == screen["scored"] == screen["queued"] + 4


@pytest.mark.slow
@needs_browser
def test_the_page_plots_the_prescreen_and_a_queued_point_opens_its_trial(tmp_path, browser):
    run_dir = prescreened(tmp_path)
    run = Run.open(run_dir)
    tab = open_snapshot(browser, run_dir)
    assert tab.page.locator("#prescreen-section").is_visible()
    drawn = tab.page.evaluate("""() => {
        const gd = document.getElementById('prescreen');
        return {title: gd.layout.title.text, points: gd.data.map(t => [t.meta, t.x.length])};
    }""")
    screen = run.study.user_attrs["prescreen"]
    assert f"{screen['scored']} architectures ranked by grad_norm" in drawn["title"]
    assert dict(drawn["points"]) == {"prescreen-screened": 4, "prescreen-queued": screen["queued"]}
    assert "pre-screened" in tab.page.locator("#run-facts").text_content()
    other = next(r for r in run.records if r.state == TrialState.COMPLETE and r.number != run.knee())
    tab.page.locator("#prescreen").scroll_into_view_if_needed()  # a click lands only inside the viewport
    box = tab.page.evaluate(
        """hash => {
            const gd = document.getElementById('prescreen');
            const trace = gd.data.findIndex(t => t.meta === 'prescreen-queued');
            const j = gd.data[trace].text.findIndex(t => t.startsWith(hash));
            const g = document.querySelectorAll('#prescreen .scatterlayer .trace')[trace];
            const r = g.querySelectorAll('.point')[j].getBoundingClientRect();
            return {x: r.x + r.width / 2, y: r.y + r.height / 2};
        }""",
        other.arch_hash,
    )
    tab.page.mouse.move(box["x"], box["y"])  # plotly clicks the point it hovers
    tab.page.mouse.click(box["x"], box["y"])
    shown = f"{other.summary()}"  # the trial of that architecture (a run may have trained it twice)
    tab.page.wait_for_function(
        "s => { const t = document.getElementById('arch-title').textContent; return t.endsWith(s) && "
        f"!t.startsWith('Trial {run.knee()}:'); }}",
        arg=shown,
    )
    assert tab.errors == []
    tab.close()
    plain = open_snapshot(browser, make_run(tmp_path / "plain"))
    assert not plain.page.locator("#prescreen-section").is_visible()
    plain.close()

"""The dashboard in a real headless Chromium, on a real SQLite Optuna study (tests/_search_run.py)."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from _search_run import make_run
from optuna.trial import TrialState
from typer.testing import CliRunner

from psc_nas.cli import dashboard_app
from psc_nas.dashboard import architecture, make_server, payload, write_snapshot
from psc_nas.results import Run
from psc_nas.search.budget import Budget
from psc_nas.search.record import Objective, StudyRecord, TrialRecord

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
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


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
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        if offline:  # a snapshot must not need the network at all
            self.page.route("http*://**", lambda route: route.abort())

    def points(self, plot: str = "front-params") -> int:
        return self.page.locator(f"#{plot} .scatterlayer .point").count()

    def wait_points(self, expected: int, plot: str = "front-params") -> None:
        self.page.wait_for_function(
            "([plot, n]) => document.querySelectorAll(`#${plot} .scatterlayer .point`).length === n",
            arg=[plot, expected],
            timeout=20_000,
        )

    def click_trial(self, number: int, plot: str = "front-params") -> None:
        """Click the marker of trial ``number`` where plotly drew it."""
        box = self.page.evaluate(
            """([plot, number]) => {
                const gd = document.getElementById(plot);
                const traces = gd.querySelectorAll('.scatterlayer .trace');
                for (let i = 0; i < gd._fullData.length; i++) {
                    const j = (gd._fullData[i].customdata || []).indexOf(number);
                    if (j < 0) continue;
                    const r = traces[i].querySelectorAll('.point')[j].getBoundingClientRect();
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

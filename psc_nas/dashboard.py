"""The search dashboard: a run's trials as one JSON payload, an offline page, a local server.

The page itself (HTML, CSS, JS) lives in the top-level ``dashboards/`` folder, shipped as package
data; this module turns a run into the payload that page draws and delivers it two ways:

    Run ─► payload() ─┬─ make_server():    GET /  (page)   GET /api/run.json (polled while searching)
                      └─ write_snapshot(): runs/<name>/dashboard.html, payload and plotly.js inlined

plotly.js always comes from the installed ``plotly`` package, never a CDN, so both work offline.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from plotly.offline import get_plotlyjs

import dashboards
from psc_nas.arch import ArchConfig
from psc_nas.files import write_text_atomic
from psc_nas.nets import get_backbone, validate
from psc_nas.ops import label, realize
from psc_nas.pareto import pareto_front, to_minimization
from psc_nas.results import Run
from psc_nas.search.front import quality_hypervolume
from psc_nas.search.record import TrialRecord, read_prescreen
from psc_nas.space import SearchSpace

SNAPSHOT_FILE = "dashboard.html"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
POLL_SECONDS = 3


# ---------------------------------------------------------------------------------- architecture
def architecture(config: ArchConfig) -> list[dict[str, Any]]:
    """Per searchable block: its op and how its output channels split over sub-kernel paths.

    This is the CAKES paper's Fig. 4 as data: one column per block, segment heights the channel
    shares, each op drawn as its family says (``OpSpec.segments``). A slot of several convs with a
    one-to-one choice repeats the same split, so its first op stands for the block.
    """
    backbone = get_backbone(validate(config).backbone)
    slots = backbone.slots(backbone.hparams(config.hparams))
    blocks = []
    for slot, choice in zip(slots, config.blocks):
        spec = realize(slot, choice)[0]
        segments = [[kind, channels] for kind, channels in spec.segments()]
        blocks.append({"slot": slot.name, "op": label(choice), "channels": spec.out_channels, "segments": segments})
    return blocks


def decision_groups(space: str | None, config: ArchConfig) -> list[tuple[str, list[int]]]:
    """The search's decisions over ``config``'s slots, as (name, slot indices): the units of the run's space
    where it still loads for this network (``block1`` .. ``block5`` for the IBSR space), else one group per
    backbone block (a slot name up to its first dot), so the parallel coordinates show one axis per choice."""
    backbone = get_backbone(config.backbone)
    names = [slot.name for slot in backbone.slots(backbone.hparams(config.hparams))]
    if space:
        try:
            loaded = SearchSpace.load(space, hparams=config.hparams)
            if [slot.name for slot in loaded.slots] == names:
                return [(unit.label, list(unit.slots)) for unit in loaded.units]
        except (ValueError, OSError, TypeError, KeyError):
            pass  # a space file moved or edited since the search: group by block instead
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name.split(".")[0], []).append(index)
    return list(groups.items())


def decisions(config: ArchConfig, groups: list[tuple[str, list[int]]]) -> dict[str, str]:
    """Per decision the op chosen, e.g. ``{"block1": "pmscn(m=2,n=2)"}``; a group whose slots chose
    differently (a hand-made config) lists its choices joined by " + "."""
    shown = {}
    for name, slots in groups:
        chosen = list(dict.fromkeys(label(config.blocks[i]) for i in slots if i < len(config.blocks)))
        shown[name] = " + ".join(chosen)
    return shown


# ---------------------------------------------------------------------------------- payload
def export_command(run: Run, number: int) -> str:
    return f"psc-export {shlex.quote(str(run.path))} --pick 'trial {number}'"


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: a diverged trial records them, and JSON has none."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def trial_detail(run: Run, record: TrialRecord, groups: dict[str, Any] | None = None) -> dict[str, Any]:
    """What clicking a point shows: architecture, learning curve, config, export command, and the
    scores of the search and of the retraining side by side. ``groups``: decision groups by backbone
    and hparams, filled as trials need them (one space load per network shape)."""
    detail: dict[str, Any] = {
        "metrics": finite(record.metrics),
        "retrained_metrics": finite(record.retrained.metrics) if record.retrained else None,
        "curve": finite(record.curve),
        "retrained_curve": finite(record.retrained.evaluation.curve) if record.retrained else None,
        "export": export_command(run, record.number),
        "arch": None,
        "arch_error": None,
        "decisions": None,
    }
    if record.arch is None:
        detail["arch_error"] = "the trial recorded no architecture"
        return detail
    try:
        config = record.config()
        detail["arch"] = architecture(config)
        detail["config"] = config.to_yaml()
        key = json.dumps([config.backbone, dict(config.hparams)], sort_keys=True, default=str)
        if groups is None:
            groups = {}
        if key not in groups:
            groups[key] = decision_groups(run.record.space, config)
        detail["decisions"] = decisions(config, groups[key])
    except ValueError as err:
        detail["arch_error"] = str(err)
        detail["config"] = json.dumps(record.arch, indent=2)
    return detail


def fronts(run: Run, table: pd.DataFrame) -> dict[str, list[int]]:
    """Trial numbers on the 2D front of quality against each measured cost (feasible trials only)."""
    done = table[table.feasible.astype(bool)]  # an empty table has an object column
    result = {}
    for cost in ("params", "macs", "latency_ms"):
        rows = done[done[cost].notna()]
        points = to_minimization(list(zip(rows.quality, rows[cost])), [run.quality.maximize, False])
        result[cost] = [int(rows.number.iloc[i]) for i in pareto_front(points)] if points else []
    return result


def hypervolume_history(run: Run) -> list[dict[str, Any]]:
    """After each finished feasible trial, in completion order, the hypervolume psc-search reports
    in pareto.json: (metric, params) in the unit box, so the last point equals the run's."""
    done = run.completed()
    return [
        {
            "trial": r.number,
            "time": r.completed_at.isoformat(),  # type: ignore[union-attr]
            "hypervolume": quality_hypervolume(done[: i + 1], run.record),
        }
        for i, r in enumerate(done)
    ]


def version(run: Run) -> str:
    """Changes whenever a trial does: a new one, a new state, values, an evaluation at a new fidelity, or
    a retraining of its architecture."""
    key = [
        (
            r.number,
            r.state.name,
            r.values,
            str(r.completed_at),
            r.fidelity and r.fidelity.key,
            r.retrained and r.retrained.fidelity.key,
        )
        for r in run.records
    ]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def input_shape(run: Run) -> list[int] | None:
    """The (C, D, H, W) at which the study priced MACs, as it recorded (None in studies older than that
    record: the task's is not looked up, since importing a task costs a reader seconds of imports)."""
    return list(run.record.input_shape) if run.record.input_shape else None


def search_fidelities(run: Run) -> list[dict[str, Any]]:
    """The fidelities the search scored its feasible trials at, highest first, in words, with how many
    trials' scores come from each: the page draws each with its own marker symbol."""
    counts: dict[tuple[int, str], int] = {}
    for record in run.records:
        if record.fidelity is not None and record.feasible:
            key = (record.fidelity.key, record.fidelity.words)
            counts[key] = counts.get(key, 0) + 1
    return [{"key": key, "words": words, "trials": n} for (key, words), n in sorted(counts.items(), reverse=True)]


def payload(run: Run) -> dict[str, Any]:
    """Everything the page draws, JSON-ready, for the trials ``run`` last read. ``knee`` is best.yaml's
    trial (the retrained knee once there is one), ``search_knee`` the knee by the search's scores."""
    table = run.table()
    knee = run.knee()
    records = {r.number: r for r in run.records}
    rows = json.loads(table.to_json(orient="records"))
    groups: dict[str, Any] = {}
    for row in rows:
        row.update(trial_detail(run, records[row["number"]], groups))
    return {
        "version": version(run),
        "run": {
            "name": run.name,
            "path": str(run.path),
            "task": run.task,
            "space": run.record.space,
            "budget_params": run.record.budget.params,
            "budget_macs": run.record.budget.macs,
            "objectives": [o.to_dict() for o in run.objectives],
            "quality": run.quality.name,
            "metric_direction": "maximize" if run.quality.maximize else "minimize",
            "input_shape": input_shape(run),
            "fidelities": search_fidelities(run),
            "retrained_fidelities": sorted({r.retrained.fidelity.words for r in run.records if r.retrained}),
            "states": {state: int(n) for state, n in table.state.value_counts().items()},
        },
        "trials": rows,
        "fronts": fronts(run, table),
        "knee": knee,
        "search_knee": run.search_knee(),
        "hypervolume": hypervolume_history(run),
        "prescreen": read_prescreen(run.study),  # psc-search --prescreen: every architecture it scored
    }


# ---------------------------------------------------------------------------------- page
def _script_json(data: Any) -> str:
    # Inside <script>, "</" would end the element early; JSON allows "<\/" for it.
    return json.dumps(data).replace("</", "<\\/")


def render_page(data: dict[str, Any] | None = None) -> str:
    """The page; with ``data`` a self-contained snapshot, without it the live page that polls."""
    plotly = f"<script>{get_plotlyjs()}</script>" if data is not None else '<script src="plotly.min.js"></script>'
    embedded = (
        f'<script type="application/json" id="run-data">{_script_json(data)}</script>' if data is not None else ""
    )
    html = dashboards.asset("index.html")
    for marker, value in {
        "{{style}}": dashboards.asset("dashboard.css"),
        "{{plotly}}": plotly,
        "{{data}}": embedded,
        "{{poll_ms}}": str(POLL_SECONDS * 1000),
        "{{script}}": dashboards.asset("dashboard.js"),
    }.items():
        html = html.replace(marker, value)
    return html


def write_snapshot(
    run_dir: str | Path,
    study: optuna.Study | None = None,
    *,
    storage: str | None = None,
    study_name: str | None = None,
) -> Path:
    """Write ``run_dir/dashboard.html``: the dashboard as of now, viewable offline with no server.

    The study is read from ``run_dir/study.db`` unless given, or read from ``storage`` (psc-search's
    ``--storage``: a database URL or ``journal:PATH``) as ``study_name`` (default: the folder's name).
    """
    if study is not None:
        run = Run(Path(run_dir), study)
    else:
        run = Run.open(run_dir, storage=storage, study_name=study_name)
    path = run.path / SNAPSHOT_FILE
    if storage is not None:  # a distributed study viewed from a machine without its run folder
        path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, render_page(payload(run)))


# ---------------------------------------------------------------------------------- server
class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, run: Run, host: str, port: int) -> None:
        self.run = run
        # Bound to loopback, the server answers only requests naming a loopback host: a page of another
        # site that a DNS-rebinding attack points at 127.0.0.1 sends its own name and is refused.
        self.loopback_only = host in LOOPBACK_NAMES
        # Handler threads share the Run (refresh replaces its trials) and the cached payload.
        self.lock = threading.Lock()
        self.page = render_page().encode()
        self._cached: tuple[str, bytes] = ("", b"")
        super().__init__((host, port), DashboardHandler)

    def payload_json(self) -> bytes:
        """The current payload; rebuilt only when a trial changed, so polling costs a running
        search (which shares the CPU) one study read every few seconds, not a redraw of every trial."""
        with self.lock:
            self.run.refresh()
            current = version(self.run)
            if current != self._cached[0]:
                self._cached = (current, json.dumps(payload(self.run)).encode())
            return self._cached[1]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def host_name(header: str | None) -> str:
    """The host name of a ``Host:`` header, without port or IPv6 brackets, lower case."""
    value = (header or "").strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardServer

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        if self.server.loopback_only and host_name(self.headers.get("Host")) not in LOOPBACK_NAMES:
            self.send_error(403, "only loopback host names are served (start psc-dashboard with --host to expose it)")
            return
        route = self.path.split("?")[0]
        if route in ("/", "/index.html"):
            self._send(self.server.page, "text/html; charset=utf-8")
        elif route == "/plotly.min.js":
            self._send(get_plotlyjs().encode(), "application/javascript; charset=utf-8")
        elif route == "/api/run.json":
            self._send(self.server.payload_json(), "application/json", cache="no-store")
        else:
            self.send_error(404)

    def _send(self, body: bytes, content_type: str, cache: str = "max-age=3600") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser navigated away mid-transfer; nothing to answer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: one line per poll every few seconds would drown the terminal."""


def make_server(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8050,
    storage: str | None = None,
    study_name: str | None = None,
) -> DashboardServer:
    """A server for ``run_dir`` bound to ``host:port`` (port 0 picks a free one); not yet serving.
    ``storage``/``study_name``: the study psc-search kept there (``results.Run.open``)."""
    return DashboardServer(Run.open(run_dir, storage=storage, study_name=study_name), host, port)

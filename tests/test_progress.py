"""What a person watching psc-search sees (issue 15, "Progress"): the first line before PyTorch loads, one
plain flushed line per event when stdout is not a terminal, a live front size, a time left that keeps moving
(``display.Clock``), Optuna's log lines in search.log and never on the console, and the psc-dashboard command
at the end. A real ``psc-search`` process on a plugin task trained by Lightning, real studies, real files."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time
from functools import partial

import optuna
import pytest
import search_standin
import slow_task
import tiny_task
from cli_process import BIN, cli_env
from optuna.trial import TrialState
from rich.console import Console
from typer.testing import CliRunner

import psc_nas
from psc_nas.cli import search_app
from psc_nas.evaluators import Fidelity
from psc_nas.results import Run
from psc_nas.search.budget import Budget
from psc_nas.search.display import Clock, LiveDisplay, PlainDisplay, console_for, make_display
from psc_nas.search.events import (
    Evaluated,
    Evaluating,
    FrontChanged,
    Preparing,
    Promoting,
    Retrained,
    Retraining,
    RetrainPlanned,
    Started,
    clock,
)
from psc_nas.search.front import Front
from psc_nas.search.record import read_trials
from psc_nas.search.runner import SearchSettings, run_search

ANSI = re.compile(r"\x1b[\[\]()]")
STAMP = r"\[\d+:\d\d(?::\d\d)?\]"


env = partial(cli_env, columns=None)  # no terminal width: the progress display must find its own


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------------------------- first line
def test_the_first_line_needs_no_pytorch_optuna_or_lightning():
    """psc-search prints its first line after importing only these modules: none may pull in the heavy ones
    (they take seconds, 14 s on a loaded machine), so the line is on screen within about a second."""
    code = (
        "import sys, psc_nas.cli, psc_nas.search.display, psc_nas.search.budget, psc_nas.search.interrupt\n"
        "print(sorted(m for m in ('torch', 'optuna', 'lightning', 'pandas') if m in sys.modules))"
    )
    shown = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "[]"
    # the facade still offers what it did, loading PyTorch on first use
    assert psc_nas.cost is psc_nas.nets.cost and "build_model" in dir(psc_nas)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        psc_nas.nope  # noqa: B018


def test_a_user_error_while_preparing_is_the_only_line(tmp_path):
    """The preparation's lines are held back until the search starts: an error found while preparing (here a
    budget no architecture of the space meets) stays psc-search's one line, its exit code 1."""
    (tmp_path / "bars.yaml").write_text(tiny_task.SPACE_YAML)
    args = [
        "--task",
        "bar_axis",
        "--space",
        str(tmp_path / "bars.yaml"),
        "--budget",
        "1k",
        "--out",
        str(tmp_path / "x"),
    ]
    result = CliRunner().invoke(search_app, args)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("psc-search: no architecture in space"), (
        result.output
    )
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- clock
def started(**fields) -> Started:
    return Started(**{"created": True, "loop_s": None, "end_s": None, "retrain": 0, "done": 0, "planned": 4, **fields})


def evaluated(number: int, done: int, planned: int = 4) -> Evaluated:
    fidelity = Fidelity(1, "1 epoch × 8 samples")
    return Evaluated(number, fidelity, "dice_mean", 0.5, 10.0, "densenet3d: 20×conv3d", False, done, planned)


def test_time_left_is_measured_per_architecture_and_moves_during_a_long_evaluation():
    now = FakeTime()
    timer = Clock(now)
    assert timer.eta() == ""  # preparing: nothing to say yet
    now.t += 5
    timer.update(started())  # no time limit, no retraining
    assert timer.eta() == "time left: measuring"
    now.t += 30
    timer.update(evaluated(0, done=1))
    assert timer.left() == (90.0, "measured") and timer.eta() == "~1:30 left"  # 3 more at 30 s each
    now.t += 20  # the next evaluation runs: the estimate keeps moving
    assert timer.left() == (150.0, "measured")  # 3 to go at (50 s / 1 done)
    assert timer.elapsed() == 55.0


def test_promotions_count_in_the_time_left_at_their_measured_or_scaled_length():
    now = FakeTime()
    timer = Clock(now)
    timer.update(started(planned=2))
    one, two = Fidelity(1, "1 epoch"), Fidelity(2, "2 epochs")
    for number in (0, 1):
        timer.update(Evaluating(number, one, False, "x", number, 2))
        now.t += 10
        timer.update(Evaluated(number, one, "dice_mean", 0.5, 10.0, "x", False, number + 1, 2))
    assert timer.eta() == "finishing"  # every architecture evaluated once, nothing promoted
    timer.update(Promoting((0, 1), two, 2, 2))
    assert timer.left() == (40.0, "measured")  # 2 × 10 s scaled from 1 epoch to 2
    timer.update(Evaluating(0, two, True, "x", 2, 2))
    now.t += 5
    assert timer.left() == (35.0, "measured")
    now.t += 13
    timer.update(Evaluated(0, two, "dice_mean", 0.6, 18.0, "x", False, 2, 2))
    assert timer.left() == (18.0, "measured")  # the one left, as long as the one measured at 2 epochs


def test_a_time_budget_bounds_the_time_left_and_retraining_fills_it():
    now = FakeTime()
    timer = Clock(now)
    timer.update(started(loop_s=100.0, end_s=300.0, retrain=3))
    now.t += 10
    timer.update(evaluated(0, done=1))  # measured 3 × 10 s, but retraining fills the budget up to 300 s
    assert timer.left() == (290.0, "budget") and timer.eta() == "≤4:50 left (time budget)"

    no_retrain = Clock(now)
    no_retrain.update(started(loop_s=100.0))
    now.t += 60
    no_retrain.update(evaluated(0, done=1))  # 3 × 60 s measured is past the loop's limit: the limit bounds it,
    assert no_retrain.left() == (50.0, "budget")  # plus one 10 s evaluation started just before it
    now.t += 40
    assert no_retrain.eta() == "finishing"  # the last evaluation may run past the limit


def test_retraining_time_left_comes_from_the_measured_epoch_and_moves():
    now = FakeTime()
    timer = Clock(now)
    timer.update(started(loop_s=100.0, end_s=1000.0, retrain=3))
    now.t += 100
    timer.update(Retraining(7, 1, "x", 4, 4))  # timing one epoch: only the budget is known
    assert timer.left() == (900.0, "budget")
    now.t += 5
    timer.update(RetrainPlanned((3, 7, 9), 10, 5.0, 4, 4))  # 3 × 10 epochs × 5 s
    assert timer.left() == (150.0, "measured")
    now.t += 30
    assert timer.left() == (120.0, "measured")
    now.t += 20
    timer.update(Retrained(3, "dice_mean", 0.6, "retrained: 10 epochs", 0.5, "2 epochs", 50.0, "x", 4, 4))
    assert timer.left() == (100.0, "measured")  # 2 to go
    timer.finish()
    assert timer.eta() == "done"


def test_without_a_time_budget_retraining_is_announced_not_guessed():
    now = FakeTime()
    timer = Clock(now)
    timer.update(started(retrain=3))
    now.t += 10
    timer.update(evaluated(0, done=1))
    assert timer.eta() == "~0:30 + retraining"
    timer.update(RetrainPlanned((3, 7), 100, None, 4, 4))
    assert timer.left() == (None, "unknown") and timer.eta() == "time left: measuring"
    now.t += 40
    timer.update(Retrained(3, "dice_mean", 0.6, "retrained: 100 epochs", 0.5, "2 epochs", 40.0, "x", 4, 4))
    assert timer.left() == (40.0, "measured")


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (59.6, "1:00"), (3725, "1:02:05"), (None, "?")])
def test_clock_text(seconds, text):
    assert clock(seconds) == text


# ---------------------------------------------------------------------------------------------- displays
def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return console_for(out), out


def test_plain_output_is_one_unwrapped_line_per_event_with_elapsed_time_and_no_ansi():
    console, out = plain_console()
    display = make_display(console)
    assert isinstance(display, PlainDisplay)
    long_summary = "densenet3d: " + ", ".join(["4×pmscn(m=2,n=2,orientations=1x3x3+3x1x3)"] * 5)
    with display:
        display.stage("pricing")
        display(started(loop_s=600.0))
        display(Evaluating(0, Fidelity(1, "1 epoch × 8 samples"), False, long_summary, 0, 4))  # the status only
        display(Evaluated(0, Fidelity(1, "1 epoch"), "dice_mean", 0.5, 3.0, long_summary, False, 1, 4))
        display(FrontChanged(Front((), None, 0.0), 1, 4))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and not ANSI.search(out.getvalue())
    assert all(re.match(STAMP + " ", line) for line in lines)
    assert re.search(re.escape(f"{long_summary}  [1/4 architectures, ") + r"(~|≤)\d+:\d\d left", lines[2]), lines[2]


def test_a_plain_status_line_says_what_still_runs_after_a_silence():
    console, out = plain_console()
    display = PlainDisplay(console, heartbeat_s=0.2)
    with display:
        display(started())
        display(Evaluating(3, Fidelity(2, "2 epochs × 8 samples"), True, "x", 0, 4))
        time.sleep(1.0)
    status = [line for line in out.getvalue().splitlines() if "still" in line]
    assert status and "still trial 3 promoted to 2 epochs × 8 samples (0:0" in status[0]
    assert "[0/4 architectures" in status[0]


def test_the_live_display_draws_in_a_terminal_and_prints_results_above_its_bar():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system="standard")
    display = make_display(console)
    assert isinstance(display, LiveDisplay)
    with display:
        display(started(loop_s=600.0))
        display(Evaluating(0, Fidelity(1, "1 epoch × 8 samples"), False, "densenet3d: 20×conv3d", 0, 4))
        display(Evaluated(0, Fidelity(1, "1 epoch"), "dice_mean", 0.5, 3.0, "densenet3d: 20×conv3d", False, 1, 4))
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "trial 0 at 1 epoch (3.0s): dice_mean = 0.5000" in text
    assert "1/4" in text and "architectures · front" in text and "elapsed" in text


# ---------------------------------------------------------------------------------------------- engine
def test_the_front_is_sent_as_results_come_not_only_when_a_bracket_is_told(tmp_path, capfd):
    events = []

    class Recording(PlainDisplay):
        def __call__(self, event):
            events.append(event)
            super().__call__(event)

    settings = SearchSettings(
        task="ibsr", budget=Budget(params=5_000_000), trials=3, out=tmp_path / "run", retrain=False, prescreen="none"
    )
    out = io.StringIO()
    run_search(settings, evaluator=search_standin.StandinEvaluator(), display=Recording(console_for(out)))
    kinds = [type(e).__name__ for e in events]
    # the quick profile's bracket is 6 trials, all 3 here: a front after the first result, before any is told
    assert kinds.index("FrontChanged") == kinds.index("Evaluated") + 1
    assert len(events[kinds.index("FrontChanged")].front.members) == 1
    fresh = [e for e in events if isinstance(e, Evaluated) and not e.reused]
    starts = [(e.number, e.fidelity.key) for e in events if isinstance(e, Evaluating)]
    assert starts == [(e.number, e.fidelity.key) for e in fresh]
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    final = [e for e in events if isinstance(e, FrontChanged)][-1].front
    records = {r.number: r for r in read_trials(study)}
    assert [m.number for m in final.members] == [m.number for m in Run.open(tmp_path / "run").front().members]
    for event in fresh:
        record = records[event.number]
        assert (event.cost.params, event.cost.macs) == (record.params, record.macs)
        assert event.arch_hash == record.arch_hash
    assert isinstance(events[0], Preparing) and "pricing every option of space ibsr_densenet3d" in events[0].what

    captured = capfd.readouterr()
    assert "A new study created" not in captured.out + captured.err  # Optuna's own lines: search.log only
    assert "A new study created in RDB with name: run" in (tmp_path / "run" / "search.log").read_text()
    assert all(r.state == TrialState.COMPLETE for r in records.values())
    assert out.getvalue().splitlines()[-2:] == [
        f"dashboard: psc-dashboard {tmp_path / 'run'}",
        f"export best.yaml's network: psc-export {tmp_path / 'run'}",
    ]


# ---------------------------------------------------------------------------------------------- a real process
@pytest.mark.slow
def test_a_piped_search_prints_a_plain_line_per_evaluation_as_it_goes_and_the_dashboard_command(tmp_path):
    """stdout a pipe, as in a batch job: plain lines, read as they arrive, one per evaluation of the study."""
    (tmp_path / "bars.yaml").write_text(slow_task.SLOW_SPACE_YAML)
    start = time.monotonic()
    process = subprocess.Popen(
        [str(BIN / "psc-search"), "--task", "slow_bar", "--space", "bars.yaml", "--budget", "400k"]
        + ["--trials", "3", "--no-retrain", "--out", "run"],
        cwd=tmp_path,
        env=env(PSC_NAS_PLUGINS="slow_task", SLOW_BAR_SECONDS="0.15"),  # 8 samples: about 1.2 s per epoch
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    arrived: list[tuple[float, str]] = []
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(process.stderr))
    reader.start()
    for line in process.stdout:
        arrived.append((time.monotonic() - start, line.rstrip("\n")))
    assert process.wait(timeout=600) == 0, "".join(errors)
    reader.join()
    ended = time.monotonic() - start
    lines = [line for _, line in arrived]
    everything = "\n".join(lines) + "".join(errors)

    assert not ANSI.search(everything), everything
    assert "A new study created" not in everything and not [e for e in errors if e.startswith("[I ")]
    assert "A new study created in RDB with name: run" in (tmp_path / "run" / "search.log").read_text()
    assert re.fullmatch(STAMP + " loading PyTorch, Lightning and Optuna", lines[0])

    study = optuna.load_study(study_name="run", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    records = read_trials(study)
    evaluations = sorted((r.number, e.fidelity.words) for r in records for e in r.own_evaluations())
    pattern = re.compile(STAMP + r" trial (\d+) at (.+?) \(\d+\.\ds\): error = [\d.]+; [\d.]+k params, [\d.]+M MACs; ")
    trial_lines = [(t, pattern.match(line)) for t, line in arrived if pattern.match(line)]
    assert sorted((int(m[1]), m[2]) for _, m in trial_lines) == evaluations and len(evaluations) >= 3
    assert sum("front: " in line for line in lines) >= 1
    # streamed, not printed at the end: the first result arrived while the others were still training
    assert trial_lines[0][0] < ended - 2.0, arrived
    assert lines[-2:] == ["dashboard: psc-dashboard run", "export best.yaml's network: psc-export run"]

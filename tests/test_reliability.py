"""Every failure loud, no slot lost (issue 11): exit codes, one-line errors, Ctrl-C, resume checks, readers
that never write, the dashboard's exposure. docs/reliability.md lists each case with the test here.

Real processes (the installed console scripts), real files, real signals: ``slow_task.py`` is a plugin
task trained by Lightning whose batches can be slowed, announced and broken from the environment.
Tests run as root, which ignores file permissions, so "cannot write" is made two ways: a path under a
regular file (NotADirectoryError, fails for root too), and a read-only (0555) folder written by the
console script run under ``setpriv`` without CAP_DAC_OVERRIDE, so root obeys the mode: a real
PermissionError (skipped where the tests are not root or util-linux's setpriv is missing).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import cli_process
import nibabel as nib
import numpy as np
import optuna
import pytest
import search_standin
import slow_task
import tiny_task  # registers bar_axis in this process
import yaml
from _search_run import make_run
from cli_process import BIN, ROOT, cli_env, one_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState
from rich.console import Console
from typer.testing import CliRunner

from psc_nas import cli
from psc_nas.dashboard import make_server
from psc_nas.presets import preset_config
from psc_nas.results import Run
from psc_nas.search import optuna_adapter as adapter
from psc_nas.search import runner
from psc_nas.search.budget import Budget
from psc_nas.search.optuna_adapter import MAX_RETRIES
from psc_nas.search.record import enqueue, failure_attrs, read_trials
from psc_nas.search.runner import SearchFailed, SearchSettings, run_search
from psc_nas.search.storage import open_storage

env = partial(cli_env, plugins="slow_task")
run_cli = partial(cli_process.run_cli, plugins="slow_task")


def slow_search_args(space: Path) -> list[str]:
    """psc-search's arguments for two trials of the slow bar task in ``space``, into the run folder ``s``."""
    return [
        *("--task", "slow_bar", "--space", str(space), "--budget", "400k", "--trials", "2"),
        *("--out", "s", "--evaluator", "train"),
    ]


def slow_space(folder: Path) -> Path:
    path = folder / "bars.yaml"
    path.write_text(slow_task.SLOW_SPACE_YAML)
    return path


def states(study_dir: Path) -> list[tuple[int, str, str | None, int | None]]:
    study = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'study.db'}")
    return [(r.number, r.state.name, r.fail_reason, r.retry_of) for r in read_trials(study)]


# ---------------------------------------------------------------------------------------- data
SHAPE = (12, 10, 14)


def write_ibsr(root: Path, subjects: int = 5) -> Path:
    """A small IBSR V2.0 layout (5 subjects: 3 train, 1 val, 1 test), as tests/test_ibsr_data.py writes it."""
    rng = np.random.default_rng(0)
    for number in range(1, subjects + 1):
        labels = np.zeros(SHAPE, np.uint8)
        labels[2:-2, 2:-2, 2:-2] = rng.integers(1, 4, size=[s - 4 for s in SHAPE])
        image = np.where(labels > 0, 50.0 * labels, 0).astype(np.float32)
        name = f"IBSR_{number:02d}"
        (root / name).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image[..., None], np.eye(4)), root / name / f"{name}_ana_strip.nii.gz")
        nib.save(nib.Nifti1Image(labels[..., None], np.eye(4)), root / name / f"{name}_segTRI_ana.nii.gz")
    return root


def no_data(tmp_path):
    return tmp_path / "nonexistent", "IBSR data directory not found"


def empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "leave the train split empty"


def truncated_image(tmp_path):
    root = write_ibsr(tmp_path / "ibsr")
    path = root / "IBSR_02" / "IBSR_02_ana_strip.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
    return root, "IBSR_02_ana_strip.nii.gz: not a readable NIfTI file"


def wrong_label_shape(tmp_path):
    root = write_ibsr(tmp_path / "ibsr")
    nib.save(
        nib.Nifti1Image(np.zeros((12, 10, 13), np.uint8), np.eye(4)), root / "IBSR_04" / "IBSR_04_segTRI_ana.nii.gz"
    )
    return root, "label shape (12, 10, 13) differs from image shape (12, 10, 14)"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [no_data, empty_folder, truncated_image, wrong_label_shape])
def test_psc_search_refuses_bad_data_before_the_first_trial(tmp_path, damage):
    data_dir, message = damage(tmp_path)
    result = run_cli(
        "psc-search",
        "--task",
        "ibsr",
        "--budget",
        "5M",
        "--trials",
        "2",
        "--out",
        "d1",
        "--data-dir",
        str(data_dir),
        cwd=tmp_path,
    )
    one_line(result, "psc-search", message)
    assert not (tmp_path / "d1").exists()  # nothing written, no study to resume


def standin_search(tmp_path: Path, name: str, **overrides) -> Path:
    settings = SearchSettings(
        **{
            "task": "ibsr",
            "budget": Budget(params=5_000_000),
            "trials": 2,
            "retrain": False,
            "out": tmp_path / name,
            "prescreen": "none",  # IBSR's quick profile screens 300 real networks first; tested in test_prescreen
            **overrides,
        }
    )
    run_search(settings, evaluator=search_standin.StandinEvaluator(), console=Console(quiet=True))
    return tmp_path / name


def test_the_study_records_its_data_and_a_resume_on_other_data_is_refused(tmp_path):
    data = write_ibsr(tmp_path / "ibsr")
    out = standin_search(tmp_path, "run", data_dir=data)
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["data_source"] == str(data.resolve())
    assert len(study.user_attrs["data_fingerprint"]) == 64
    # the same files elsewhere are the same data: the resume goes on
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    standin_search(tmp_path, "run", data_dir=moved)
    # other content under the same path is not
    image = data / "IBSR_03" / "IBSR_03_ana_strip.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((*SHAPE, 1), np.float32), np.eye(4)), image)
    with pytest.raises(ValueError, match=r"was searched on data .*ibsr \(content [0-9a-f]{12}\), not on data"):
        standin_search(tmp_path, "run", data_dir=data)
    # nor is the task's own data, for a study searched on a folder (and the other way round)
    with pytest.raises(ValueError, match="not on the task's own data"):
        standin_search(tmp_path, "run")
    standin_search(tmp_path, "own")
    with pytest.raises(ValueError, match="was searched on the task's own data, not on data"):
        standin_search(tmp_path, "own", data_dir=moved)


@pytest.mark.slow
def test_psc_search_resumed_on_other_data_is_one_line_and_trains_nothing(tmp_path):
    data = write_ibsr(tmp_path / "ibsr")
    out = standin_search(tmp_path, "d1", data_dir=data)
    before = (out / "study.db").read_bytes()
    nib.save(
        nib.Nifti1Image(np.ones((*SHAPE, 1), np.float32), np.eye(4)), data / "IBSR_05" / "IBSR_05_ana_strip.nii.gz"
    )
    result = run_cli(
        "psc-search",
        "--task",
        "ibsr",
        "--budget",
        "5M",
        "--trials",
        "2",
        "--out",
        "d1",
        "--data-dir",
        str(data),
        cwd=tmp_path,
    )
    one_line(result, "psc-search", "study 'd1' was searched on data", "resume on the same data")
    assert (out / "study.db").read_bytes() == before


# ---------------------------------------------------------------------------------------- failed searches
class AlwaysFails(search_standin.StandinEvaluator):
    def evaluate(self, config, fidelity, *, seconds_left):
        raise RuntimeError("no GPU")


def test_a_search_whose_every_trial_failed_raises_with_the_first_reason(tmp_path):
    with pytest.raises(
        SearchFailed,
        match=r"no architecture was evaluated: 2 trial\(s\) failed, e\.g\. trial 0: "
        r"at 1 stand-in epochs: RuntimeError: no GPU \(see .*search\.log\)",
    ):
        run_search(
            SearchSettings(task="ibsr", budget=Budget(params=5_000_000), trials=2, out=tmp_path / "run", retrain=False),
            evaluator=AlwaysFails(),
            console=Console(quiet=True),
        )
    # the run folder is still written: what failed, and why, stays readable
    assert (tmp_path / "run" / "trials.csv").is_file()


@pytest.mark.slow
def test_psc_search_whose_every_trial_failed_exits_1(tmp_path):
    result = run_cli(
        "psc-search",
        *slow_search_args(slow_space(tmp_path)),
        cwd=tmp_path,
        SLOW_BAR_FAIL="1",
    )
    one_line(
        result,
        "psc-search",
        "no architecture was evaluated: 2 trial(s) failed",
        "slow_bar: training data broken on purpose",
        after_progress=True,
    )


def test_a_space_for_another_task_is_refused_before_anything_is_written(tmp_path):
    result = CliRunner().invoke(
        cli.search_app, ["--task", "ibsr", "--budget", "5M", "--space", "em_unet3d", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "space 'em_unet3d' is for task em, not ibsr" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option", ["--budget", "--macs-budget", "--timeout"])
def test_an_empty_budget_or_timeout_is_an_error_not_no_limit(tmp_path, option):
    result = CliRunner().invoke(cli.search_app, ["--task", "ibsr", option, "", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("psc-search: ")
    assert "got ''" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "app, args",
    [(cli.search_app, ["--budget", "5M", "--data-dir", " "]), (cli.train_app, ["--arch", "csn_ip", "--data-dir", ""])],
)
def test_an_empty_data_dir_is_an_error_not_the_current_folder(tmp_path, monkeypatch, app, args):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["--task", "ibsr", *args])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "--data-dir is empty; leave it out to use the default" in result.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- Ctrl-C
def interrupt_search(tmp_path: Path, space: Path, mark: Path) -> subprocess.CompletedProcess:
    """Start psc-search in its own session, wait until a training batch runs, then Ctrl-C it as a terminal
    does (SIGINT to the whole process group)."""
    mark.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            str(BIN / "psc-search"),
            *slow_search_args(space),
        ],
        cwd=tmp_path,
        env=env(SLOW_BAR_SECONDS="1", SLOW_BAR_MARK=str(mark)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (mark.exists() and mark.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_exits_130_says_how_to_resume_and_puts_the_trial_back_without_using_a_retry(tmp_path):
    space, mark = slow_space(tmp_path), tmp_path / "mark"
    for _ in range(MAX_RETRIES + 2):  # more interrupts than a crashed trial has retries
        result = interrupt_search(tmp_path, space, mark)
        one_line(
            result, "psc-search", "interrupted", "re-run the same command to resume", code=130, after_progress=True
        )
        # the held trial is queued again as it was: no FAIL, no retry copy, nothing lost
        assert [(n, state, reason, retry) for n, state, reason, retry in states(tmp_path / "s")] == [
            (0, "WAITING", None, None),
            (1, "WAITING", None, None),
        ]
    done = run_cli(
        "psc-search",
        *slow_search_args(space),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert [state for _, state, _, _ in states(tmp_path / "s")] == ["COMPLETE", "COMPLETE"]


def test_a_held_trial_handed_back_keeps_what_it_stored_and_is_claimed_first(tmp_path):
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=60),
        study_name="s",
        directions=["maximize", "minimize"],
    )
    enqueue(study, {}, preset="csn_ip")
    enqueue(study, {})
    trial = adapter.claim_waiting(study)
    trial.set_user_attr("arch_hash", "abc")
    assert adapter.requeue(study, [adapter.trial_id(trial)]) == [0]
    again = adapter.claim_waiting(study)
    assert again.number == 0 and adapter.snapshot(study, again).user_attrs["arch_hash"] == "abc"
    assert [(r.state, r.retry_of) for r in read_trials(study)] == [
        (TrialState.RUNNING, None),
        (TrialState.WAITING, None),
    ]
    study.tell(again, [0.5, 1.0])
    assert adapter.requeue(study, [adapter.trial_id(again)]) == []  # finished meanwhile: left as it is


@pytest.mark.slow
def test_a_silent_worker_s_trial_fails_saying_so_and_its_retry_starts_clean(tmp_path):
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1),
        study_name="s",
        directions=["maximize", "minimize"],
    )
    enqueue(study, {})
    trial = adapter.claim_waiting(study)
    with adapter.Heartbeat(study) as heartbeat:
        heartbeat.hold(trial)
    time.sleep(4.5)  # silent for longer than the grace period (3 intervals; SQLite counts whole seconds)
    adapter.fail_stale(study, failure_attrs("its worker stopped sending heartbeats"))
    original, retry = read_trials(study)
    assert (original.state, original.fail_reason) == (TrialState.FAIL, "its worker stopped sending heartbeats")
    assert (retry.state, retry.fail_reason, retry.retry_of) == (TrialState.WAITING, None, 0)


# ---------------------------------------------------------------------------------------- one-line errors
def test_psc_train_into_a_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    result = run_cli(
        "psc-train",
        "--task",
        "bar_axis",
        "--arch",
        "p1sc1",
        "--epochs",
        "1",
        "--out",
        "afile/t",
        "--no-progress",
        cwd=tmp_path,
        PSC_NAS_PLUGINS="tiny_task",
    )
    one_line(result, "psc-train", "afile/", "Not a directory")
    assert (tmp_path / "afile").read_text() == ""


WITHOUT_DAC_OVERRIDE = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="drops root's permission override with setpriv (util-linux), as root",
)
@pytest.mark.slow
def test_psc_train_and_psc_export_into_a_read_only_folder_are_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # read-only; root obeys it once setpriv drops CAP_DAC_OVERRIDE: a real PermissionError
    run_dir = make_run(tmp_path)
    train = run_cli(
        "psc-train",
        "--task",
        "bar_axis",
        "--arch",
        "p1sc1",
        "--epochs",
        "1",
        "--out",
        str(locked / "t"),
        "--no-progress",
        cwd=tmp_path,
        wrap=WITHOUT_DAC_OVERRIDE,
        PSC_NAS_PLUGINS="tiny_task",
    )
    one_line(train, "psc-train", str(locked), "Permission denied")
    export = run_cli("psc-export", str(run_dir), "--out", str(locked / "x"), cwd=tmp_path, wrap=WITHOUT_DAC_OVERRIDE)
    one_line(export, "psc-export", str(locked / "x"), "Permission denied")
    assert list(locked.iterdir()) == []


@pytest.fixture
def bad_studies(tmp_path) -> dict[str, Path]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "study.db").write_bytes(b"")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "study.db").write_bytes(b"SQLite format 2\0" + bytes(range(256)) * 16)
    return {"empty": tmp_path / "empty", "corrupt": tmp_path / "corrupt"}


@pytest.mark.parametrize(
    "kind, message",
    [("empty", "is empty (0 bytes)"), ("corrupt", "cannot be read as an Optuna study (file is not a database)")],
)
def test_readers_of_an_empty_or_corrupt_study_say_so_in_one_line_and_change_nothing(bad_studies, kind, message):
    run_dir = bad_studies[kind]
    before = (run_dir / "study.db").read_bytes()
    for app, args in (
        (cli.export_app, [str(run_dir)]),
        (cli.dashboard_app, [str(run_dir), "--snapshot"]),
        (cli.dashboard_app, [str(run_dir), "--port", "0"]),
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert message in result.output and str(run_dir / "study.db") in result.output
    assert (run_dir / "study.db").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["study.db"]


def test_reading_a_run_opens_the_study_read_only(tmp_path):
    run_dir = make_run(tmp_path)
    run = Run.open(run_dir)
    with pytest.raises(optuna.exceptions.StorageInternalError) as raised:
        run.study.set_user_attr("touched", True)
    assert "attempt to write a readonly database" in str(raised.value.__cause__)
    assert "touched" not in Run.open(run_dir, writable=True).study.user_attrs


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n", "two", "n must be one of [1, 2, 3], got 'two'"),
        ("m", [2], "m must be one of [1, 2, 3], got (2,)"),
    ],
)
def test_psc_train_with_a_bad_config_value_is_one_line(tmp_path, field, value, message):
    config = preset_config("p2sc2", "densenet3d", in_channels=1, num_classes=4).to_dict()
    config["blocks"][0][field] = value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(cli.train_app, ["--arch", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "t")])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert message in result.output and not (tmp_path / "t").exists()


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_out_of_range_is_one_line(tmp_path, port):
    run_dir = make_run(tmp_path)
    result = CliRunner().invoke(cli.dashboard_app, [str(run_dir), "--port", port])
    assert result.exit_code == 1 and result.output == f"psc-dashboard: --port must be between 0 and 65535, got {port}\n"


@pytest.mark.slow
def test_a_bad_storage_url_never_prints_its_password(tmp_path):
    result = run_cli(
        "psc-search",
        "--task",
        "bar_axis",
        "--space",
        str(tiny_space(tmp_path)),
        "--budget",
        "400k",
        "--storage",
        "postgresql://bob:hunter2-secret@127.0.0.1:1/db",
        "--out",
        "x",
        cwd=tmp_path,
        PSC_NAS_PLUGINS="tiny_task",
    )
    line = one_line(result, "psc-search", "cannot open storage 'postgresql://bob:***@127.0.0.1:1/db'")
    assert "hunter2" not in result.stdout + result.stderr and line
    assert not (tmp_path / "x").exists()


def tiny_space(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(tiny_task.SPACE_YAML)
    return path


# ---------------------------------------------------------------------------------------- exposure
def request(port: int, host_header: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("GET", "/api/run.json", skip_host=True)
    connection.putheader("Host", host_header)
    connection.endheaders()
    status = connection.getresponse().status
    connection.close()
    return status


def test_the_loopback_dashboard_answers_only_loopback_host_names(tmp_path):
    server = make_server(make_run(tmp_path), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for name in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
            assert request(port, name) == 200, name
        for name in (f"evil.example:{port}", "attacker.test", f"127.0.0.1.evil.example:{port}", ""):
            assert request(port, name) == 403, name  # a DNS-rebinding page sends its own name
    finally:
        server.shutdown()
        server.server_close()
    exposed = make_server(tmp_path / "demo", host="0.0.0.0", port=0)  # --host given: any name is answered
    threading.Thread(target=exposed.serve_forever, daemon=True).start()
    try:
        assert request(exposed.server_address[1], "my-workstation.lan") == 200
    finally:
        exposed.shutdown()
        exposed.server_close()


@pytest.mark.slow
def test_psc_dashboard_on_every_interface_warns_what_becomes_reachable(tmp_path):
    run_dir = make_run(tmp_path)
    process = subprocess.Popen(
        [str(BIN / "psc-dashboard"), str(run_dir), "--host", "0.0.0.0", "--port", "0"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        warning = process.stderr.readline()
        serving = process.stdout.readline()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert warning.startswith("psc-dashboard: warning: listening on 0.0.0.0:"), warning
    assert f"can read run {run_dir}" in warning and "no password" in warning
    assert serving.startswith(f"serving {run_dir} at http://0.0.0.0:")
    assert process.returncode == 0


# ---------------------------------------------------------------------------------------- fuzz
def assert_exit_0_or_one_line(result) -> None:
    """Exit 0, or exit non-zero with one line and no exception escaping (typer's SystemExit is the exit)."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{type(result.exception).__name__}: {result.exception}\n{result.output}")
    if result.exit_code != 0:
        assert result.output.count("\n") == 1 and result.output.startswith("psc-"), result.output


COUNTS = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"\s*-?\d{0,4}(\.\d{0,3})?\s*[kKmMgGtTxX]?\s*", fullmatch=True),
    st.sampled_from(["", " ", "5M", "0", "1e6", "nan", "inf", "-5M", "5M5", "1.4m", "99999999999999T", "\x00"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    budget=COUNTS,
    macs=st.one_of(st.none(), COUNTS),
    timeout=st.one_of(st.none(), COUNTS),
    option=st.one_of(st.none(), st.text(max_size=10), st.sampled_from(["k=[", "k={", "=1", "k: [1", "k=\t"])),
)
def test_fuzz_psc_search_budgets_end_in_exit_0_or_one_line(monkeypatch, tmp_path, budget, macs, timeout, option):
    """Every option string is checked as psc-search checks it (plan_search: everything but the search itself,
    which writes nothing); the search is replaced only so that a valid budget does not start training."""
    monkeypatch.setattr(runner, "run_search", lambda settings: runner.plan_search(settings))
    args = [
        "--task",
        "bar_axis",
        "--space",
        str(tiny_space(tmp_path)),
        "--budget",
        budget,
        "--out",
        str(tmp_path / "x"),
    ]
    args += ["--macs-budget", macs] if macs is not None else []
    args += ["--timeout", timeout] if timeout is not None else []
    args += ["--evaluator-option", option] if option is not None else []
    result = CliRunner().invoke(cli.search_app, args)
    assert_exit_0_or_one_line(result)
    if budget.strip() == "":
        assert result.exit_code == 1  # empty is an error, never "no budget"


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 9),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-1, 4), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-1, 3), max_size=2),
    st.sampled_from(["two", "1x3x3", "3x3x3", "1D", "1/4", "all", [1, 2], ["1x3x3", "3x1x3"], 0.5]),
)
CONFIG_FIELDS = st.sampled_from(
    [
        ("blocks", 0, "n"),
        ("blocks", 0, "m"),
        ("blocks", 0, "orientations"),
        ("blocks", 0, "op"),
        ("blocks", 0, "mid_channels"),
        ("hparams", "growth_rate"),
        ("hparams", "width"),
        ("hparams", "num_blocks"),
        ("backbone",),
        ("blocks",),
    ]
)
SPACE_FIELDS = st.sampled_from(
    [
        ("blocks", "ops", "pmscn", "n"),
        ("blocks", "ops", "pmscn", "m"),
        ("blocks", "ops", "pmscn", "width"),
        ("blocks", "ops", "pmscn", "orientations"),
        ("blocks", "ops", "p3d", "orientation"),
        ("blocks", "ops", "cakes", "step"),
        ("blocks", "ops", "cakes", "shapes"),
        ("blocks", "share"),
        ("hparams", "growth_rate"),
        ("blocks", "groups", 0, "slots"),
        ("task",),
        ("backbone",),
    ]
)


def put(data, path, value):
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=CONFIG_FIELDS, value=VALUES)
def test_fuzz_psc_train_config_values_end_in_exit_0_or_one_line(monkeypatch, tmp_path, field, value):
    """psc-train reads and checks the config for real; only the training itself is stubbed (exit 0 when reached)."""
    from psc_nas import train

    def checked_only(out, config, task, **kwargs):
        task.check_config(config)
        return train.TrainResult(
            metrics={}, best_metric=0.0, curve=[], wall_seconds=0.0, fwd_bwd_seconds=0.0, epochs=0, checkpoint=None
        )

    monkeypatch.setattr(train, "fit_into", checked_only)
    config = preset_config("p2sc2", "densenet3d", in_channels=1, num_classes=4).to_dict()
    put(config, field, value)
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(config))
    assert_exit_0_or_one_line(CliRunner().invoke(cli.train_app, ["--arch", str(path), "--no-progress"]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=SPACE_FIELDS, value=VALUES)
def test_fuzz_psc_space_yaml_values_end_in_exit_0_or_one_line(tmp_path, field, value):
    """psc-space reads, checks and prices a space YAML for real."""
    space = yaml.safe_load((ROOT / "search_spaces" / "ibsr_densenet3d.yaml").read_text())
    put(space, field, value)
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(space))
    assert_exit_0_or_one_line(CliRunner().invoke(cli.space_app, [str(path)]))


def test_the_fuzz_check_fails_on_a_traceback():
    """The property above can fail: an exception escaping a command is caught by it."""

    class Result:
        exception = KeyError("x")
        exit_code = 1
        output = "Traceback ...\n"

    with pytest.raises(AssertionError, match="KeyError"):
        assert_exit_0_or_one_line(Result())
    Result.exception = SystemExit(1)
    Result.output = "psc-x: a\nb\n"
    with pytest.raises(AssertionError):
        assert_exit_0_or_one_line(Result())


PROBE = """import os, pathlib
pathlib.Path(os.environ["PROBE_OUT"]).write_text(os.environ.get("OMP_WAIT_POLICY", "unset"))
"""


@pytest.mark.parametrize("command, args", [("psc-search", ["--budget", "5M"]), ("psc-train", ["--arch", "conv3d"])])
@pytest.mark.parametrize(
    "given, busy_from, expected",
    [(None, "0", "PASSIVE"), (None, "1000", "unset"), ("ACTIVE", "0", "ACTIVE")],
)
def test_training_commands_let_idle_openmp_threads_sleep_on_a_busy_machine(
    tmp_path, command, args, given, busy_from, expected
):
    """A plugin imported while the command looks up its task records the command's OMP_WAIT_POLICY: PASSIVE
    (waiting threads sleep, benchmarks/threads.py) when the load average reaches $PSC_NAS_BUSY_LOAD (0 here: always;
    1000: never), the user's own value whatever the load. threads.sleep_when_waiting sets it only while torch is
    not loaded yet (the OpenMP runtime reads it when torch loads), so PASSIVE here means it took effect."""
    (tmp_path / "omp_probe.py").write_text(PROBE)
    out = tmp_path / "seen.txt"
    result = cli_process.run_cli(
        command,
        *("--task", "no_such_task", *args, "--out", str(tmp_path / "run")),
        cwd=tmp_path,
        plugins="omp_probe",
        PROBE_OUT=str(out),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]),
        PSC_NAS_BUSY_LOAD=busy_from,
        OMP_WAIT_POLICY=given,
    )
    assert result.returncode == 1 and "no_such_task" in result.stderr, result.stdout + result.stderr
    assert out.read_text() == expected
    assert not (tmp_path / "run").exists()


def test_the_wait_policy_follows_the_load_and_is_left_alone_once_torch_is_loaded(monkeypatch):
    """Too late to matter (the OpenMP runtime read its environment when torch loaded): nothing is set, and the
    caller hears that the policy is not in effect; the load decides only before torch loads (sys.modules without
    torch stands in for a fresh process)."""
    import torch  # noqa: F401

    from psc_nas import threads

    monkeypatch.delenv(threads.VARIABLE, raising=False)
    monkeypatch.delenv(threads.BUSY_VARIABLE, raising=False)
    assert threads.sleep_when_waiting(load=5.0) is False and threads.VARIABLE not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    assert threads.sleep_when_waiting(load=0.1) is False and threads.VARIABLE not in os.environ
    assert threads.sleep_when_waiting(load=threads.BUSY_LOAD) is True and os.environ[threads.VARIABLE] == "PASSIVE"
    monkeypatch.setenv(threads.VARIABLE, "active")
    assert threads.sleep_when_waiting(load=5.0) is False
    monkeypatch.delenv(threads.VARIABLE)
    monkeypatch.setenv(threads.BUSY_VARIABLE, "lots")
    with pytest.raises(ValueError, match="PSC_NAS_BUSY_LOAD must be a number"):
        threads.sleep_when_waiting(load=5.0)


@pytest.mark.parametrize("command", ["psc-search", "psc-train"])
def test_a_bad_busy_load_is_one_line(tmp_path, command):
    args = ["--budget", "5M"] if command == "psc-search" else ["--arch", "conv3d"]
    result = cli_process.run_cli(
        command,
        *("--task", "ibsr", *args, "--out", str(tmp_path / "run")),
        cwd=tmp_path,
        PSC_NAS_BUSY_LOAD="x",
        OMP_WAIT_POLICY=None,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == f"{command}: $PSC_NAS_BUSY_LOAD must be a number (a load average), got 'x'\n"
    assert not (tmp_path / "run").exists()

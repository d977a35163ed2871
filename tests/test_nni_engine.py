"""``psc-search --engine nni``: NNI's strategies propose, the optuna engine's machinery prices, evaluates,
stores and retrains, in one process that opens no port beyond loopback; without NNI, one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import search_standin
from rich.console import Console

import psc_nas
from psc_nas.arch import ArchConfig
from psc_nas.export import export
from psc_nas.search.budget import Budget
from psc_nas.search.runner import SearchSettings, plan_search, run_search

pytest.importorskip("nni")

TESTS = Path(__file__).resolve().parent
ROOT = Path(psc_nas.__file__).resolve().parent.parent
BUDGET = 3_000_000


def nni_search(out: Path, strategy: str, trials: int, **overrides) -> None:
    settings = SearchSettings(
        task="ibsr",
        budget=Budget(params=BUDGET),
        trials=trials,
        out=out,
        retrain=False,
        engine="nni",
        strategy=strategy,
        **overrides,
    )
    run_search(settings, evaluator=search_standin.StandinEvaluator(), console=Console(quiet=True))


def evaluations(log: Path) -> list[tuple[str, int]]:
    return [(line.split()[0], int(line.split()[1])) for line in log.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["evolution", "random"])
def test_an_nni_search_fills_the_same_run_folder_and_psc_export_reads_it(tmp_path, monkeypatch, strategy):
    log = tmp_path / "evaluations.txt"
    monkeypatch.setenv("PSC_TRAIN_LOG", str(log))
    out = tmp_path / "run"
    nni_search(out, strategy, trials=10)

    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] == 10 and states["WAITING"] == states["RUNNING"] == states["FAIL"] == 0, states
    presets = [t.user_attrs.get("preset") for t in study.trials if t.user_attrs.get("preset")]
    assert presets, "the presets that fit are seeded first, as with the optuna engine"
    evaluated = evaluations(log)
    assert len(evaluated) == len(set(evaluated)), "no architecture is evaluated twice at one fidelity"
    hashes = {t.user_attrs["arch_hash"]: t for t in study.trials}
    for arch_hash, _ in evaluated:  # the exact-cost budget filter comes before any training
        assert hashes[arch_hash].user_attrs["params"] <= BUDGET
    for trial in study.trials:
        config = ArchConfig.from_dict(trial.user_attrs["arch"])
        assert trial.user_attrs["params"] == psc_nas.cost(config, search_standin.SPATIAL).params
        if trial.state.name == "PRUNED":
            assert trial.user_attrs["params"] > BUDGET and trial.user_attrs["arch_hash"] not in dict(evaluated)
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len({t.user_attrs["arch_hash"] for t in completed}) == len(completed)

    pareto = json.loads((out / "pareto.json").read_text())
    done = export(out, out_dir=tmp_path / "export")
    assert done.record.number == pareto["knee"]
    assert done.files["config"].read_text() == (out / "best.yaml").read_text()
    assert (out / "dashboard.html").is_file() and (out / "trials.csv").read_text().count("\n") == len(study.trials) + 1
    first = min(t.number for t in study.trials if not t.user_attrs.get("preset"))
    assert all(t.user_attrs.get("preset") for t in study.trials if t.number < first), "presets are evaluated first"
    if strategy == "evolution":  # it starts from the presets' results and then mutates the best it has seen
        assert f"NNI evolution starts from {len(presets)} result(s) the study has" in (out / "search.log").read_text()
        assert "Mutated" in (out / "nni.log").read_text()


@pytest.mark.slow
def test_a_resumed_nni_evolution_starts_from_the_study_s_results(tmp_path):
    out = tmp_path / "run"
    nni_search(out, "evolution", trials=4, seed_presets=False)
    nni_search(out, "evolution", trials=7, seed_presets=False)  # the same command with more trials resumes
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 7
    log = (out / "search.log").read_text()
    assert "resumed study 'run'" in log and "NNI evolution starts from 4 result(s) the study has" in log


def test_nni_answers_become_the_trials_parameters_and_the_same_architecture(tmp_path):
    """What NNI proposed is what the study records and what was priced: the trial's parameters, read by the
    space's own sampler, rebuild the stored architecture exactly."""
    out = tmp_path / "run"
    nni_search(out, "random", trials=4, seed_presets=False)
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    space = plan_search(SearchSettings(task="ibsr", budget=Budget(params=BUDGET))).space
    assert all(not t.user_attrs.get("preset") for t in study.trials)
    for trial in study.trials:
        replay = space.decide(lambda name, choices: trial.params[name])
        assert replay.hash == trial.user_attrs["arch_hash"]


@pytest.mark.slow
def test_nni_tpe_searches_too(tmp_path):
    out = tmp_path / "run"
    nni_search(out, "tpe", trials=4)
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 4
    assert "NNI strategy TPE" in (out / "search.log").read_text()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"engine": "ray"}, "unknown engine 'ray'; choose from optuna, nni, cakes"),
        (
            {"engine": "nni", "strategy": "enas"},
            "unknown NNI strategy 'enas'; choose from evolution, random, tpe, spos, darts, proxyless",
        ),
    ],
)
def test_an_unknown_engine_or_strategy_is_refused_before_anything_is_written(tmp_path, changes, message):
    with pytest.raises(ValueError) as caught:
        plan_search(SearchSettings(task="ibsr", budget=Budget(params=BUDGET), out=tmp_path / "run", **changes))
    assert str(caught.value) == message
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ NNI missing
@pytest.mark.slow
def test_without_nni_the_nni_engine_is_one_line_saying_how_to_install_it(tmp_path):
    hide_nni = (
        "import sys; sys.modules['nni'] = None; sys.argv = ['psc-search'] + sys.argv[1:]; "
        "from psc_nas.cli import search_app; search_app()"
    )
    args = ["--task", "ibsr", "--budget", "3M", "--engine", "nni", "--out", "run"]
    result = subprocess.run(
        [sys.executable, "-c", hide_nni, *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == "psc-search: --engine nni needs NNI, an optional extra: pip install 'psc-nas[nni]'\n"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ networking
def process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # /proc prints each 32-bit word little-endian
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def open_ports(pid: int) -> list[str]:
    """Every TCP socket listening and every bound UDP socket of ``pid`` and its descendants, as
    ``proto host:port`` (from /proc: the sockets' inodes in each process's fd table)."""
    ports = []
    for member in process_tree(pid):
        inodes = set()
        for fd in Path(f"/proc/{member}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for proto in ("tcp", "tcp6", "udp", "udp6"):
            try:
                lines = Path(f"/proc/{member}/net/{proto}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                listening = state == "0A" if proto.startswith("tcp") else True
                if inode in inodes and listening:
                    ports.append(f"{proto} {_address(local)}")
    return ports


def beyond_loopback(ports: list[str]) -> list[str]:
    return [p for p in ports if not (" 127." in p or " [::1]" in p)]


def test_the_socket_lister_sees_a_port_open_on_every_interface():
    """The check below would see NNI's web server: a child listening on 0.0.0.0 is found, loopback is not."""
    code = (
        "import socket, sys, time\n"
        "a = socket.socket(); a.bind(('0.0.0.0', 0)); a.listen()\n"
        "b = socket.socket(); b.bind(('127.0.0.1', 0)); b.listen()\n"
        "print(a.getsockname()[1], flush=True); time.sleep(30)\n"
    )
    wrapper = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = wrapper.stdout.readline().strip()
        ports = open_ports(wrapper.pid)
        assert beyond_loopback(ports) == [f"tcp 0.0.0.0:{port}"], ports
        assert len(ports) == 2
    finally:
        for member in reversed(process_tree(wrapper.pid)):
            os.kill(member, 9)
        wrapper.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="reads sockets from Linux's /proc")
def test_an_nni_search_opens_no_port_beyond_loopback_and_its_run_exports(tmp_path):
    """The real psc-search on the tiny bar task (real training): its process tree's sockets are listed
    every 0.2 s from the moment NNI's strategy starts until the search ends."""
    import tiny_task

    (tmp_path / "bars.yaml").write_text(tiny_task.SPACE_YAML)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
        "PSC_NAS_PLUGINS": "tiny_task",
        "OMP_NUM_THREADS": "1",
    }
    command = [str(Path(sys.executable).parent / "psc-search"), "--task", "bar_axis", "--space", "bars.yaml"]
    command += ["--budget", "400k", "--trials", "4", "--no-retrain", "--engine", "nni", "--strategy", "random"]
    search = subprocess.Popen(
        [*command, "--out", "search"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    looks, exposed = 0, []
    deadline = time.monotonic() + 600
    while search.poll() is None and time.monotonic() < deadline:
        if (tmp_path / "search" / "nni.log").exists():
            exposed += beyond_loopback(open_ports(search.pid))
            looks += 1
        time.sleep(0.2)
    stdout, stderr = search.communicate(timeout=60)
    assert search.returncode == 0, stderr.decode()
    assert b"GPU available" not in stdout + stderr, "Lightning's per-trainer lines stay quiet under NNI too"
    assert looks >= 10, f"only {looks} looks while NNI searched"
    assert exposed == []

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}")
    trained = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trained) == 4 and all(t.user_attrs["fidelity"] > 0 for t in trained)
    exported = subprocess.run(
        [str(Path(sys.executable).parent / "psc-export"), "search", "--out", "exported"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    [config] = (tmp_path / "exported").glob("*.yaml")
    assert ArchConfig.load(config).hash == ArchConfig.load(tmp_path / "search" / "best.yaml").hash

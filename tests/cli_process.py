"""The console scripts as a user runs them: a fresh process of the installed script, importing this checkout and
the tests folder (for plugin tasks such as ``tiny_task``), one OpenMP thread (tiny steps on two threads that wait
on each other run ~8x slower, tests/test_train.py) and a wide terminal unless a test needs none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BIN = Path(sys.executable).parent


def cli_env(*, plugins: str = "", columns: str | None = "200", **extra: str | None) -> dict[str, str]:
    """The environment of a console script: ``plugins`` for ``$PSC_NAS_PLUGINS``; ``columns`` None leaves the
    terminal width unset; ``extra`` variables last, so they win (None: the variable is unset)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]), PSC_NAS_PLUGINS=plugins, OMP_NUM_THREADS="1")
    if columns is not None:
        env["COLUMNS"] = columns
    env.update({k: v for k, v in extra.items() if v is not None})
    for name in [k for k, v in extra.items() if v is None]:
        env.pop(name, None)
    return env


def run_cli(
    command: str, *args: str, cwd: Path, plugins: str = "", wrap: Sequence[str] = (), **extra: str | None
) -> subprocess.CompletedProcess:
    """Run ``command`` (psc-search, psc-export, ...) with ``args`` in ``cwd``; ``wrap`` goes before it (e.g. a
    ``timeout`` or ``unshare`` command); the result's stdout/stderr are text; a non-zero exit is not raised."""
    return subprocess.run(
        [*wrap, str(BIN / command), *args],
        cwd=cwd,
        env=cli_env(plugins=plugins, **extra),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def ctrl_c_when(
    marker: str, command: str, *args: str, cwd: Path, env: dict[str, str], settle: float = 2.0
) -> subprocess.CompletedProcess:
    """Start ``command`` in its own session, wait (at most 300 s) until its stdout shows ``marker``, let it run
    ``settle`` seconds more, then send SIGINT to its process group as a terminal's Ctrl-C does; the finished
    process's exit code and the rest of its output."""
    process = subprocess.Popen(
        [str(BIN / command), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    seen = ""
    while marker not in seen:
        line = process.stdout.readline()
        assert line and time.monotonic() < deadline, process.communicate()
        seen += line
    time.sleep(settle)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, seen + stdout, stderr)


def one_line(
    result: Any, command: str, *parts: str, code: int = 1, after_progress: bool = False, optuna_lines: bool = True
) -> str:
    """The error line of a finished command (a process's ``CompletedProcess`` or a typer ``CliRunner`` result):
    exit ``code``, exactly one line on stderr starting with the command and containing every one of ``parts``, no
    traceback; the line. ``after_progress``: a search that ran first showed its progress (stderr), the error is
    the last line. ``optuna_lines``: Optuna's own INFO lines (``[I ...``) on stderr are not counted; False: stderr
    is the one newline-terminated line and nothing else."""
    returncode = result.returncode if hasattr(result, "returncode") else result.exit_code
    assert returncode == code, result.stdout + result.stderr
    if not optuna_lines:
        assert result.stderr.endswith("\n"), result.stderr
    lines = [line for line in result.stderr.splitlines() if not (optuna_lines and line.startswith("[I "))]
    if after_progress:
        assert sum(line.startswith(f"{command}: ") for line in lines) == 1, result.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith(f"{command}: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]

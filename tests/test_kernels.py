"""``python -m psc_nas.kernels``: every C++ kernel built ahead of use, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psc_nas.ops  # noqa: F401 - defines every kernel
from psc_nas import native

ROOT = Path(__file__).parents[1]


def run_kernels(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "psc_nas.kernels", *args], env=environment, capture_output=True, text=True, timeout=600
    )


def test_every_kernel_module_registers_its_extension():
    assert {"depthwise", "norm_act", "tapconv"} <= set(native.EXTENSIONS)


def test_kernels_are_built_ahead_and_reported_ready():
    # the kernels this test session uses are built (or loaded from the cache) by the command in its own processes
    done = run_kernels()
    assert done.returncode == 0, done.stderr
    count = len(native.EXTENSIONS)
    available = sum(kernel.available() for kernel in native.EXTENSIONS.values())
    assert f"psc-nas: {available} of {count} C++ kernels ready" in done.stderr


def test_without_extensions_every_kernel_says_why_and_the_command_still_succeeds():
    done = run_kernels(**{native.DISABLE_VAR: "1"})
    assert done.returncode == 0, done.stderr
    assert f"psc-nas: 0 of {len(native.EXTENSIONS)} C++ kernels ready" in done.stderr
    for stem in native.EXTENSIONS:
        assert f"psc-nas: {stem}: unavailable: disabled by {native.DISABLE_VAR}; PyTorch's own path runs" in done.stderr


def test_a_failed_build_is_reported_once_and_the_command_still_succeeds(tmp_path):
    # a compiler that fails: each kernel's build says why itself, and the command does not say it again
    done = run_kernels(CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"psc-nas: 0 of {len(native.EXTENSIONS)} C++ kernels ready" in done.stderr
    for kernel in native.EXTENSIONS.values():
        assert done.stderr.count(f"psc-nas: {kernel.what} is unavailable (") == 1, done.stderr
    assert done.stderr.count("is unavailable") + done.stderr.count(": unavailable:") == len(native.EXTENSIONS)


def test_require_all_fails_with_one_line_when_a_kernel_is_not_ready_and_passes_when_all_are(tmp_path):
    # CI installs the compilers and runs with --require-all: a kernel that no longer compiles fails the run there
    done = run_kernels("--require-all", CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert done.returncode == 1, done.stderr
    stems = ", ".join(native.EXTENSIONS)
    assert done.stderr.strip().splitlines()[-1] == f"psc-nas: error: --require-all, and not ready: {stems}"
    if all(kernel.available() for kernel in native.EXTENSIONS.values()):  # a machine that builds them all
        done = run_kernels("--require-all")
        assert done.returncode == 0, done.stderr

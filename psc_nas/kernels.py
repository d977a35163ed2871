"""Build psc-nas's C++ kernels now rather than on first use: ``python -m psc_nas.kernels``.

Each kernel (``psc_nas.native.Extension``: ``depthwise.py``, ``norm_act.py``, ``tapconv.py``) otherwise builds the
first time a process needs it, inside whatever that process is timing: on a fresh machine the three builds took 77 s
of a default search's pre-screen (2026-12-05), time its retraining then lacked. ``./dev`` runs this module when it
sets up ``.venv``, so a first search finds them built. Every kernel builds in its own process, as many at once as
there are CPUs; each prints its build line, and a machine without a compiler (or ``PSC_NAS_NO_EXTENSIONS=1``) prints
why a kernel is unavailable, once (a failed build's own message is not repeated), and still exits 0: PyTorch's own
ops run there. ``--require-all`` exits 1 instead, with one line naming the kernels that are not ready: CI installs
the compilers, so there a kernel whose source no longer compiles must fail the run, not make its tests skip.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from psc_nas import native

# run in a child process: build (or load) one kernel by its stem; exit 0 either way. Its last line: ``ready``, or
# ``unavailable: <why>`` where it has not printed why, or ``said: <why>`` where it has (a failed build's message)
CHILD = (
    "import sys, psc_nas.ops\n"
    "from psc_nas import native\n"
    "kernel = native.EXTENSIONS[sys.argv[1]]\n"
    "ready = kernel.available()\n"
    "word = 'said' if kernel.said_why() else 'unavailable'\n"
    "print('ready' if ready else f'{word}: {kernel.unavailable_reason()}')\n"
)


def build_all(jobs: int | None = None) -> dict[str, str]:
    """Build every kernel ``psc_nas.ops`` defines, ``jobs`` at a time (default: the CPU count), each in its own
    process whose messages are passed on to stderr; returns each kernel's stem with ``ready`` or
    ``unavailable: <why>``, and says why for each kernel whose process did not already say so."""
    import psc_nas.ops  # noqa: F401 - its modules define (and so register) every kernel

    stems = list(native.EXTENSIONS)

    def one(stem: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, stem], capture_output=True, text=True, check=False, env=os.environ
        )
        sys.stderr.write(done.stderr)
        lines = done.stdout.strip().splitlines()
        state = (
            lines[-1]
            if done.returncode == 0 and lines
            else f"unavailable: its build process exited with {done.returncode}"
        )
        if state.startswith("said: "):  # the child printed why; report it, do not repeat it
            return "unavailable: " + state.removeprefix("said: ")
        if state != "ready":
            print(f"psc-nas: {stem}: {state}; PyTorch's own path runs instead", file=sys.stderr)
        return state

    with ThreadPoolExecutor(max_workers=max(1, min(len(stems), jobs or os.cpu_count() or 1))) as pool:
        return dict(zip(stems, pool.map(one, stems)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m psc_nas.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--require-all", action="store_true", help="exit 1 unless every kernel is ready")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = build_all()
    missing = [stem for stem, state in results.items() if state != "ready"]
    ready, seconds = len(results) - len(missing), time.perf_counter() - started
    print(f"psc-nas: {ready} of {len(results)} C++ kernels ready ({seconds:.0f} s)", file=sys.stderr)
    if args.require_all and missing:
        print(f"psc-nas: error: --require-all, and not ready: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

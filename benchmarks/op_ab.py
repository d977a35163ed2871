"""One op family's training step and forward under two checkouts of psc-nas, timed A-B-B-A in separate processes.

    python benchmarks/op_ab.py A=31115e0 B=. --family csn_ip
    python benchmarks/op_ab.py A=HEAD~1 B=HEAD --family csn_ir --cases 16:16:32:2 124:28:32:4 --rounds 3

Each ``TAG=REV`` is a git revision (checked out into a temporary worktree, removed afterwards) or ``.`` (this working
tree). A round runs every checkout once in a fresh process, A-B then B-A (so a drift of the machine's speed hits both
alike); each process builds ``make_spec(family, C_in, C_out).build()`` (the family's ``auto`` rule of that checkout)
per case ``C_in:C_out:side:batch`` and times a training step (forward + backward of a channels_last_3d input that
requires grad) and a forward under ``torch.no_grad``, best of ``--repeats`` after two warm-up calls. The table gives
each checkout's best over its processes in ms and the ratio A/B (above 1: B faster), with the load average of each
process. C++ kernels a checkout builds are cached under their own versioned names, as in a search.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ["16:16:32:2", "32:32:32:2", "64:64:32:2", "16:16:64:2", "32:32:64:2", "64:64:64:2"]
DEFAULT_CASES += ["40:28:32:4", "124:28:32:4", "124:28:16:4", "236:28:8:4", "16:16:16:2", "28:28:8:4"]


def child(family: str, cases: list[str], repeats: int, threads: int) -> None:
    """Runs inside one checkout (its ``psc_nas`` first on ``sys.path``): prints one JSON line of times."""
    import torch

    from psc_nas.memory import keep_freed_memory
    from psc_nas.ops import make_spec

    torch.set_num_threads(threads)
    keep_freed_memory()

    from timing import best_seconds  # benchmarks/timing.py, beside this script

    def best(fn) -> float:
        return 1e3 * best_seconds(fn, repeats, warmup=2)

    out = {}
    for case in cases:
        cin, cout, side, batch = map(int, case.split(":"))
        op = make_spec(family, cin, cout).build()
        layout = torch.channels_last_3d
        x = torch.randn(batch, cin, side, side, side).contiguous(memory_format=layout).requires_grad_()
        upstream = torch.randn(batch, cout, side, side, side).contiguous(memory_format=layout)

        def step() -> None:
            x.grad = None
            op.zero_grad(set_to_none=True)
            op(x).backward(upstream)

        def forward() -> None:
            with torch.no_grad():
                op(x)

        out[case] = [best(step), best(forward)]
    print(json.dumps({"times": out, "load": os.getloadavg()[0]}))


def checkout(rev: str, scratch: Path) -> Path:
    if rev == ".":
        return ROOT
    path = scratch / rev.replace("/", "_").replace("~", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(path), rev], check=True, capture_output=True
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs=2, metavar="TAG=REV")
    parser.add_argument("--family", default="csn_ip")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="CIN:COUT:SIDE:BATCH")
    parser.add_argument("--rounds", type=int, default=2, help="A-B-B-A rounds: each checkout runs 2 x rounds times")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.family, args.cases, args.repeats, args.threads)
    tags, revs = zip(*(version.split("=", 1) for version in args.versions))
    runs: dict[str, list[dict]] = {tag: [] for tag in tags}
    with tempfile.TemporaryDirectory(prefix="op_ab_") as scratch:
        paths = [checkout(rev, Path(scratch)) for rev in revs]
        try:
            for _ in range(args.rounds):
                for index in (0, 1, 1, 0):
                    command = [sys.executable, str(Path(__file__).resolve()), *args.versions, "--child"]
                    command += ["--family", args.family, "--repeats", str(args.repeats), "--threads", str(args.threads)]
                    command += ["--cases", *args.cases]
                    env = {**os.environ, "PYTHONPATH": str(paths[index])}
                    done = subprocess.run(
                        command, env=env, capture_output=True, text=True, check=True, cwd=paths[index]
                    )
                    runs[tags[index]].append(json.loads(done.stdout.strip().splitlines()[-1]))
        finally:
            for path in paths:
                if path != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)
    a, b = tags
    loads = ", ".join(f"{tag} {run['load']:.1f}" for tag in tags for run in runs[tag])
    print(
        f"{args.family}, {a} = {revs[0]}, {b} = {revs[1]}, {args.rounds} A-B-B-A rounds, best of {args.repeats}, "
        f"{args.threads} threads; load: {loads}\n"
    )
    print(f"| C_in:C:side:batch | step {a} ms | step {b} ms | {a}/{b} | forward {a} ms | forward {b} ms | {a}/{b} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        step = [min(run["times"][case][0] for run in runs[tag]) for tag in tags]
        forward = [min(run["times"][case][1] for run in runs[tag]) for tag in tags]
        print(
            f"| {case} | {step[0]:.2f} | {step[1]:.2f} | {step[0] / step[1]:.2f} "
            f"| {forward[0]:.2f} | {forward[1]:.2f} | {forward[0] / forward[1]:.2f} |"
        )


if __name__ == "__main__":
    main()

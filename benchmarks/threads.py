"""OpenMP wait policy: training-step time at torch's default thread count, spinning vs sleeping waiters.

    python benchmarks/threads.py [--repeats 3] [--steps 5]   # -> prints a markdown table

Each measurement is a fresh process (the OpenMP runtime reads ``OMP_WAIT_POLICY`` once, when torch loads)
training the csn_ir preset at full width and at width 0.25 (the search's proxies) for ``--steps`` Adam steps
on a batch of 4 random 32³ patches after one warm-up step; policies alternate so both see the same load.
Reported: median wall and CPU seconds per step, and the load average around each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, torch
from psc_nas.memory import keep_freed_memory
from psc_nas.nets import build_model
from psc_nas.nets.budget import with_width
from psc_nas.presets import preset_config
from psc_nas.tasks import get_task
keep_freed_memory()
width, steps = float(sys.argv[1]), int(sys.argv[2])
task = get_task("ibsr")
config = preset_config("csn_ir", task.backbone, **task.backbone_hparams)
config = with_width(config, width) if width != 1 else config
net, loss = build_model(config), task.loss()
opt = torch.optim.Adam(net.parameters(), 1e-3)
x, y = torch.randn(4, 1, 32, 32, 32), {"label": torch.randint(0, 4, (4, 1, 32, 32, 32))}
walls, cpus = [], []
for i in range(steps + 1):
    t, c = time.perf_counter(), time.process_time()
    opt.zero_grad(); loss(net(x), y).backward(); opt.step()
    if i:
        walls.append(time.perf_counter() - t); cpus.append(time.process_time() - c)
print(json.dumps({"threads": torch.get_num_threads(), "wall": walls, "cpu": cpus}))
"""


def run(policy: str | None, width: float, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    load = os.getloadavg()[0]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(width), str(steps)], env=env, capture_output=True, text=True, check=True
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["load"] = (load, os.getloadavg()[0])
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print("| width | policy | threads | wall s / step (median) | CPU s / step | load average (min–max) |")
    print("|---|---|---|---|---|---|")
    for width in (1.0, 0.25):
        found: dict[str, list[dict]] = {"default": [], "PASSIVE": []}
        for _ in range(args.repeats):
            for policy in ("default", "PASSIVE"):
                found[policy].append(run(None if policy == "default" else policy, width, args.steps))
        for policy, runs in found.items():
            walls = [w for r in runs for w in r["wall"]]
            cpus = [c for r in runs for c in r["cpu"]]
            loads = [x for r in runs for x in r["load"]]
            print(
                f"| {width:g} | {policy} | {runs[0]['threads']} | {statistics.median(walls):.3f} | "
                f"{statistics.median(cpus):.3f} | {min(loads):.1f}–{max(loads):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Engines at equal wall time: ``--engine optuna`` (NSGA-II) beside ``--engine nni`` (NNI's strategies).

    python benchmarks/engines.py --out runs/bench-engines --minutes 8 [--seeds 0 1] [--strategies evolution]
    python benchmarks/engines.py --out runs/bench-oneshot --minutes 8 --strategies spos --no-optuna

A one-shot strategy (spos, darts, proxyless) runs without ``--trials`` (it trains one super-net and
retrains the one architecture it finds within the same ``--timeout``); ``--no-optuna`` skips the
Optuna baseline (to add one engine beside rows measured before).

Each search is ``psc-search --task ibsr --budget 5M`` with the quick profile (multi-fidelity, the front
retrained in the last 30% of ``--timeout``), ``--no-seed-presets`` so that every trained architecture is
the engine's own choice, one after the other (never at once), same seed. Scored as benchmarks/search.py
scores: hypervolume of (Dice, params) normalized to Dice in [0, 1] and params in [0, 5M], of the search's
own scores and of the retrained front. Writes ``<out>/engines-benchmark.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import BUDGET, _summary  # noqa: E402  (benchmarks/search.py: the same scoring)

ONESHOT = ("spos", "darts", "proxyless")


def engines(strategies: list[str], optuna: bool = True) -> dict[str, list[str]]:
    found = {"optuna NSGA-II": ["--engine", "optuna", "--sampler", "nsga2"]} if optuna else {}
    for strategy in strategies:
        found[f"nni {strategy}"] = ["--engine", "nni", "--strategy", strategy]
    return found


def run(out: Path, minutes: float, seed: int, flags: list[str]) -> float:
    command = [str(Path(sys.executable).with_name("psc-search")), "--task", "ibsr", "--budget", BUDGET]
    command += ["--out", str(out), "--timeout", f"{minutes}m", "--seed", str(seed)]
    if not any(strategy in flags for strategy in ONESHOT):
        command += ["--trials", "200"]
    command += ["--no-seed-presets", *flags]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-engines"))
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--strategies", nargs="+", default=["evolution"])
    parser.add_argument("--no-optuna", action="store_true", help="skip the Optuna NSGA-II baseline")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for index, (name, flags) in enumerate(engines(args.strategies, not args.no_optuna).items()):
            out = args.out / f"engine-{index}-s{seed}"
            load_before = os.getloadavg()[0]
            wall = run(out, args.minutes, seed, flags)
            summary = {**_summary(out, wall, seed), "flags": flags, "load_before": load_before}
            summary["load_after"] = os.getloadavg()[0]
            results.setdefault(name, []).append(summary)
            print(name, json.dumps({k: v for k, v in summary.items() if "points" not in k}), flush=True)
    report = {"minutes": args.minutes, "budget": BUDGET, "seeds": args.seeds, "engines": results}
    (args.out / "engines-benchmark.json").write_text(json.dumps(report, indent=1))
    print("| engine | seed | wall s | trained | HV search | retrained | HV retrained |")
    for name, runs in results.items():
        for r in runs:
            print(
                f"| {name} | {r['seed']} | {r['wall_s']:.0f} | {r['architectures_trained']} | {r['hypervolume']:.4f} "
                f"| {r['retrained']} ({r['retrained_epochs']} epochs) | {r['retrained_hypervolume']:.4f} |"
            )


if __name__ == "__main__":
    main()

"""IBSR: the papers' hand-designed DenseNet3D networks at one equal training budget.

    python benchmarks/ibsr.py                        # writes docs/benchmarks/ibsr.json, prints a table
    python benchmarks/ibsr.py --presets conv3d,p2sc2 --epochs 2 --out -

For each preset on the task's backbone: exact params and MACs at the task's input patch, the
median forward latency (batch 1, after warm-up, at ``--latency-threads`` threads and at 1) and the validation
Dice per class after ``fit`` with the same epochs, patches, batch size, learning rate and seed.
Training runs with ``--train-threads`` (default 1): on a shared 2-core machine two OpenMP threads
waiting on each other at every barrier made small training steps up to 40x slower.
Results are written after every preset, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

from psc_nas import cost
from psc_nas.presets import PRESETS, preset_config
from psc_nas.search.latency import forward_latency_ms
from psc_nas.tasks import get_task
from psc_nas.train import fit

# PSC paper, IBSR table (3D DenseNet): params and Dice in percent. Its column order is GM, WM, CSF.
PAPER = {
    "conv3d": {"params": 5.2e6, "dice_gm": 85.6, "dice_wm": 88.2, "dice_csf": 84.5},
    "p1sc1": {"params": 4.7e6, "dice_gm": 95.1, "dice_wm": 94.1, "dice_csf": 93.2},
    "p2sc2": {"params": 2.5e6, "dice_gm": 95.7, "dice_wm": 96.1, "dice_csf": 96.3},
    "p2sc3": {"params": 1.4e6, "dice_gm": 95.2, "dice_wm": 96.1, "dice_csf": 97.6},
}
CLASSES = ("dice_csf", "dice_gm", "dice_wm", "dice_mean")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma list of presets")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples-per-epoch", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.25, help="DenseNet3D width multiplier")
    parser.add_argument("--growth-rate", type=int, default=32, help="growth before the width multiplier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-threads", type=int, default=1)
    parser.add_argument("--latency-threads", type=int, default=2)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--out", default="docs/benchmarks/ibsr.json", help="results JSON, or - for none")
    return parser.parse_args(argv)


def measure(name: str, args: argparse.Namespace, task) -> dict:
    config = preset_config(name, task.backbone, **task.backbone_hparams, width=args.width, growth_rate=args.growth_rate)
    price = cost(config, task.input_shape)
    latency = {}
    for threads in (args.latency_threads, 1):
        torch.set_num_threads(threads)
        latency[threads] = forward_latency_ms(config, task.input_shape, repeats=args.latency_repeats)
    torch.set_num_threads(args.train_threads)
    result = fit(
        config,
        task,
        epochs=args.epochs,
        seed=args.seed,
        data_options={"samples_per_epoch": args.samples_per_epoch, "batch_size": args.batch_size},
    )
    return {
        "preset": name,
        "arch_hash": config.hash,
        "params": price.params,
        "macs": price.macs,
        "latency_ms": latency[args.latency_threads],
        "latency_ms_1_thread": latency[1],
        "metrics": result.metrics,
        "best_dice_mean": result.best_metric,
        "curve": result.curve,
        "train_wall_s": result.wall_seconds,
        "fwd_bwd_s": result.fwd_bwd_seconds,
        "load_average": os.getloadavg(),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| preset | params | MACs | latency ms (2 thr / 1 thr) | CSF | GM | WM | mean | paper params "
        "| paper CSF / GM / WM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        dice = " | ".join(f"{100 * row['metrics'][key]:.1f}" for key in CLASSES)
        paper = PAPER.get(row["preset"])
        paper_cells = (
            f"{paper['params'] / 1e6:.1f}M | {paper['dice_csf']} / {paper['dice_gm']} / {paper['dice_wm']}"
            if paper
            else "– | –"
        )
        lines.append(
            f"| {row['preset']} | {row['params'] / 1e3:.0f}k | {row['macs'] / 1e9:.2f}G | "
            f"{row['latency_ms']:.0f} / {row['latency_ms_1_thread']:.0f} | "
            f"{dice} | {paper_cells} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    names = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = sorted(set(names) - set(PRESETS))
    if unknown:
        sys.exit(f"ibsr.py: unknown preset(s) {unknown}; known: {list(PRESETS)}")
    task = get_task("ibsr")
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/ibsr.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "input_shape": list(task.input_shape),
        "rows": [],
    }
    for name in names:
        record["rows"].append(measure(name, args, task))
        row = record["rows"][-1]
        print(
            f"{name}: dice_mean {row['metrics']['dice_mean']:.3f}, {row['train_wall_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if args.out != "-":
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(record["rows"]))


if __name__ == "__main__":
    main()

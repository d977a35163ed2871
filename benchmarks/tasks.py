"""EM and UCF101: the papers' hand-designed networks at one equal (small, CPU) training budget, several seeds.

    python benchmarks/tasks.py --task em      --out docs/benchmarks/em.json
    python benchmarks/tasks.py --task ucf101  --out docs/benchmarks/video.json
    python benchmarks/tasks.py --task ucf101 --temporal-check --out docs/benchmarks/video-temporal.json

For each preset on the task's backbone (at ``--width``, so that 7 presets x 2 seeds fit in about 10
CPU-minutes): exact params and MACs at the task's input, params of the full-width network (the
paper's scale), median forward latency at 1 thread (batch 1, after warm-up), and the task's
validation metrics after ``psc_nas.train.fit`` with the same epochs, samples, batch size, learning
rate and seed, for every seed. Training runs on 1 torch thread. Results are written after every
run, so an interrupted benchmark keeps what it finished.

``--temporal-check`` (ucf101 only) asks whether the synthetic videos need time: it trains, at one
budget, the ResNet3D with every slot a 3x3x3 conv (``conv3d``), every slot a 1x3x3 conv
(``all_1x3x3``: CAKES with all channels on 1x3x3, the search space's 2D-only point; the backbone's
fixed 3x7x7 stem still sees 3 frames) and the same with the stem made 1x7x7 (``2d_only``: no layer
mixes frames; the strided stages only subsample them and the global average pool averages what is
left). ``--presets`` takes these names too (ucf101), e.g. to run them in parallel processes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from psc_nas import cost
from psc_nas.arch import ArchConfig, BlockChoice
from psc_nas.nets import get_backbone, resnet3d, validate
from psc_nas.presets import PRESETS, preset_config
from psc_nas.search.latency import forward_latency_ms
from psc_nas.search.profiles import get_profile
from psc_nas.tasks import get_task
from psc_nas.train import fit

REPORTED = {"em": ("vi_split", "vi_merge", "vi_sum", "arand"), "ucf101": ("clip_top1", "video_top1")}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(REPORTED))
    parser.add_argument("--render", metavar="JSON", help="only print the table of a results JSON")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma list of presets")
    parser.add_argument("--seeds", default="0,1", help="comma list of seeds")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples-per-epoch", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.25, help="backbone width multiplier")
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: psc_nas.train's)")
    parser.add_argument("--lr-schedule", default="constant", choices=("constant", "onecycle"))
    parser.add_argument("--temporal-check", action="store_true", help="ucf101: conv3d vs all-1x3x3 vs 2D-only")
    parser.add_argument(
        "--quick-schedule",
        action="store_true",
        help="train as the task's quick search profile trains a candidate at its highest fidelity (epochs, samples, "
        "batch, width, lr, schedule from Task.profile_overrides), instead of the options above",
    )
    parser.add_argument("--out", default="-", help="results JSON, or - for none")
    return parser.parse_args(argv)


def use_quick_schedule(args: argparse.Namespace, task) -> None:
    """``args`` set to how the task's quick profile trains a candidate at its highest fidelity."""
    profile = get_profile("quick", task)
    options = profile.evaluator_options
    args.epochs = profile.epochs[-1]
    args.samples_per_epoch = profile.data_options["samples_per_epoch"]
    args.batch_size = profile.data_options["batch_size"]
    args.width = float(options.get("width", 1.0))
    args.lr = options.get("lr")
    args.lr_schedule = options.get("lr_schedule", "constant")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


TEMPORAL_VARIANTS = ("conv3d", "all_1x3x3", "2d_only")


def spatial_config(backbone_name: str, **hparams) -> ArchConfig:
    """Every slot a 1x3x3 conv: CAKES with all of a slot's output channels on the 1x3x3 sub-kernel."""
    backbone = get_backbone(backbone_name)
    merged = backbone.hparams(hparams)
    choices = [BlockChoice("cakes", {"allocation": {"1x3x3": slot.out_channels}}) for slot in backbone.slots(merged)]
    return validate(ArchConfig(backbone.name, merged, tuple(choices)))


@contextlib.contextmanager
def stem_kernel(kernel: tuple[int, int, int]):
    """ResNet3D's fixed stem kernel replaced for the networks built and priced inside (benchmark only)."""
    saved = resnet3d.STEM_KERNEL
    resnet3d.STEM_KERNEL = kernel
    try:
        yield
    finally:
        resnet3d.STEM_KERNEL = saved


def variant_config(name: str, task, **hparams) -> tuple[ArchConfig, contextlib.AbstractContextManager]:
    """A preset, or one of the temporal check's networks, with the context it is built in."""
    if name in ("all_1x3x3", "2d_only"):
        stem = stem_kernel((1, 7, 7)) if name == "2d_only" else contextlib.nullcontext()
        return spatial_config(task.backbone, **task.backbone_hparams, **hparams), stem
    return preset_config(name, task.backbone, **task.backbone_hparams, **hparams), contextlib.nullcontext()


def measure(name: str, seeds: list[int], args: argparse.Namespace, task) -> dict:
    config, context = variant_config(name, task, width=args.width)
    with context:
        return _measure(name, config, variant_config(name, task)[0], seeds, args, task)


def _measure(name: str, config: ArchConfig, full: ArchConfig, seeds: list[int], args: argparse.Namespace, task) -> dict:
    price = cost(config, task.input_shape[1:])
    torch.set_num_threads(1)
    latency = forward_latency_ms(config, task.input_shape, repeats=args.latency_repeats)
    runs = []
    for seed in seeds:
        started, cpu = time.perf_counter(), cpu_seconds()
        result = fit(
            config,
            task,
            epochs=args.epochs,
            seed=seed,
            lr_schedule=args.lr_schedule,
            **({} if args.lr is None else {"lr": args.lr}),
            data_options={"samples_per_epoch": args.samples_per_epoch, "batch_size": args.batch_size},
        )
        runs.append(
            {
                "seed": seed,
                "metrics": result.metrics,
                "best_metric": result.best_metric,
                "curve": result.curve,
                "wall_s": time.perf_counter() - started,
                "cpu_s": cpu_seconds() - cpu,
                "fwd_bwd_s": result.fwd_bwd_seconds,
                "load_average": os.getloadavg(),
            }
        )
    return {
        "preset": name,
        "arch_hash": config.hash,
        "params": price.params,
        "macs": price.macs,
        "full_width_params": cost(full, task.input_shape[1:]).params,
        "latency_ms_1_thread": latency,
        "runs": runs,
    }


def markdown(task: str, rows: list[dict]) -> str:
    keys = REPORTED[task]
    lines = [
        "| preset | params (full width) | params | MACs | latency ms | " + " | ".join(keys) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(keys),
    ]
    for row in rows:
        cells = []
        for key in keys:
            values = [run["metrics"][key] for run in row["runs"]]
            scale = 100 if task == "ucf101" else 1
            cells.append(" / ".join(f"{scale * v:.{1 if task == 'ucf101' else 2}f}" for v in values))
        lines.append(
            f"| {row['preset']} | {row['full_width_params'] / 1e6:.1f}M | {row['params'] / 1e3:.0f}k | "
            f"{row['macs'] / 1e9:.2f}G | {row['latency_ms_1_thread']:.0f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        record = json.loads(Path(args.render).read_text())
        task_name = next(name for name, keys in REPORTED.items() if keys[0] in record["rows"][0]["runs"][0]["metrics"])
        print(markdown(task_name, record["rows"]))
        return
    if args.task is None:
        sys.exit("tasks.py: give --task em|ucf101 (or --render JSON)")
    names = [name.strip() for name in args.presets.split(",") if name.strip()]
    if args.temporal_check:
        if args.task != "ucf101":
            sys.exit("tasks.py: --temporal-check is for --task ucf101")
        names = list(TEMPORAL_VARIANTS)
    known = [*PRESETS, *(TEMPORAL_VARIANTS[1:] if args.task == "ucf101" else ())]
    unknown = sorted(set(names) - set(known))
    if unknown:
        sys.exit(f"tasks.py: unknown preset(s) {unknown} for --task {args.task}; known: {known}")
    seeds = [int(s) for s in args.seeds.split(",")]
    task = get_task(args.task)
    if args.quick_schedule:
        use_quick_schedule(args, task)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/tasks.py", *argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "input_shape": list(task.input_shape),
        "rows": [],
    }
    if args.task == "em":
        from psc_nas.tasks.em import SEGMENTATION_BACKEND

        record["segmentation_backend"] = SEGMENTATION_BACKEND
    for name in names:
        record["rows"].append(measure(name, seeds, args, task))
        row = record["rows"][-1]
        summary = ", ".join(f"{run['metrics'][task.metric]:.3f}" for run in row["runs"])
        cpu = sum(run["cpu_s"] for run in row["runs"])
        print(f"{name}: {task.metric} {summary} ({cpu:.0f} CPU-s)", file=sys.stderr, flush=True)
        if args.out != "-":
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(args.task, record["rows"]))


if __name__ == "__main__":
    main()

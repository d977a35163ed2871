"""The shape of CAKES Table 1 on the embedded IBSR task, at equal cost: the CAKES search (both priorities)
against the manual uniform allocation, all-3D and all-2D networks of the same budget.

    python benchmarks/cakes.py run --work W      # search, retrain, measure (resumable: one JSON per result in W)
    python benchmarks/cakes.py report --work W   # -> docs/benchmarks/cakes.json and the table in cakes.md

Protocol (small, for 2 shared CPU cores; every number below is from this file's constants):

- budget: the params of ``cakes_uniform`` (uniform 1D+2D+3D allocation, the paper's "manual" CAKES) at full
  width on the task's 32³ patch; every row is at or under it.
- searched: ``psc_nas.search.cakes_engine.search_one`` (what ``psc-search --engine cakes`` runs): one super-network
  at width 0.25 trained SEARCH_STEPS steps (batch 4, AdamW one-cycle) per priority, allocation chosen by |γ|,
  rescaled to full width, fitted to the budget.
- conv3d (all-3D) and all-2D (every slot a 1x3x3 conv, i.e. a CAKES allocation with one 2D shape) are widened or
  narrowed to the budget with ``nets.budget.fit_to_budget``.
- every network is then retrained from scratch at width REF_WIDTH (``with_width``: a CAKES allocation follows in
  proportion) with ``psc_nas.train.fit``: EPOCHS × SAMPLES patches, batch 4, AdamW lr 2e-3, wd 1e-4, one-cycle,
  per seed in SEEDS; validation Dice after the last epoch and test Dice on the 5 test volumes.
- latency: median forward of one 32³ sample of the trained-width network, 1 thread, after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from psc_nas.files import write_text_atomic  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
TASK, SPACE = "ibsr", "ibsr_densenet3d"
SHAPES = "1D+2D+3D"
SEARCH_STEPS = 64
SEARCH_WIDTH = 0.25
REF_WIDTH = 0.25
EPOCHS, SAMPLES, BATCH = 2, 64, 4
LR, WD = 2e-3, 1e-4
SEEDS = (0, 1)
LATENCY_REPEATS = 10


def _setup() -> None:
    import torch

    from psc_nas.memory import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()


def budget_params() -> int:
    from psc_nas.nets import cost
    from psc_nas.presets import preset_config
    from psc_nas.tasks import get_task

    task = get_task(TASK)
    config = preset_config("cakes_uniform", task.backbone, **task.backbone_hparams)
    return cost(config, tuple(task.input_shape[1:])).params


def plan(params: int) -> Any:
    from psc_nas.search.budget import Budget
    from psc_nas.search.runner import SearchSettings, plan_search

    return plan_search(SearchSettings(task=TASK, space=SPACE, budget=Budget(params=params)))


def searched(work: Path, params: int) -> dict[str, dict[str, Any]]:
    """Both priorities' found architectures (cached in W/search-<priority>.json)."""
    from psc_nas.search import cakes_engine

    found: dict[str, dict[str, Any]] = {}
    search_plan = None
    for priority in cakes_engine.PRIORITIES:
        path = work / f"search-{priority}.json"
        if not path.is_file():
            search_plan = search_plan or plan(params)
            options = cakes_engine.parse_options(
                {"shapes": SHAPES, "steps": SEARCH_STEPS, "width": SEARCH_WIDTH, "batch_size": BATCH}
            )
            started = time.perf_counter()
            result, training = cakes_engine.search_one(
                search_plan,
                options,
                priority,
                seed=0,
                data_dir=None,
                seconds=None,
                work_dir=work,
                stage=lambda what: print(what, flush=True),
            )
            record = {
                "config": result.config.to_dict(),
                "params": result.cost.params,
                "macs": result.cost.macs,
                "moved": result.moved,
                "steps": training.steps,
                "train_s": training.seconds,
                "search_s": time.perf_counter() - started,
                "loss_first": statistics.fmean(training.losses[:10]),
                "loss_last": statistics.fmean(training.losses[-10:]),
            }
            write_text_atomic(path, json.dumps(record, indent=1))
        found[priority] = json.loads(path.read_text())
    return found


def rows(work: Path) -> list[dict[str, Any]]:
    """Every network of the table: name, type, full-width config and its cost."""
    from psc_nas.arch import ArchConfig, BlockChoice
    from psc_nas.nets import cost, get_backbone
    from psc_nas.nets.budget import fit_to_budget
    from psc_nas.presets import preset_config
    from psc_nas.tasks import get_task

    task = get_task(TASK)
    spatial = tuple(task.input_shape[1:])
    params = budget_params()
    table = []
    uniform = preset_config("cakes_uniform", task.backbone, **task.backbone_hparams)
    table.append({"name": f"CAKES {SHAPES} uniform (cakes_uniform)", "type": "manual", "config": uniform})
    conv3d = preset_config("conv3d", task.backbone, **task.backbone_hparams)
    table.append(
        {
            "name": "all-3D (conv3d, width fitted)",
            "type": "manual",
            "config": fit_to_budget(conv3d, params=params, input_shape=spatial),
        }
    )
    slots = get_backbone(uniform.backbone).slots(uniform.hparams)
    flat = ArchConfig(
        uniform.backbone,
        dict(uniform.hparams),
        tuple(BlockChoice("cakes", {"allocation": {"1x3x3": slot.out_channels}}) for slot in slots),
    )
    table.append(
        {
            "name": "all-2D (1x3x3 conv, width fitted)",
            "type": "manual",
            "config": fit_to_budget(flat, params=params, input_shape=spatial),
        }
    )
    for priority, record in reversed(list(searched(work, params).items())):
        config = ArchConfig.from_dict(record["config"])
        label = f"CAKES {SHAPES} ({priority} priority)"
        table.insert(0, {"name": label, "type": "auto", "config": config, "search": record})
    for row in table:
        price = cost(row["config"], spatial)
        row.update(params=price.params, macs=price.macs, budget=params)
    return table


def reduced(config: Any) -> Any:
    from psc_nas.nets.budget import with_width

    return with_width(config, REF_WIDTH * float(config.hparams.get("width", 1.0)))


def run(work: Path) -> None:
    _setup()
    from psc_nas.nets import cost
    from psc_nas.search.latency import forward_latency_ms
    from psc_nas.tasks import get_task
    from psc_nas.train import fit

    work.mkdir(parents=True, exist_ok=True)
    task = get_task(TASK)
    table = rows(work)
    for seed in SEEDS:
        for row in table:
            config = reduced(row["config"])
            path = work / f"train-{config.hash}-s{seed}.json"
            if path.is_file():
                continue
            print(f"training {row['name']} seed {seed} ({config.hash})", flush=True)
            started = time.perf_counter()
            result = fit(
                config,
                TASK,
                epochs=EPOCHS,
                seed=seed,
                lr=LR,
                weight_decay=WD,
                lr_schedule="onecycle",
                evaluate_test=True,
                data_options={"samples_per_epoch": SAMPLES, "batch_size": BATCH},
            )
            price = cost(config, tuple(task.input_shape[1:]))
            record = {
                "name": row["name"],
                "seed": seed,
                "hash": config.hash,
                "params": price.params,
                "macs": price.macs,
                "metrics": result.metrics,
                "wall_s": time.perf_counter() - started,
                "latency_ms": forward_latency_ms(config, task.input_shape, repeats=LATENCY_REPEATS),
            }
            write_text_atomic(path, json.dumps(record, indent=1))
            print(f"  {result.metrics.get('dice_mean'):.4f} in {record['wall_s']:.0f} s", flush=True)


def report(work: Path) -> None:
    table = rows(work)
    out = []
    for row in table:
        config = reduced(row["config"])
        runs = [json.loads(p.read_text()) for p in sorted(work.glob(f"train-{config.hash}-s*.json"))]
        entry = {
            "name": row["name"],
            "type": row["type"],
            "params": row["params"],
            "macs": row["macs"],
            "budget_params": row["budget"],
            "config": row["config"].to_dict(),
            "trained_width": REF_WIDTH,
            "trained_params": runs[0]["params"] if runs else None,
            "trained_macs": runs[0]["macs"] if runs else None,
            "latency_ms": statistics.median(r["latency_ms"] for r in runs) if runs else None,
            "runs": [{k: r[k] for k in ("seed", "metrics", "wall_s", "latency_ms")} for r in runs],
        }
        if "search" in row:
            entry["search"] = {
                k: row["search"][k] for k in ("steps", "train_s", "search_s", "moved", "loss_first", "loss_last")
            }
        out.append(entry)
    data = {
        "command": "python benchmarks/cakes.py run --work W && python benchmarks/cakes.py report --work W",
        "protocol": {
            "task": TASK,
            "space": SPACE,
            "shapes": SHAPES,
            "search_steps": SEARCH_STEPS,
            "search_width": SEARCH_WIDTH,
            "search_batch": BATCH,
            "retrain_width": REF_WIDTH,
            "epochs": EPOCHS,
            "samples_per_epoch": SAMPLES,
            "batch_size": BATCH,
            "lr": LR,
            "weight_decay": WD,
            "lr_schedule": "onecycle",
            "seeds": list(SEEDS),
            "latency": f"median of {LATENCY_REPEATS} forwards of one 1x32x32x32 sample, 1 thread, trained width",
        },
        "rows": out,
    }
    write_text_atomic(DOCS / "cakes.json", json.dumps(data, indent=1) + "\n")
    print(markdown(out))


def markdown(entries: list[dict[str, Any]]) -> str:
    def mean(values: list[float]) -> str:
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"

    lines = [
        "| network | type | params (full width) | MACs (full width) | params / MACs trained (width 0.25) "
        "| latency ms | val Dice | test Dice | seeds | search s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    from psc_nas.costs import format_count

    for e in entries:
        val = [r["metrics"]["dice_mean"] for r in e["runs"]]
        test = [r["metrics"]["test_dice_mean"] for r in e["runs"]]
        trained = (
            f"{format_count(e['trained_params'])} / {format_count(e['trained_macs'])}" if e["trained_params"] else "–"
        )
        latency = f"{e['latency_ms']:.1f}" if e["latency_ms"] else "–"
        search = f"{e['search']['search_s']:.0f}" if "search" in e else "–"
        lines.append(
            f"| {e['name']} | {e['type']} | {e['params']:,} | {format_count(e['macs'])} | {trained} "
            f"| {latency} | {mean(val)} | {mean(test)} | {len(e['runs'])} | {search} |"
        )
    lines += ["", "| network | 1D channels | 2D channels | 3D channels | per shape |", "|---|---|---|---|---|"]
    from psc_nas.ops.cakes import SHAPE_DIMS, SHAPES

    for e in entries:
        if e["type"] != "auto":
            continue
        totals = {shape: 0 for shape in SHAPES}
        for block in e["config"]["blocks"]:
            for shape, count in block["allocation"].items():
                totals[shape] += count
        dims = [sum(totals[s] for s in SHAPE_DIMS[d]) for d in ("1D", "2D", "3D")]
        shapes = ", ".join(f"{shape} {count}" for shape, count in totals.items())
        lines.append(f"| {e['name']} | {dims[0]} | {dims[1]} | {dims[2]} | {shapes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    run(args.work) if args.command == "run" else report(args.work)


if __name__ == "__main__":
    main()

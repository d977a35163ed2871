"""Rank fidelity of the search's evaluators: does a cheap score order architectures like a long training does?

    python benchmarks/fidelity.py panel                       # print the panel (no training)
    python benchmarks/fidelity.py reference --jobs 2 --work W # train the reference (resumable, cached in W)
    python benchmarks/fidelity.py assemble --work W           # -> docs/benchmarks/fidelity-reference.json
    python benchmarks/fidelity.py measure VARIANT --seeds 0 1 2 --work W   # one evaluator on the panel
    python benchmarks/fidelity.py report --work W             # -> docs/benchmarks/fidelity-table.md
    python benchmarks/fidelity.py reference-full --names csn_ip cheapest --seeds 0 1 --jobs 1 --work W
    python benchmarks/fidelity.py reference-seeds --seeds 2 3 4 --jobs 6 --deadline 400 --gpu-fast --work W  # a GPU
    python benchmarks/fidelity.py full-width-report --work W  # -> docs/benchmarks/fidelity-full-width.md
    python benchmarks/fidelity.py recipe-report --work W      # -> docs/benchmarks/fidelity-retrain-recipe.md
    python benchmarks/fidelity.py restore --work W            # a fresh machine: W from the committed JSON
    python benchmarks/fidelity.py screen                      # the pre-screen's proxies on 32³ and 16³ patches

Panel: architectures of ``ibsr_densenet3d`` under the 5M-parameter budget (at the task's 32³ input): the
hand-designed presets that fit, the cheapest and the largest of a seeded pool of uniform samples, and
seeded samples at evenly spaced parameter-count quantiles of that pool. Fixed by ``PANEL_SEED``.

Reference: each architecture at width ``REF_WIDTH`` (same choices; CAKES allocations follow their slots)
trained from scratch for ``REF_EPOCHS`` × ``REF_SAMPLES`` random 32³ patches (batch ``REF_BATCH``), AdamW with
a one-cycle schedule, for each seed in ``REF_SEEDS``; validated on the 2 validation volumes every epoch
(sliding window, the task's Dice), scored on the 5 test volumes at the end. Reference score = mean over
seeds of the final validation Dice. One process per job, one torch thread each.

Every evaluator variant is scored on the same panel for ≥3 seeds; ``report`` gives Spearman ρ and Kendall τ
against the reference (validation and test), ICC(1) over seeds, and seconds per architecture, beside the
naive predictors parameter count and MACs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from psc_nas.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
TASK = "ibsr"
SPACE = "ibsr_densenet3d"
BUDGET_PARAMS = 5_000_000
PANEL_SEED = 2026
POOL = 3000
N_QUANTILES = 11

REF_WIDTH = 0.25
REF_EPOCHS = 8
REF_SAMPLES = 128
REF_BATCH = 4
REF_LR = 2e-3
REF_WD = 1e-4
REF_SEEDS = (0, 1)


def _threads(n: int = 1) -> None:
    import torch

    torch.set_num_threads(n)


def _strict_fp32_device(gpu_fast: bool = False) -> str:
    """The device a training here runs on, in words ("cpu" or the GPU's name). On a GPU, TF32 is switched off
    (PyTorch allows it for convolutions by default) so that GPU and CPU runs of the reference compute in the same
    float32 (whether their seeds can be pooled is still measured: ``full_width_runs``). ``gpu_fast``: cuDNN may
    also pick its fastest, nondeterministic algorithms (autotuned); still float32, but a seed no longer reproduces
    a run bit for bit."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = gpu_fast
    return torch.cuda.get_device_name() + (" (cuDNN autotuned, nondeterministic)" if gpu_fast else "")


# ----------------------------------------------------------------------------------------------- panel
def panel() -> list[dict[str, Any]]:
    """[{name, config (ArchConfig), params, macs}] — deterministic."""
    from psc_nas.nets import cost
    from psc_nas.space import SearchSpace
    from psc_nas.tasks import get_task

    task = get_task(TASK)
    spatial = tuple(task.input_shape[1:])
    space = SearchSpace.load(SPACE)
    rng = random.Random(PANEL_SEED)
    pool: dict[str, tuple[Any, Any]] = {}
    for _ in range(POOL):
        config = space.decide(lambda name, choices: choices[rng.randrange(len(choices))])
        price = cost(config, spatial)
        if price.params <= BUDGET_PARAMS:
            pool.setdefault(config.hash, (config, price))
    members: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(name: str, config: Any, price: Any) -> None:
        if config.hash not in seen:
            seen.add(config.hash)
            members.append({"name": name, "config": config, "params": price.params, "macs": price.macs})

    for name, config in sorted(space.presets().items()):
        price = cost(config, spatial)
        if price.params <= BUDGET_PARAMS:
            add(name, config, price)
    ordered = sorted(pool.values(), key=lambda item: (item[1].params, item[0].hash))
    add("cheapest", *ordered[0])
    add("largest", *ordered[-1])
    for i in range(N_QUANTILES):
        index = round((i + 0.5) / N_QUANTILES * (len(ordered) - 1))
        while ordered[index][0].hash in seen:
            index = (index + 1) % len(ordered)
        add(f"random{i + 1:02d}", *ordered[index])
    return members


def reduced(config: Any, width: float) -> Any:
    from psc_nas.nets.budget import with_width

    return with_width(config, width * float(config.hparams.get("width", 1.0)))


def run_jobs(job: Callable[..., str], todo: list[tuple], jobs: int, deadline_s: float | None = None) -> None:
    """``job(*args)`` for each ``args`` in ``todo``, ``jobs`` processes at a time; each result line printed as it
    finishes, with the time and the load average. Workers are spawned, not forked, so a parent that touched CUDA
    cannot break them. ``deadline_s``: no job starts after that many seconds (those running finish), for a
    machine lent for a fixed time. A failed job is reported and the others go on; the call then exits non-zero."""
    started = time.time()
    pending = iter(todo)
    failed = 0
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:

        def submit_next() -> Future | None:
            args = next(pending, None)
            return None if args is None else pool.submit(job, *args)

        running = {f for f in (submit_next() for _ in range(jobs)) if f is not None}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    line = future.result()
                except Exception as error:  # noqa: BLE001 - one failed run must not lose the others
                    failed += 1
                    line = f"FAILED: {type(error).__name__}: {error}"
                print(time.strftime("%H:%M:%S"), line, f"load {os.getloadavg()[0]:.1f}", flush=True)
                if deadline_s is None or time.time() - started < deadline_s:
                    following = submit_next()
                    if following is not None:
                        running.add(following)
        skipped = sum(1 for _ in pending)
    if skipped:
        print(f"deadline of {deadline_s:g} s reached: {skipped} runs not started", flush=True)
    if failed:
        raise SystemExit(f"{failed} of {len(todo)} runs failed")


# ----------------------------------------------------------------------------------------------- reference
def _reference_job(
    name: str,
    config_json: str,
    seed: int,
    out: str,
    width: float = REF_WIDTH,
    smoke: bool = False,
    gpu_fast: bool = False,
) -> str:
    _threads(1)
    from psc_nas.arch import ArchConfig
    from psc_nas.memory import keep_freed_memory
    from psc_nas.train import fit

    keep_freed_memory()
    device = _strict_fp32_device(gpu_fast)
    config = ArchConfig.from_json(config_json)
    config = reduced(config, width) if width != 1.0 else config
    started = time.time()
    result = fit(
        config,
        TASK,
        epochs=1 if smoke else REF_EPOCHS,
        seed=seed,
        lr=REF_LR,
        weight_decay=REF_WD,
        lr_schedule="onecycle",
        evaluate_test=True,
        data_options={"samples_per_epoch": 8 if smoke else REF_SAMPLES, "batch_size": REF_BATCH},
        deterministic=False if gpu_fast and device != "cpu" else "warn",
    )
    record = {
        "name": name,
        "seed": seed,
        "metrics": result.metrics,
        "curve": result.curve,
        "wall_s": time.time() - started,
        "fwd_bwd_s": result.fwd_bwd_seconds,
        "width": width,
        "device": device,
    }
    write_text_atomic(Path(out), json.dumps(record, indent=1))
    return (
        f"{name} seed {seed}: val {result.metrics['dice_mean']:.4f} test {result.metrics['test_dice_mean']:.4f} "
        f"({record['wall_s']:.0f} s)"
    )


def reference(work: Path, jobs: int, seeds: tuple[int, ...]) -> None:
    out_dir = work / "reference"
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    members = panel()
    for seed in seeds:  # every architecture's first seed before any second seed
        for member in members:
            out = out_dir / f"{member['config'].hash}-s{seed}.json"
            if not out.exists():
                todo.append((member["name"], member["config"].to_json(), seed, str(out)))
    print(f"{len(todo)} reference runs to do", flush=True)
    run_jobs(_reference_job, todo, jobs)


def extra_dir(work: Path, width: float) -> Path:
    """Where ``reference-extra`` keeps its runs: ``W/reference-extra`` at the reference's width 0.25,
    ``W/reference-extra-full`` at width 1 (the network the search prices)."""
    return work / ("reference-extra-full" if width == 1.0 else "reference-extra")


def reference_extra(
    work: Path, configs: list[Path], jobs: int, seeds: tuple[int, ...], width: float = REF_WIDTH
) -> None:
    """Reference trainings of architectures outside the panel (a search's knee and its neighbours), same protocol,
    kept apart in ``W/reference-extra`` (``-full`` at width 1) so the panel's statistics never include them."""
    from psc_nas.arch import ArchConfig

    if width not in (REF_WIDTH, 1.0):
        raise SystemExit(f"--width: the reference's {REF_WIDTH} or 1 (full width), not {width}")
    out_dir = extra_dir(work, width)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for seed in seeds:
        for path in configs:
            config = ArchConfig.load(path)
            config.save(out_dir / f"{config.hash}.yaml")  # the report prices it from here
            out = out_dir / f"{config.hash}-s{seed}.json"
            if not out.exists():
                todo.append((f"{path.parent.name}/{path.name}", config.to_json(), seed, str(out), width))
    print(f"{len(todo)} extra reference runs to do (width {width:g})", flush=True)
    run_jobs(_reference_job, todo, jobs)


def panel_members(names: list[str] | None) -> list[dict[str, Any]]:
    """The panel members called ``names``, in that order (the whole panel when none); an unknown name stops."""
    members = {m["name"]: m for m in panel()}
    unknown = sorted(set(names or ()) - set(members))
    if unknown:
        raise SystemExit(f"not panel members: {', '.join(unknown)}")
    return [members[name] for name in names] if names else list(members.values())


def reference_full_width(work: Path, names: list[str], jobs: int, seeds: tuple[int, ...]) -> None:
    """The reference protocol at full width (``width`` 1, the network the search prices) for a few panel members,
    in ``W/reference-full``: do reduced-width and full-width trainings order them alike?"""
    out_dir = work / "reference-full"
    out_dir.mkdir(parents=True, exist_ok=True)
    members = panel_members(names)
    todo = []
    for seed in seeds:
        for member in members:
            out = out_dir / f"{member['config'].hash}-s{seed}.json"
            if not out.exists():
                todo.append((member["name"], member["config"].to_json(), seed, str(out), 1.0))
    print(f"{len(todo)} full-width reference runs to do", flush=True)
    run_jobs(_reference_job, todo, jobs)


def reference_many_seeds(
    work: Path, jobs: int, seeds: tuple[int, ...], deadline_s: float | None, smoke: bool = False, gpu_fast: bool = False
) -> None:
    """The full-width reference protocol, many seeds: every panel member (into ``W/reference-full``) and every
    architecture of fidelity-knee.json (the default run's knee and neighbour, into ``W/reference-extra-full``),
    seed after seed, so that a deadline leaves every architecture with the same number of seeds, give or take
    one. Written for a lent GPU (``--deadline``), where many processes share the card (taking turns on it unless
    CUDA MPS runs: fidelity.md, "A lent GPU for the reference"); on the CPU it is
    ``reference-full`` plus ``reference-extra --width 1`` in one queue. ``smoke``: 1 epoch of 8 patches per run,
    into ``W/smoke`` (a check of the machinery, never a score). ``gpu_fast``: see ``_strict_fp32_device``."""
    from psc_nas.arch import ArchConfig

    work = work / "smoke" if smoke else work

    members = [(m["name"], m["config"], work / "reference-full") for m in panel()]
    knee_runs = json.loads(KNEE_JSON.read_text())["runs"]
    knee = {r["hash"]: (r["name"], ArchConfig.from_json(r["config"])) for r in knee_runs}
    members += [(name, config, extra_dir(work, 1.0)) for name, config in knee.values()]
    for _, config, folder in members:
        folder.mkdir(parents=True, exist_ok=True)
        if folder != work / "reference-full":  # outside the panel: the reports price it from its file
            config.save(folder / f"{config.hash}.yaml")
    todo = []
    for seed in seeds:
        for name, config, folder in members:
            out = folder / f"{config.hash}-s{seed}.json"
            if not out.exists():
                todo.append((name, config.to_json(), seed, str(out), 1.0, smoke, gpu_fast))
    print(f"{len(todo)} full-width reference runs to do over {len(members)} architectures", flush=True)
    run_jobs(_reference_job, todo, jobs, deadline_s)


FULL_WIDTH_JSON = DOCS / "fidelity-full-width.json"
KNEE_JSON = DOCS / "fidelity-knee.json"  # reference-extra's full-width runs, with their architectures (knee-report)
SCORES_JSON = DOCS / "fidelity-scores.json"  # the predictors' table and every evaluator run (fidelity_report.py)


def ran_on_cpu(run: dict[str, Any]) -> bool:
    """Whether a reference run trained on the CPU: runs archived before ``device`` was recorded all did."""
    return run.get("device", "cpu") == "cpu"


def full_width_runs(include_gpu: bool = False) -> dict[str, dict[int, dict[str, Any]]]:
    """The archived full-width reference runs (fidelity-full-width.json) by architecture hash, then seed: the
    reference is the CPU runs. Runs trained on a GPU (``device`` other than "cpu") come only with ``include_gpu``:
    the 11 of 2026-12-04 scored 0.003 ± 0.001 Dice above the CPU runs (fidelity-full-width.md), as much as the
    architectures differ, so they are not pooled with them."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for record in json.loads(FULL_WIDTH_JSON.read_text())["runs"] if FULL_WIDTH_JSON.exists() else []:
        if include_gpu or ran_on_cpu(record):
            runs.setdefault(record["hash"], {})[record["seed"]] = record
    return runs


def archive_runs(archive: Path, folder: Path, command: str, with_config: bool = False) -> list[dict[str, Any]]:
    """The run files ``folder/<hash>-s<seed>.json`` merged over those already in ``archive`` (a run is its
    architecture and seed) and written back there, so that a fresh machine's cache (``restore``) and the reports
    never depend on one session's ``W``. ``with_config``: each run also carries its architecture (read from
    ``folder/<hash>.yaml``), for runs outside the panel. Returns every archived run."""
    from psc_nas.arch import ArchConfig

    runs: dict[tuple[str, int], dict[str, Any]] = {}
    if archive.exists():
        for record in json.loads(archive.read_text())["runs"]:
            runs[(record["hash"], record["seed"])] = record
    for path in sorted(folder.glob("*-s*.json")):
        record = json.loads(path.read_text())
        record["hash"] = path.name.rsplit("-s", 1)[0]
        if with_config:
            record["config"] = ArchConfig.load(folder / f"{record['hash']}.yaml").to_json()
        runs[(record["hash"], record["seed"])] = record
    if runs:
        data = {
            "command": command,
            "protocol": "the reference protocol of fidelity-reference.json at width 1 (the network the search prices)",
            "runs": [runs[key] for key in sorted(runs)],
        }
        write_text_atomic(archive, json.dumps(data, indent=1) + "\n")
        print(f"wrote {archive}: {len(runs)} runs")
    return list(runs.values())


def archive_full_width(work: Path) -> None:
    """Every full-width reference run of the panel, in ``docs/benchmarks/fidelity-full-width.json``."""
    archive_runs(
        FULL_WIDTH_JSON,
        work / "reference-full",
        "python benchmarks/fidelity.py reference-full --names NAME ... --seeds S ... --jobs 1 --work W (2-core CPU) "
        "or python benchmarks/fidelity.py reference-seeds --seeds S ... --jobs N --deadline T [--gpu-fast] --work W "
        "(a lent GPU; each run's device says where it trained) && python benchmarks/fidelity.py assemble --work W",
    )


def restore(work: Path) -> None:
    """Rebuild ``W/reference``, ``W/reference-full``, ``W/reference-extra-full`` and ``W/scores`` from the committed
    JSON files, for a machine whose cache is gone: runs already in ``W`` are kept. The evaluators' per-seed scores
    were first committed (``raw_scores`` of fidelity-scores.json) on 2026-12-03; those measured before are gone with
    their machine."""
    from psc_nas.arch import ArchConfig

    restored = 0
    for row in json.loads((DOCS / "fidelity-reference.json").read_text())["panel"]:
        for run in row["runs"]:
            out = work / "reference" / f"{row['hash']}-s{run['seed']}.json"
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(out, json.dumps({"name": row["name"], **run}, indent=1))
                restored += 1
    if FULL_WIDTH_JSON.exists():
        for record in json.loads(FULL_WIDTH_JSON.read_text())["runs"]:
            out = work / "reference-full" / f"{record['hash']}-s{record['seed']}.json"
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(out, json.dumps(record, indent=1))
                restored += 1
    for record in json.loads(KNEE_JSON.read_text())["runs"] if KNEE_JSON.exists() else []:
        folder = extra_dir(work, 1.0)
        out = folder / f"{record['hash']}-s{record['seed']}.json"
        if not out.exists():
            folder.mkdir(parents=True, exist_ok=True)
            ArchConfig.from_json(record["config"]).save(folder / f"{record['hash']}.yaml")
            write_text_atomic(out, json.dumps({k: v for k, v in record.items() if k != "config"}, indent=1))
            restored += 1
    raw = json.loads(SCORES_JSON.read_text()).get("raw_scores", {})
    for variant, by_hash in raw.items():
        for h, by_seed in by_hash.items():
            for seed, record in by_seed.items():
                out = work / "scores" / variant / f"{h}-s{seed}.json"
                if not out.exists():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    write_text_atomic(out, json.dumps(record))
                    restored += 1
    print(f"restored {restored} runs into {work}")


def load_reference(work: Path) -> dict[str, dict[int, dict[str, Any]]]:
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for member in panel():
        for path in sorted((work / "reference").glob(f"{member['config'].hash}-s*.json")):
            record = json.loads(path.read_text())
            found.setdefault(member["config"].hash, {})[record["seed"]] = record
    return found


def assemble(work: Path) -> None:
    runs = load_reference(work)
    rows = []
    for member in panel():
        seeds = runs.get(member["config"].hash, {})
        rows.append(
            {
                "name": member["name"],
                "hash": member["config"].hash,
                "params": member["params"],
                "macs": member["macs"],
                "config": member["config"].to_dict(),
                "runs": [
                    {"seed": s, "metrics": r["metrics"], "curve": r["curve"], "wall_s": r["wall_s"]}
                    for s, r in sorted(seeds.items())
                ],
            }
        )
    data = {
        "command": "python benchmarks/fidelity.py reference --jobs 2 --work W && "
        "python benchmarks/fidelity.py assemble "
        "--work W",
        "protocol": {
            "task": TASK,
            "space": SPACE,
            "budget_params": BUDGET_PARAMS,
            "width": REF_WIDTH,
            "epochs": REF_EPOCHS,
            "samples_per_epoch": REF_SAMPLES,
            "batch_size": REF_BATCH,
            "optimizer": "AdamW",
            "lr": REF_LR,
            "weight_decay": REF_WD,
            "lr_schedule": "onecycle",
            "seeds": list(REF_SEEDS),
            "score": "final validation dice_mean (2 volumes, sliding window)",
            "test": "test_dice_mean on the 5 test volumes after the last epoch",
        },
        "panel": rows,
    }
    DOCS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(DOCS / "fidelity-reference.json", json.dumps(data, indent=1) + "\n")
    done = sum(len(r["runs"]) for r in rows)
    print(f"wrote {DOCS / 'fidelity-reference.json'}: {done} runs over {len(rows)} architectures")
    archive_full_width(work)


# ----------------------------------------------------------------------------------------------- evaluators
def _soft_scores_callback() -> Any:
    """A Lightning callback that, once training ends, scores the final network on the validation volumes with
    continuous measures beside the task's hard Dice: soft Dice per class (softmax probabilities against the
    one-hot label, per volume, averaged over volumes; background excluded, as the hard Dice) and the voxel-mean
    cross-entropy. A hard Dice is a step function of the logits (a class the network does not yet predict scores
    0 however close it is); these are not, which is what a short training's ranking may need."""
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback

    class SoftScores(Callback):
        def __init__(self) -> None:
            self.scores: dict[str, float] = {}

        @torch.no_grad()
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            net, task = pl_module.net, pl_module.task
            net.eval()
            soft, ce = [], []
            for batch in trainer.datamodule.val_dataloader():
                logits = task.predict(net, batch).float()
                label = batch["label"].long()
                ce.append(float(F.cross_entropy(logits, label[:, 0])))
                probs = logits.softmax(1)
                onehot = F.one_hot(label[:, 0], probs.shape[1]).movedim(-1, 1).float()
                dims = (0, 2, 3, 4)
                soft.append((2 * (probs * onehot).sum(dims) / (probs.sum(dims) + onehot.sum(dims)).clamp_min(1e-6))[1:])
            per_class = torch.stack(soft).mean(0)
            names = [n.lower() for n in task.class_names[1:]]
            self.scores = {f"soft_dice_{n}": float(v) for n, v in zip(names, per_class)}
            self.scores["soft_dice_mean"] = float(per_class.mean())
            self.scores["cross_entropy"] = sum(ce) / len(ce)
            net.train()

    return SoftScores()


def _train_variant(
    epochs: int,
    samples: int,
    width: float | None,
    lr_schedule: str = "constant",
    lr: float = 1e-3,
    batch: int = 4,
    soft: bool = False,
    weight_decay: float | None = None,
    **data: Any,
) -> Callable[..., dict[str, float]]:
    """``weight_decay``: default 10⁻⁴ with the one-cycle schedule, else 0. ``soft``: also record the continuous
    validation scores of ``_soft_scores_callback`` and the training loss (last epoch's mean, and its sum over
    epochs: the training-speed estimate of Ru et al. 2021)."""

    def score(config: Any, seed: int) -> dict[str, float]:
        from psc_nas.train import fit

        cfg = reduced(config, width) if width else config
        extra = _soft_scores_callback() if soft else None
        result = fit(
            cfg,
            TASK,
            epochs=epochs,
            seed=seed,
            lr=lr,
            lr_schedule=lr_schedule,
            weight_decay=(1e-4 if lr_schedule == "onecycle" else 0.0) if weight_decay is None else weight_decay,
            data_options={"samples_per_epoch": samples, "batch_size": batch, **data},
            callbacks=[extra] if extra else (),
        )
        if not soft:
            return result.metrics
        losses = [row["train_loss"] for row in result.curve]
        return {**result.metrics, **extra.scores, "train_loss": losses[-1], "train_loss_sum": sum(losses)}

    return score


def _retrain_variant(
    epochs: int, lr: float | None = None, weight_decay: float | None = None
) -> Callable[..., dict[str, float]]:
    """The quick profile's retraining (its own RetrainPolicy, before a task's overrides: full width, one-cycle,
    ``samples_per_epoch`` patches per epoch) for ``epochs``: the score that orders the retrained front and picks
    best.yaml. ``lr`` and ``weight_decay`` replace the policy's (None: the policy's, Adam 1e-3, which IBSR's
    retraining replaces by AdamW 2e-3 since 2026-12-06), so ``retrain-quick-9`` still measures what it measured."""
    from psc_nas.search.profiles import PROFILES

    policy = PROFILES["quick"].retrain
    return _train_variant(
        epochs,
        policy.samples_per_epoch,
        None,
        policy.lr_schedule,
        policy.lr if lr is None else lr,
        policy.batch_size,
        weight_decay=policy.weight_decay if weight_decay is None else weight_decay,
    )


VARIANTS: dict[str, Callable[[], Callable[..., dict[str, float]]]] = {
    # today's quick profile, top rung: 2 epochs x 8 patches at full width, constant Adam 1e-3
    "train-today": lambda: _train_variant(2, 8, None),
    # the same runs (same seeds reproduce train-today's hard Dice exactly), also scored by soft Dice,
    # validation cross-entropy and training loss
    "train-today-soft": lambda: _train_variant(2, 8, None, soft=True),
    # the default run's retraining: 9 epochs (its retrained members got 8-10 in search.md §2f) x 32 patches
    "retrain-quick-9": lambda: _retrain_variant(9),
    # the same at its cap, 32 epochs x 32 patches = 256 steps (the default run's retraining since 2026-12-05), with
    # the optimiser of 2026-12-05 (Adam 1e-3) and with the reference protocol's (AdamW 2e-3, weight decay 1e-4)
    "retrain-quick-32-adam1e-3": lambda: _retrain_variant(32, 1e-3, 0.0),
    "retrain-quick-32-adamw2e-3": lambda: _retrain_variant(32, REF_LR, REF_WD),
    # re-tuned: reduced-width proxy, many more steps per second, one-cycle
    "train-w0.25-32": lambda: _train_variant(2, 64, 0.25, "onecycle", 2e-3),
    "train-w0.25-96": lambda: _train_variant(3, 128, 0.25, "onecycle", 2e-3),
    # the reference's step count (256) and recipe on 16³ patches (1/8 of the voxels per step), patches
    # centred on each class equally often so CSF is learned early; validated as the reference (32³ windows)
    "train-w0.25-c16-bal-256": lambda: _train_variant(
        2, 512, 0.25, "onecycle", 2e-3, patch_size=16, class_balanced=True
    ),
}


def _measure_job(variant: str, name: str, config_json: str, seed: int, out: str) -> str:
    _threads(1)
    from psc_nas.arch import ArchConfig
    from psc_nas.memory import keep_freed_memory

    keep_freed_memory()
    config = ArchConfig.from_json(config_json)
    started = time.time()
    if variant == "zero-cost":  # every proxy, one record (they share the batch and the initialisation seed)
        from psc_nas.evaluators.zero_cost import proxy_scores

        metrics = proxy_scores(config, TASK, seed=seed)
    else:
        metrics = VARIANTS[variant]()(config, seed)
    record = {"variant": variant, "name": name, "seed": seed, "metrics": metrics, "wall_s": time.time() - started}
    write_text_atomic(Path(out), json.dumps(record))
    return f"{variant} {name} seed {seed}: {json.dumps(metrics)[:80]} ({record['wall_s']:.1f} s)"


def measure(work: Path, variant: str, seeds: tuple[int, ...], jobs: int, names: list[str] | None = None) -> None:
    """Score the panel (or only the members in ``names``) with one evaluator variant, one record per seed."""
    out_dir = work / "scores" / variant
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for seed in seeds:
        for member in panel_members(names):
            out = out_dir / f"{member['config'].hash}-s{seed}.json"
            if not out.exists():
                todo.append((variant, member["name"], member["config"].to_json(), seed, str(out)))
    print(f"{variant}: {len(todo)} scores to compute", flush=True)
    run_jobs(_measure_job, todo, jobs)


def _supernet_job(seed: int, options_json: str, out_dir: str) -> str:
    """One super-network per seed (its training is the seed-dependent part), then every panel member scored."""
    _threads(1)
    from psc_nas.evaluators import EvaluationFailed, EvaluatorSetup, make_evaluator
    from psc_nas.memory import keep_freed_memory
    from psc_nas.nets import cost
    from psc_nas.space import SearchSpace
    from psc_nas.tasks import get_task

    keep_freed_memory()
    task = get_task(TASK)
    spatial = tuple(task.input_shape[1:])
    options = json.loads(options_json)
    setup = EvaluatorSetup(
        task,
        seed=seed,
        space=SearchSpace.load(SPACE),
        options=options,
        admissible=lambda config: cost(config, spatial).params <= BUDGET_PARAMS,
    )
    evaluator = make_evaluator("supernet", setup)
    started = time.time()
    evaluator.prepare(Path(out_dir), seconds_left=None)
    prepare_s = time.time() - started
    level = evaluator.levels()[-1]
    for member in panel():
        out = Path(out_dir) / f"{member['config'].hash}-s{seed}.json"
        if out.exists():
            continue
        t0 = time.time()
        try:
            evaluation = evaluator.evaluate(member["config"], level, seconds_left=None)
        except EvaluationFailed as error:  # not an architecture of the space (cakes_uniform): no score
            print(f"{member['name']}: {error}", flush=True)
            continue
        record = {
            "variant": Path(out_dir).name,
            "name": member["name"],
            "seed": seed,
            "metrics": evaluation.metrics,
            "wall_s": time.time() - t0,
            "prepare_s": prepare_s,
            "fidelity": level.words,
        }
        write_text_atomic(out, json.dumps(record))
    return f"supernet seed {seed}: prepared in {prepare_s:.0f} s, {level.words}"


SUPERNET_VARIANTS = {
    "supernet-w0.25-600": {"width": 0.25, "steps": 600},
    "supernet-w0.25-600-c16": {"width": 0.25, "steps": 600, "train_size": 16},  # SPOS on 16³ crops: ~5× cheaper
}


def measure_supernet(work: Path, variant: str, seeds: tuple[int, ...], jobs: int) -> None:
    out_dir = work / "scores" / variant
    out_dir.mkdir(parents=True, exist_ok=True)
    options = json.dumps(SUPERNET_VARIANTS[variant])
    run_jobs(_supernet_job, [(seed, options, str(out_dir)) for seed in seeds], jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "command",
        choices=[
            "panel",
            "reference",
            "reference-extra",
            "reference-full",
            "reference-seeds",
            "assemble",
            "restore",
            "measure",
            "report",
            "full-width-report",
            "knee-report",
            "recipe-report",
            "screen",
        ],
    )
    parser.add_argument("variant", nargs="?")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "fidelity")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument(
        "--deadline", type=float, help="reference-seeds: start no run after this many seconds (a lent machine)"
    )
    parser.add_argument(
        "--gpu-fast", action="store_true", help="reference-seeds: nondeterministic autotuned cuDNN (float32 still)"
    )
    parser.add_argument("--smoke", action="store_true", help="reference-seeds: 1 epoch of 8 patches, into W/smoke")
    parser.add_argument("--config", type=Path, nargs="+", help="reference-extra: architecture files to train")
    parser.add_argument("--names", nargs="+", default=[], help="reference-full, measure: only these panel members")
    parser.add_argument(
        "--width", type=float, default=REF_WIDTH, help=f"reference-extra: {REF_WIDTH} (the reference) or 1 (full width)"
    )
    args = parser.parse_args()
    if args.command == "panel":
        for m in panel():
            print(f"{m['name']:14s} {m['config'].hash} params {m['params']:>9,d} MACs {m['macs'] / 1e9:6.2f}G")
    elif args.command == "reference":
        reference(args.work, args.jobs, tuple(args.seeds or REF_SEEDS))
    elif args.command == "reference-extra":
        reference_extra(args.work, args.config or [], args.jobs, tuple(args.seeds or REF_SEEDS), args.width)
    elif args.command == "reference-full":
        reference_full_width(args.work, args.names, args.jobs, tuple(args.seeds or (0,)))
    elif args.command == "reference-seeds":
        reference_many_seeds(
            args.work, args.jobs, tuple(args.seeds or (0, 1)), args.deadline, args.smoke, args.gpu_fast
        )
    elif args.command == "assemble":
        assemble(args.work)
    elif args.command == "measure" and args.variant in SUPERNET_VARIANTS:
        measure_supernet(args.work, args.variant, tuple(args.seeds or (0, 1, 2)), args.jobs)
    elif args.command == "measure":
        measure(args.work, args.variant, tuple(args.seeds or (0, 1, 2)), args.jobs, args.names)
    elif args.command == "report":
        from fidelity_report import report  # benchmarks/fidelity_report.py

        report(args.work)
    elif args.command == "restore":
        restore(args.work)
    elif args.command == "full-width-report":
        from fidelity_report import full_width_report

        full_width_report(args.work)
    elif args.command == "knee-report":
        from fidelity_report import knee_report

        knee_report(args.work)
    elif args.command == "recipe-report":
        from fidelity_report import recipe_report

        recipe_report(args.work)
    elif args.command == "screen":
        from fidelity_report import screen_check

        screen_check(tuple(args.seeds or (0, 1, 2)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()

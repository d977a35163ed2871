"""Search benchmark: the default run's wall time, and our search vs Optuna baselines at equal time.

    python benchmarks/search.py --out runs/bench-search [--compare-minutes 5] [--skip-default]

1. ``psc-search --task ibsr --budget 5M`` as a user runs it (the quick profile), timed from the
   outside: wall time, architectures trained, front, knee config, and the share of trial time
   spent in network compute (training forward/backward, and that plus validation forward).
2. Equal wall time (``--timeout``, retraining of the front included) for three searches, per seed
   (``--compare-seeds``; ``--parallel`` runs a seed's three searches at once, one thread each):
   ours (NSGA-II + Pareto-aware successive halving + preset seeding), Optuna's RandomSampler and
   plain NSGA-II (both one fidelity, no presets). Hypervolume of (Dice, params) normalized to
   Dice in [0, 1] and params in [0, budget], of the search scores and of the retrained front.
   ``--methods`` picks others from METHODS (pre-screen variants; the default run's split, 12
   architectures trained and the rest of the time retraining, for ours and both baselines); runs
   that ``<out>/compare-progress.json`` already records are reused.
3. The papers' presets at the quick profile's top fidelity (taken from our study when a preset got
   there, trained otherwise); which point of each search dominates each preset.

Writes ``<out>/search-benchmark.json`` and ``<out>/search-fronts.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd

from psc_nas import cost
from psc_nas.search.budget import Budget
from psc_nas.search.front import quality_hypervolume
from psc_nas.search.profiles import PROFILES
from psc_nas.search.record import Objective, StudyRecord, TrialRecord, read_trials
from psc_nas.space import SearchSpace
from psc_nas.tasks import get_task

BUDGET = "5M"
BUDGET_PARAMS = 5_000_000
# (Dice, params) normalized to Dice in [0, 1] and params in [0, budget], whatever the searches recorded
COMPARED = StudyRecord(
    "ibsr", "ibsr_densenet3d", Budget(params=BUDGET_PARAMS), (Objective("dice_mean", True), Objective("params", False))
)
NO_SCREEN = ["--prescreen", "none"]  # IBSR's quick profile screens 300 architectures unless told not to


def screened_split(proxy: str, size: int, *extra: str, width: float = 1.0, trials: int = 12) -> list[str]:
    """The default run's split (``trials`` trained, the rest retraining) with a pre-screen of ``size`` by ``proxy``,
    each network scored at ``width`` (methods 8-13 were measured before the width option, at width 1)."""
    return [
        "--prescreen",
        proxy,
        "--prescreen-size",
        str(size),
        "--prescreen-width",
        f"{width:g}",
        "--trials",
        str(trials),
        *extra,
    ]


METHODS = {
    "ours (NSGA-II + multi-fidelity + presets)": [*NO_SCREEN],
    "random (Optuna RandomSampler)": ["--sampler", "random", "--no-multi-fidelity", "--no-seed-presets", *NO_SCREEN],
    "NSGA-II without multi-fidelity": ["--no-multi-fidelity", "--no-seed-presets", *NO_SCREEN],
    "ours + grad_norm pre-screen of 100": ["--prescreen", "grad_norm", "--prescreen-size", "100"],
    "ours + zico pre-screen of 100": ["--prescreen", "zico", "--prescreen-size", "100"],
    # the default run's split of the time: 12 architectures trained (the quick profile's trials), the rest of the
    # time retraining the front (up to the profile's cap, 20 epochs then); the baselines with the same split. "The
    # default run" was the default until IBSR's quick profile gained its pre-screen (method 8 is the default run now)
    "ours, 12 trained (the default run)": ["--trials", "12", *NO_SCREEN],
    "random, 12 trained": [
        "--sampler",
        "random",
        "--no-multi-fidelity",
        "--no-seed-presets",
        "--trials",
        "12",
        *NO_SCREEN,
    ],
    "NSGA-II without multi-fidelity, 12 trained": [
        "--no-multi-fidelity",
        "--no-seed-presets",
        "--trials",
        "12",
        *NO_SCREEN,
    ],
    # the default run's split with the pre-screen choosing the 10 architectures after the presets (IBSR scores them
    # on 16³ patches, about 1 s each on 2 cores, before zico ran in one pass; method 12 is the default run now)
    "ours + zico+macs pre-screen of 100, 12 trained": screened_split("zico+macs", 100),
    "ours + zico pre-screen of 100, 12 trained": screened_split("zico", 100),
    # the control: the same screen with a random number in zico's place (what the proxy's ranking adds); it costs
    # no time, so it gets the 12.5 minutes less the zico screen's measured 113 s, leaving its retraining as much time
    "ours + random+macs pre-screen of 100, 12 trained (637 s)": screened_split("random+macs", 100, "--timeout", "637s"),
    # zico computed in one pass (its torch.std of the stacked pair was 60% of a screen): 300 architectures now
    # take about what 100 took for methods 8-9 (116 s against 113 s on 16³), leaving the retraining as much time
    "ours + zico+macs pre-screen of 300, 12 trained": screened_split("zico+macs", 300),
    # method 8's command with zico in one pass: the default run since then (its screen of 100 takes ~40-50 s, not
    # 113 s; the time saved goes to the retraining)
    "ours + zico+macs pre-screen of 100 in one pass, 12 trained": screened_split("zico+macs", 100),
    # method 10's control at method 12's split: 12.5 minutes less the one-pass zico screen's 48 s (41-54 s measured)
    "ours + random+macs pre-screen of 100, 12 trained (702 s)": screened_split("random+macs", 100, "--timeout", "702s"),
    # each screened network scored at width 0.25 (0.40 of the time per network, the panel ranked as well:
    # fidelity.md), so 300 are screened in 1.2x the time method 12 screens 100: the default run in §2g-2h
    "ours + zico+macs pre-screen of 300 at width 0.25, 12 trained": screened_split("zico+macs", 300, width=0.25),
    # method 14 with 5 trained (the two presets that fit, then the screen's first 3) instead of 12: the short
    # training that orders them ranks the fidelity panel at chance (rung ρ 0.14, fidelity.md), so its ~190 s go to
    # the retraining instead (8-15 epochs instead of method 14's 4-5, §2i): the default run since §2i
    "ours + zico+macs pre-screen of 300 at width 0.25, 5 trained": screened_split(
        "zico+macs", 300, width=0.25, trials=5
    ),
}
DEFAULT_METHODS = (0, 1, 2)  # --methods: indices into METHODS, in order; the first is the one divided by the others


def psc_search(out: Path, *extra: str) -> float:
    """Run the CLI as a user would; returns its wall seconds."""
    started = time.perf_counter()
    command = [
        str(Path(sys.executable).with_name("psc-search")),
        "--task",
        "ibsr",
        "--budget",
        BUDGET,
        "--out",
        str(out),
        *extra,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def load(out: Path) -> list[TrialRecord]:
    return read_trials(optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}"))


def front_points(records: list[TrialRecord]) -> list[tuple[float, float]]:
    return [(r.values[0], r.values[1]) for r in records if r.feasible]


def compute_share(out: Path, wall: float) -> dict[str, float]:
    table = pd.read_csv(out / "trials.csv")
    trained = table[table["train_s"] > 0]
    train_s = float(trained["train_s"].sum())
    return {
        "search_wall_s": wall,
        "trial_train_s": train_s,
        "fwd_bwd_share_of_training": float(trained["fwd_bwd_s"].sum()) / train_s,
        "fwd_bwd_plus_val_forward_share_of_training": float(trained["fwd_bwd_s"].sum() + trained["val_forward_s"].sum())
        / train_s,
        "training_share_of_search_wall": train_s / wall,
    }


def default_run(out: Path) -> dict:
    wall = psc_search(out)
    summary = json.loads((out / "pareto.json").read_text())
    trained = [r for r in load(out) if r.feasible]
    return {
        "command": f"psc-search --task ibsr --budget {BUDGET} --out {out}",
        "architectures_trained": len(trained),
        "front_size": len(summary["front"]),
        "knee_trial": summary["knee"],
        "best_yaml": (out / "best.yaml").is_file(),
        "hypervolume": summary["hypervolume"],
        **compute_share(out, wall),
    }


def _one_run(out: Path, minutes: float, seed: int, flags: list[str], threads: int | None) -> subprocess.Popen:
    if out.exists():  # psc-search would resume that study, under this run's time limit
        raise SystemExit(f"{out} exists and compare-progress.json does not record it as this run: remove it first")
    command = [str(Path(sys.executable).with_name("psc-search")), "--task", "ibsr", "--budget", BUDGET]
    trials = [] if "--trials" in flags else ["--trials", "200"]  # by default time, not a trial count, ends a run
    command += ["--out", str(out), "--timeout", f"{minutes}m", *trials, "--seed", str(seed), *flags]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)


def _finish(process: subprocess.Popen, out: Path) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{out}: psc-search exited {process.returncode}")


def _summary(out: Path, wall: float, seed: int, load_before: float) -> dict:
    records = load(out)
    trials = [r for r in records if r.feasible]
    pareto = json.loads((out / "pareto.json").read_text())
    retrained = pareto.get("retrained") or {}
    params = {r.number: r.params for r in records}
    return {
        "seed": seed,
        "out": str(out),
        "wall_s": wall,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # at the start, at the end
        "architectures_trained": len(trials),
        "hypervolume": quality_hypervolume(trials, COMPARED),  # the search's own scores
        "retrained": len(retrained.get("members", [])),
        "retrained_epochs": sorted({m["epochs"] for m in retrained.get("members", [])}),
        "retrained_hypervolume": retrained.get("hypervolume") or 0.0,  # the retrained front's scores
        "points": front_points(records),
        "retrained_points": [[m["retrained_score"], params[m["number"]]] for m in retrained.get("members", [])],
    }


def comparison(
    root: Path,
    minutes: float,
    seeds: tuple[int, ...] = (0,),
    parallel: bool = False,
    methods: tuple[int, ...] = DEFAULT_METHODS,
) -> dict:
    """Each of ``methods`` (indices into METHODS) for ``minutes`` of wall time per seed (retraining included, as
    the profile ends); with ``parallel`` the methods of one seed run at the same time, one torch thread each, so
    that they share the machine's load alike. Ratios divide the first method given by each.

    A run that ``root/compare-progress.json`` already records (same method, seed, minutes and mode, its folder
    still there) is reused, not run again: an interrupted benchmark resumes, and a method added later is
    compared with runs measured before it (the load averages recorded with each run say whether the machine
    was as idle)."""
    names = list(METHODS)
    chosen = {names[index]: METHODS[names[index]] for index in methods}
    progress = root / "compare-progress.json"
    mode = "parallel" if parallel else "sequential"
    earlier = json.loads(progress.read_text()) if progress.exists() else {}
    runs: dict[str, list[dict]] = {name: [] for name in chosen}

    def reused(name: str, seed: int) -> bool:
        for run in earlier.get(name, []):
            same = (run["seed"], run.get("minutes"), run.get("mode")) == (seed, minutes, mode)
            if same and (Path(run["out"]) / "pareto.json").exists():
                runs[name].append(run)
                print(name, f"seed {seed}: reusing {run['out']}", flush=True)
                return True
        return False

    def save() -> None:  # after every run, so that an interrupted benchmark keeps what it measured
        merged = dict(earlier)  # methods not chosen this time keep their records
        for name, done in runs.items():  # the earlier records not reused, then this benchmark's
            merged[name] = [r for r in earlier.get(name, []) if r not in done] + done
        progress.write_text(json.dumps(merged, indent=2) + "\n")

    def record(name: str, out: Path, seed: int, started: float, load_before: float) -> None:
        summary = _summary(out, time.perf_counter() - started, seed, load_before)
        runs[name].append({**summary, "minutes": minutes, "mode": mode})
        print(name, json.dumps({k: v for k, v in runs[name][-1].items() if "points" not in k}), flush=True)
        save()

    for seed in seeds:
        outs = {name: root / f"compare-{names.index(name)}-s{seed}" for name in chosen}
        if parallel:
            if all([reused(name, seed) for name in chosen]):  # every one, not the first found
                continue
            for name in chosen:  # a seed's methods share the machine: all run again together
                runs[name] = [r for r in runs[name] if r["seed"] != seed]
            started, load_before = time.perf_counter(), os.getloadavg()[0]
            processes = {name: _one_run(outs[name], minutes, seed, chosen[name], 1) for name in chosen}
            for name, process in processes.items():
                _finish(process, outs[name])
            for name in chosen:
                record(name, outs[name], seed, started, load_before)
            continue
        for name in chosen:  # one after the other, each with the machine's threads
            if reused(name, seed):
                continue
            started, load_before = time.perf_counter(), os.getloadavg()[0]
            _finish(_one_run(outs[name], minutes, seed, chosen[name], None), outs[name])
            record(name, outs[name], seed, started, load_before)
    results = {}
    ours = runs[next(iter(chosen))]
    for name, per_seed in runs.items():
        hv = [r["retrained_hypervolume"] for r in per_seed]
        ratios = [
            o["retrained_hypervolume"] / r["retrained_hypervolume"] if r["retrained_hypervolume"] else None
            for o, r in zip(ours, per_seed)
        ]
        results[name] = {
            "out": per_seed[0]["out"],
            "points": per_seed[0]["points"],
            "hypervolume": sum(r["hypervolume"] for r in per_seed) / len(per_seed),
            "retrained_hypervolume": sum(hv) / len(hv),
            "retrained_hypervolume_range": [min(hv), max(hv)],
            "ours_over_this_retrained": ratios,
            "seeds": per_seed,
        }
    return results


def presets_vs_fronts(compare: dict) -> dict:
    """Each preset at the quick profile's top fidelity, and whether some front point dominates it."""
    from psc_nas.evaluators import EvaluatorSetup, make_evaluator

    task = get_task("ibsr")
    profile = PROFILES["quick"]
    train = make_evaluator("train", EvaluatorSetup(task, epochs=profile.epochs, data_options=profile.data_options))
    top = train.levels()[-1]
    ours = load(Path(next(iter(compare.values()))["out"]))
    evaluated = {r.preset: r.values[0] for r in ours if r.preset and r.feasible and r.fidelity.key == top.key}
    found = {}
    for name, config in SearchSpace.load("ibsr_densenet3d").presets().items():
        if name not in evaluated:
            evaluated[name] = train.evaluate(config, top, seconds_left=None).metrics["dice_mean"]
        dice = evaluated[name]
        params = cost(config, task.input_shape[1:]).params
        found[name] = {
            "dice_mean": dice,
            "params": params,
            "dominated_by": {
                method: next(
                    ([d, p] for d, p in entry["points"] if d >= dice and p <= params and (d, p) != (dice, params)), None
                )
                for method, entry in compare.items()
            },
        }
        print(name, json.dumps(found[name]), flush=True)
    return found


def plot(compare: dict, presets: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # not a dependency of the package; the JSON holds every point
        print(f"matplotlib is not installed: {path} not drawn")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (name, entry), marker in zip(compare.items(), "os^"):
        points = sorted(entry["points"], key=lambda p: p[1])
        axes.scatter(
            [p[1] / 1e6 for p in points],
            [p[0] for p in points],
            marker=marker,
            alpha=0.7,
            label=f"{name}: HV {entry['hypervolume']:.3f}",
        )
    for name, entry in presets.items():
        axes.scatter(entry["params"] / 1e6, entry["dice_mean"], marker="x", color="black")
        axes.annotate(
            name, (entry["params"] / 1e6, entry["dice_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    axes.axvline(BUDGET_PARAMS / 1e6, color="grey", linestyle=":", label="budget 5M")
    axes.set_xlabel("parameters (M)")
    axes.set_ylabel("validation Dice (mean of CSF, GM, WM)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-search"))
    parser.add_argument("--compare-minutes", type=float, default=5.0)
    parser.add_argument("--compare-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parallel", action="store_true", help="the methods of a seed at once, 1 thread each")
    parser.add_argument(
        "--methods",
        type=int,
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="indices into METHODS: " + "; ".join(f"{i}: {name}" for i, name in enumerate(METHODS)),
    )
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--skip-presets", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    if not args.skip_default:
        report["default"] = default_run(args.out / "default")
        print(json.dumps(report["default"], indent=2), flush=True)
    report["compare_minutes"] = args.compare_minutes
    report["compare_seeds"] = args.compare_seeds
    report["compare"] = comparison(
        args.out, args.compare_minutes, tuple(args.compare_seeds), args.parallel, tuple(args.methods)
    )
    print(
        json.dumps(
            {
                k: {kk: vv for kk, vv in v.items() if kk not in ("points", "seeds")}
                for k, v in report["compare"].items()
            },
            indent=2,
        ),
        flush=True,
    )
    report["presets"] = {} if args.skip_presets else presets_vs_fronts(report["compare"])
    (args.out / "search-benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report["compare"], report["presets"], args.out / "search-fronts.png")
    print(json.dumps(report["presets"], indent=2))


if __name__ == "__main__":
    main()

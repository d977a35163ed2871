"""Tight budgets: how many sampled candidates fit, before (reject) and after (restrict, project).

    .venv/bin/python benchmarks/tight_sampling.py --out docs/benchmarks/tight.json [--samples 2000]
        [--tpe-samples 300] [--search-seconds 30]

1. Sampling only (no training): for params budgets 1M, 2M, 5M and each sampler (random, TPE,
   NSGA-II as ``psc-search`` makes them), an in-memory Optuna study asks ``--samples`` candidates
   under each budget sampling mode; fitting ones are told the stand-in evaluator's score
   (``tests/search_standin.py``'s formula, from the exact cost) and their params, over-budget ones
   are told PRUNED as the engine does. Reported: the share that fits, distinct fitting architectures,
   seconds per sample, and how far the built candidates depart from what the sampler asked
   (restrict: questions whose first proposal was refused; project: units the repair changed).
2. Closeness to the sampler's distribution (random sampler): the ideal is the sampler's own
   distribution conditioned on fitting (what rejection sampling would give with unlimited samples),
   computed exactly per unit op by a convolution of the other units' param deltas (100-param bins).
   Reported: total variation between each mode's per-unit op frequencies and the ideal, averaged over
   units, beside the same distance for as many draws from the ideal itself (sampling noise), and the
   mean params of built candidates vs the ideal's.
3. Hypervolume at equal wall time: ``run_search`` with the stand-in evaluator (each epoch sleeps
   ``PSC_TRAIN_SECONDS`` = 0.1 s), the quick profile, NSGA-II, ``--timeout`` = ``--search-seconds``,
   40 trials queued, under each mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from psc_nas.search.budget import Budget  # noqa: E402 (after the path set-up)
from psc_nas.search.feasible import Feasibility, RestrictedSampler  # noqa: E402 (after the path set-up)
from psc_nas.search.record import tell_evaluated, tell_over_budget  # noqa: E402 (after the path set-up)
from psc_nas.search.runner import _catalog, make_sampler  # noqa: E402 (after the path set-up)

SPATIAL = (32, 32, 32)
BUDGETS = (1_000_000, 2_000_000, 5_000_000)
MODES = ("reject", "restrict", "project")
SAMPLERS = ("random", "tpe", "nsga2")
BIN = 100  # params per bin of the exact ideal


def standin_dice(params: int, arch_hash: str, epochs: int = 1) -> float:
    """tests/search_standin.py's fake_dice, from a known param count."""
    offset = int(arch_hash, 16) % 1000 / 1000
    return 0.4 + 0.35 * (1 - math.exp(-params / 1.5e6)) * (1 - 0.5**epochs) + 0.05 * offset


def sample_run(f: Feasibility, sampler_name: str, mode: str, n: int, seed: int) -> dict:
    inner = make_sampler(sampler_name, seed=seed, population=6)
    sampler = RestrictedSampler(inner, seed=seed) if mode == "restrict" else inner
    study = optuna.create_study(sampler=sampler, directions=["maximize", "minimize"])
    catalog = f.catalog
    fit, distinct, changed_units, ops, fitting_params = 0, set(), 0, [], []
    started = time.perf_counter()
    for _ in range(n):
        trial = study.ask()
        if mode == "restrict":
            config, picks = f.draw(trial)
        else:
            config, picks = f.decide(lambda name, choices, admissible, t=trial: t.suggest_categorical(name, choices))
            if mode == "project":
                built = f.project(picks)
                changed_units += sum(a != b for a, b in zip(picks, built))
                if built != picks:
                    picks = built
                    config = catalog.compose([options[p] for options, p in zip(catalog.options, picks)])
        price = f.cost_of(picks)
        ops.append(tuple(catalog.options[u][p].blocks[0].op for u, p in enumerate(picks)))
        if f.fits(price):
            fit += 1
            fitting_params.append(int(price[0]))
            distinct.add(config.hash)
            tell_evaluated(study, trial, [standin_dice(int(price[0]), config.hash), float(price[0])])
        else:
            tell_over_budget(study, trial)
            ops.pop()
    seconds = time.perf_counter() - started
    row = {
        "sampler": sampler_name,
        "mode": mode,
        "samples": n,
        "fit_share": fit / n,
        "distinct_fitting": len(distinct),
        "s_per_sample": seconds / n,
        "mean_params_fitting": float(np.mean(fitting_params)) if fitting_params else None,
    }
    if mode == "restrict":
        row["restricted_questions"] = sampler.restricted
        row["first_proposal_refused"] = sampler.refused
        row["fallbacks"] = sampler.fallbacks
    if mode == "project":
        row["units_changed_per_sample"] = changed_units / n
    row["_ops"] = ops
    return row


def ideal_op_marginals(f: Feasibility) -> tuple[list[dict[str, float]], float]:
    """Random sampler's distribution conditioned on params <= budget: per unit, P(op); and E[params]."""
    catalog = f.catalog
    probs = []  # per unit, per option: the random sampler's probability (uniform at each question)
    for unit, paths in enumerate(catalog.paths):
        p = np.zeros(len(catalog.options[unit]))
        for answers, option in paths:
            p[option] += math.prod(1 / len(catalog.space.parameters()[name]) for name in answers)
        probs.append(p / p.sum())
    lows = [int(d[:, 0].min()) for d in f.deltas]
    slack = int(f.limit[0] - f.base[0] - sum(lows))
    size = slack // BIN + 1
    pmfs = []
    for unit, p in enumerate(probs):
        pmf = np.zeros(size)
        for option, weight in enumerate(p):
            b = int(f.deltas[unit][option, 0] - lows[unit]) // BIN
            if b < size:
                pmf[b] += weight
        pmfs.append(pmf)
    marginals, mean = [], float(f.base[0] + sum(lows))
    for unit, p in enumerate(probs):
        rest = np.zeros(size)
        rest[0] = 1.0
        for other, pmf in enumerate(pmfs):
            if other != unit:
                rest = np.convolve(rest, pmf)[:size]
        cdf = np.cumsum(rest)
        weights = np.array(
            [
                p[o] * (cdf[size - 1 - b] if (b := int(f.deltas[unit][o, 0] - lows[unit]) // BIN) < size else 0.0)
                for o in range(len(p))
            ]
        )
        weights /= weights.sum()
        by_op: Counter = Counter()
        for option, weight in enumerate(weights):
            by_op[catalog.options[unit][option].blocks[0].op] += weight
        marginals.append(dict(by_op))
        mean += float(weights @ (f.deltas[unit][:, 0] - lows[unit]))
    return marginals, mean


def tv(freq: Counter, total: int, ideal: dict[str, float]) -> float:
    keys = set(freq) | set(ideal)
    return 0.5 * sum(abs(freq.get(k, 0) / total - ideal.get(k, 0.0)) for k in keys)


def closeness(rows: list[dict], f: Feasibility, seed: int) -> dict:
    marginals, ideal_mean = ideal_op_marginals(f)
    out = {"ideal_mean_params": ideal_mean}
    rng = np.random.default_rng(seed)
    for row in rows:
        ops = row["_ops"]
        if not ops:
            continue
        distances = [tv(Counter(o[u] for o in ops), len(ops), marginals[u]) for u in range(len(marginals))]
        out[row["mode"]] = {"fitting_samples": len(ops), "mean_tv_op": float(np.mean(distances))}
        noise = []
        for marginal in marginals:
            names = list(marginal)
            draws = rng.choice(len(names), size=len(ops), p=np.array([marginal[k] for k in names]))
            noise.append(tv(Counter(names[d] for d in draws), len(ops), marginal))
        out[row["mode"]]["noise_tv_op"] = float(np.mean(noise))
    return out


def search_runs(seconds: float) -> list[dict]:
    from rich.console import Console
    from search_standin import StandinEvaluator

    from psc_nas.search.runner import SearchSettings, run_search

    os.environ["PSC_TRAIN_SECONDS"] = "0.1"
    _ = _catalog("ibsr_densenet3d", SPATIAL).deltas  # the space's one-off pricing, outside every run's wall time
    rows = []
    for budget in BUDGETS:
        for mode in MODES:
            with tempfile.TemporaryDirectory() as tmp:
                settings = SearchSettings(
                    task="ibsr",
                    budget=Budget(params=budget),
                    trials=40,
                    timeout=seconds,
                    out=Path(tmp) / "run",
                    budget_sampling=mode,
                    retrain=False,  # equal search time; retraining is not what is compared
                )
                started = time.perf_counter()
                front = run_search(settings, evaluator=StandinEvaluator(), console=Console(quiet=True))
                study = optuna.load_study(study_name="run", storage=f"sqlite:///{Path(tmp) / 'run' / 'study.db'}")
                states = Counter(t.state.name for t in study.trials)
                rows.append(
                    {
                        "budget": budget,
                        "mode": mode,
                        "wall_s": time.perf_counter() - started,
                        "hypervolume": front.hypervolume,
                        "front": len(front.members),
                        "complete": states.get("COMPLETE", 0),
                        "over_budget": states.get("PRUNED", 0),
                        "distinct_evaluated": len(
                            {t.user_attrs.get("arch_hash") for t in study.trials if t.state.name == "COMPLETE"}
                        ),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--tpe-samples", type=int, default=300)
    parser.add_argument("--search-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search-only", action="store_true", help="only part 3, merged into an existing --out")
    args = parser.parse_args()
    if args.search_only:
        result = json.loads(args.out.read_text())
        result["search"] = search_runs(args.search_seconds)
        args.out.write_text(json.dumps(result, indent=1))
        return
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    catalog = _catalog("ibsr_densenet3d", SPATIAL)
    result = {"samples": args.samples, "tpe_samples": args.tpe_samples, "budgets": {}}
    for budget in BUDGETS:
        f = Feasibility(catalog, Budget(params=budget))
        rows = []
        for sampler in SAMPLERS:
            n = args.tpe_samples if sampler == "tpe" else args.samples
            for mode in MODES:
                rows.append(sample_run(f, sampler, mode, n, args.seed))
                print(budget, {k: v for k, v in rows[-1].items() if k != "_ops"}, flush=True)
        random_rows = [r for r in rows if r["sampler"] == "random"]
        entry = {
            "sampling": [{k: v for k, v in r.items() if k != "_ops"} for r in rows],
            "closeness_random": closeness(random_rows, f, args.seed),
        }
        result["budgets"][str(budget)] = entry
        print(budget, entry["closeness_random"], flush=True)
    if args.search_seconds > 0:
        result["search"] = search_runs(args.search_seconds)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

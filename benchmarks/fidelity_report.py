"""The fidelity table: each evaluator's rank agreement with the reference, its seed stability and its cost.

Used by ``python benchmarks/fidelity.py report --work W``; writes docs/benchmarks/fidelity-table.md and
docs/benchmarks/fidelity-scores.json (each predictor's ρ, τ and ICC; since 2026-12-03 also every evaluator run,
merged under ``raw_scores``, which ``fidelity.py restore`` writes back). ``full-width-report`` writes
docs/benchmarks/fidelity-full-width.md and merges ``W/scores`` into ``raw_scores`` without touching the tables;
``recipe-report`` does the same merge and writes docs/benchmarks/fidelity-retrain-recipe.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from fidelity import DOCS, REF_EPOCHS, SCORES_JSON, load_reference, panel, ran_on_cpu
from scipy.stats import kendalltau, spearmanr

from psc_nas.files import write_text_atomic


def icc1(scores: np.ndarray) -> float:
    """ICC(1): one-way random effects, single measurement. ``scores``: architectures × seeds (no NaN)."""
    n, k = scores.shape
    if n < 2 or k < 2:
        return float("nan")
    grand = scores.mean()
    msb = k * ((scores.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    msw = ((scores - scores.mean(axis=1, keepdims=True)) ** 2).sum() / (n * (k - 1))
    return float((msb - msw) / (msb + (k - 1) * msw))


def _load_scores(work: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """variant -> arch hash -> seed -> record."""
    found: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for folder in sorted((work / "scores").glob("*")):
        for path in folder.glob("*.json"):
            record = json.loads(path.read_text())
            found.setdefault(folder.name, {}).setdefault(path.name.rsplit("-s", 1)[0], {})[record["seed"]] = record
    return found


def merged_raw_scores(work: Path, archived: dict[str, Any]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Every evaluator run: those ``archived`` (``raw_scores`` of fidelity-scores.json), with ``W/scores`` over
    them (a run is its variant, architecture and seed), so that no session's subset replaces the archive."""
    merged: dict[str, dict[str, dict[str, dict[str, Any]]]] = archived
    for variant, by_hash in _load_scores(work).items():
        for h, by_seed in by_hash.items():
            for seed, record in by_seed.items():
                merged.setdefault(variant, {}).setdefault(h, {})[str(seed)] = record
    return {v: {h: dict(sorted(by.items())) for h, by in sorted(hs.items())} for v, hs in sorted(merged.items())}


def archive_scores(work: Path) -> None:
    """Merge ``W/scores`` into ``raw_scores`` of fidelity-scores.json, leaving its tables as they are."""
    if not SCORES_JSON.exists():
        return
    data = json.loads(SCORES_JSON.read_text())
    data["raw_scores"] = merged_raw_scores(work, data.get("raw_scores", {}))
    write_text_atomic(SCORES_JSON, json.dumps(data, indent=1) + "\n")
    runs = sum(len(by) for hs in data["raw_scores"].values() for by in hs.values())
    print(f"wrote {SCORES_JSON}: {runs} evaluator runs archived under raw_scores")


# The scores a training variant records, each with its sign (+1: higher is better). The task's hard Dice is the
# variant's own row; the others are continuous scores of the same runs (fidelity._soft_scores_callback).
TRAINING_SCORES = {
    "dice_mean": 1,
    "soft_dice_mean": 1,
    "cross_entropy": -1,
    "train_loss": -1,
    "train_loss_sum": -1,
}


def _predictors(scores: dict[str, dict[str, dict[int, dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """predictor name -> {hash: [score per seed]} (higher = predicted better) and seconds per architecture."""
    out: dict[str, dict[str, Any]] = {}
    for variant, by_arch in scores.items():
        keys = sorted({key for seeds in by_arch.values() for record in seeds.values() for key in record["metrics"]})
        signs = (
            {k: v for k, v in TRAINING_SCORES.items() if k in keys} if "dice_mean" in keys else dict.fromkeys(keys, 1)
        )
        metric_keys = list(signs)
        for key, sign in signs.items():
            name = variant if key == "dice_mean" else f"{variant}: {key}{' (−)' if sign < 0 else ''}"
            out[name] = {
                "values": {h: {s: sign * r["metrics"][key] for s, r in seeds.items()} for h, seeds in by_arch.items()},
                "seconds": float(
                    np.mean(
                        [
                            r["wall_s"] / (len(metric_keys) if variant == "zero-cost" else 1)
                            for seeds in by_arch.values()
                            for r in seeds.values()
                        ]
                    )
                ),
                "shared_seconds": variant == "zero-cost",
            }
    return out


PRESET_NAMES = ("cakes_uniform", "csn_ip", "csn_ir", "p1sc1", "p2sc2", "p2sc3", "conv3d")


def _extra_reference(work: Path, width: float = 0.25) -> list[dict[str, Any]]:
    """The reference-protocol runs of architectures outside the panel, one entry per architecture."""
    from fidelity import TASK, extra_dir

    from psc_nas import cost
    from psc_nas.arch import ArchConfig
    from psc_nas.tasks import get_task

    spatial = tuple(get_task(TASK).input_shape[1:])
    by_hash: dict[str, list[dict[str, Any]]] = {}
    folder = extra_dir(work, width)
    for path in sorted(folder.glob("*.json")):
        by_hash.setdefault(path.name.rsplit("-s", 1)[0], []).append(json.loads(path.read_text()))
    out = []
    for h, runs in by_hash.items():
        price = cost(ArchConfig.load(folder / f"{h}.yaml"), spatial)  # full width, as the panel
        out.append(
            {
                "name": runs[0]["name"],
                "hash": h,
                "params": price.params,
                "macs": price.macs,
                "seeds": sorted(r["seed"] for r in runs),
                "val": float(np.mean([r["metrics"]["dice_mean"] for r in runs])),
                "test": float(np.mean([r["metrics"]["test_dice_mean"] for r in runs])),
                "runs": [{"seed": r["seed"], "metrics": r["metrics"], "wall_s": r["wall_s"]} for r in runs],
            }
        )
    return out


REFERENCE_SCORES = ("dice_mean", "test_dice_mean", "dice_csf", "test_dice_csf", "gm+wm", "test gm+wm")


def _reference_score(metrics: dict[str, float], key: str) -> float:
    """A reference run's score ``key``: a metric, or "gm+wm" / "test gm+wm" (mean Dice of grey and white matter)."""
    if key.endswith("gm+wm"):
        prefix = "test_" if key.startswith("test") else ""
        return (metrics[f"{prefix}dice_gm"] + metrics[f"{prefix}dice_wm"]) / 2
    return metrics[key]


def curve_drift(run: dict[str, Any]) -> float | None:
    """How much a reference run's validation Dice still moved over its last quarter of epochs (flat curve: ~0);
    None for a run kept without its curve."""
    curve = run.get("curve")
    return curve[-1]["dice_mean"] - curve[-1 - REF_EPOCHS // 4]["dice_mean"] if curve else None


def spearman_brown(icc: float, k: int) -> float:
    """The reliability of a mean of ``k`` seeds whose single-seed reliability is ``icc``: k·ICC / (1 + (k − 1)·ICC)."""
    return k * icc / (1 + (k - 1) * icc)


def rho_ceiling(icc: float, k: int) -> float:
    """A perfect predictor's expected correlation with the mean of ``k`` reference seeds whose single-seed
    reliability is ``icc``: the square root of ``spearman_brown``."""
    return float(np.sqrt(max(0.0, spearman_brown(icc, k)))) if icc > -1 / (k - 1) else float("nan")


def _reliability_lines(
    reference: dict[str, dict[int, dict[str, Any]]], complete: list[str], ref_seeds: list[int]
) -> list[str]:
    """How well the reference repeats itself over seeds, per score: which part of it a predictor can hope to rank.
    The ceiling: ``rho_ceiling``."""
    k = len(ref_seeds)
    lines = [
        f"| reference score | ρ(seed 0, seed 1) | ICC(1) | ceiling of a predictor's ρ against the mean of {k} seeds |",
        "|---|---|---|---|",
    ]
    for key in REFERENCE_SCORES:
        matrix = np.array([[_reference_score(reference[h][s]["metrics"], key) for s in ref_seeds] for h in complete])
        icc = icc1(matrix)
        ceiling = rho_ceiling(icc, k)
        rho = spearmanr(matrix[:, 0], matrix[:, 1]).statistic
        lines.append(f"| {key} | {rho:.3f} | {icc:.3f} | {ceiling:.2f} |")
    return [*lines, ""]


def _per_seed_section(
    work: Path, hashes: list[str], reference: dict[str, dict[int, dict[str, Any]]], ref_seeds: list[int]
) -> list[str]:
    """Spearman ρ of each single seed of each training predictor against each single reference seed. A predictor
    trained at the reference's width from the same seed starts from the reference run's initial weights; if its
    ρ is high only against the reference run of its own seed, it measures that shared initialisation, not the
    architecture."""
    both = [h for h in hashes if all(s in reference[h] for s in ref_seeds)]
    if len(ref_seeds) < 2 or len(both) < 5:
        return []
    lines = [
        "",
        "## Each seed against each reference seed",
        "",
        f"Spearman ρ over the {len(both)} architectures with every reference seed; row: predictor seed, column: "
        "reference seed. A high ρ on the diagonal only (same seed) is shared initialisation, not fidelity.",
        "",
        "| predictor | seed | " + " | ".join(f"ρ vs reference seed {s}" for s in ref_seeds) + " |",
        "|---|---|" + "---|" * len(ref_seeds),
    ]
    for name, predictor in sorted(_predictors(_load_scores(work)).items()):
        if name.startswith("zero-cost") or ":" in name:
            continue
        for seed in sorted({s for v in predictor["values"].values() for s in v}):
            archs = [h for h in both if seed in predictor["values"].get(h, {})]
            if len(archs) < len(both):
                continue
            scores = [predictor["values"][h][seed] for h in archs]
            cells = [
                spearmanr(scores, [reference[h][r]["metrics"]["dice_mean"] for h in archs]).statistic for r in ref_seeds
            ]
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return lines


# what ``report`` says of the full width: one pointer, the runs and their ranking live in full_width_report
FULL_WIDTH_POINTER = [
    "",
    "## Reduced width against full width",
    "",
    "Every full-width run, its seed agreement and every predictor ranked against it: "
    "[fidelity-full-width.md](fidelity-full-width.md) (`python benchmarks/fidelity.py full-width-report --work W`).",
]


def report(work: Path) -> None:
    members = panel()
    reference = load_reference(work)
    hashes = [m["config"].hash for m in members if m["config"].hash in reference]
    names = {m["config"].hash: m["name"] for m in members}
    ref_val = {h: float(np.mean([r["metrics"]["dice_mean"] for r in reference[h].values()])) for h in hashes}
    ref_test = {h: float(np.mean([r["metrics"]["test_dice_mean"] for r in reference[h].values()])) for h in hashes}
    ref_seeds = sorted({s for h in hashes for s in reference[h]})
    complete = [h for h in hashes if len(reference[h]) == len(ref_seeds)]
    lines = [
        "# Fidelity table (generated by `python benchmarks/fidelity.py report`)",
        "",
        f"Load average at report time: {os.getloadavg()[0]:.1f}. Reference: {len(hashes)} architectures, "
        f"seeds {ref_seeds} ({len(complete)} with every seed).",
        "",
    ]

    # the reference itself: seed agreement (the ceiling of any predictor's rank agreement) and flattening
    if len(ref_seeds) >= 2 and len(complete) >= 3:
        matrix = np.array([[reference[h][s]["metrics"]["dice_mean"] for s in ref_seeds] for h in complete])
        rho_seeds = spearmanr(matrix[:, 0], matrix[:, 1]).statistic
        lines += _reliability_lines(reference, complete, ref_seeds)
        lines += [
            f"Reference seed 0 vs seed 1: Spearman ρ = {rho_seeds:.3f} over {len(complete)} architectures; "
            f"ICC(1) = {icc1(matrix):.3f}; seed SD {np.sqrt(((matrix - matrix.mean(1, keepdims=True)) ** 2).sum() / (len(complete) * (len(ref_seeds) - 1))):.4f}, "  # noqa: E501
            f"SD of architecture means {matrix.mean(1).std(ddof=1):.4f}.",
            "",
        ]
    lines += [
        "## Reference per architecture",
        "",
        "| architecture | params | MACs (G) | val Dice (mean of seeds) | test Dice | CSF | GM | WM | "
        f"Δ val Dice, last {REF_EPOCHS // 4} epochs | s / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in members:
        h = m["config"].hash
        if h not in reference:
            continue
        runs = list(reference[h].values())
        per_class = [np.mean([r["metrics"][f"dice_{c}"] for r in runs]) for c in ("csf", "gm", "wm")]
        drift = np.mean([curve_drift(r) for r in runs])
        each = ", ".join(f"{r['metrics']['dice_mean']:.4f}" for r in runs)
        lines.append(
            f"| {m['name']} | {m['params']:,} | {m['macs'] / 1e9:.2f} | {ref_val[h]:.4f} "
            f"({each}) | {ref_test[h]:.4f} | "
            f"{per_class[0]:.3f} | {per_class[1]:.3f} | {per_class[2]:.3f} | {drift:+.4f} | "
            f"{np.mean([r['wall_s'] for r in runs]):.0f} |"
        )

    rows = []
    baselines = {
        "params": {m["config"].hash: m["params"] for m in members},
        "MACs": {m["config"].hash: m["macs"] for m in members},
    }

    ref_gmwm = {
        h: float(np.mean([_reference_score(r["metrics"], "gm+wm") for r in reference[h].values()])) for h in hashes
    }

    def row(name: str, archs: list[str], scores: list[float], icc: float, seeds: int, seconds: float) -> tuple:
        """One table row: the predictor's scores on ``archs`` against the reference (val, test, and GM+WM on both:
        the part of the reference that repeats over seeds)."""
        return (
            name,
            len(archs),
            spearmanr(scores, [ref_val[h] for h in archs]).statistic,
            kendalltau(scores, [ref_val[h] for h in archs]).statistic,
            spearmanr(scores, [ref_test[h] for h in archs]).statistic,
            spearmanr(scores, [ref_gmwm[h] for h in archs]).statistic,
            icc,
            seeds,
            seconds,
        )

    for name, values in baselines.items():
        rows.append(row(name, hashes, [values[h] for h in hashes], 1.0, 0, 0.0))
    for name, predictor in sorted(_predictors(_load_scores(work)).items()):
        seeds = sorted({s for v in predictor["values"].values() for s in v})
        # a measurement still under way: the seeds every panel architecture has, when there is one
        whole = [s for s in seeds if all(s in predictor["values"].get(h, {}) for h in hashes)]
        seeds = whole or seeds
        common = [h for h in hashes if h in predictor["values"] and all(s in predictor["values"][h] for s in seeds)]
        if len(common) < 3:
            continue
        matrix = np.array([[predictor["values"][h][s] for s in seeds] for h in common], dtype=float)
        matrix[~np.isfinite(matrix)] = np.nanmin(matrix[np.isfinite(matrix)]) if np.isfinite(matrix).any() else 0
        rows.append(row(name, common, list(matrix.mean(axis=1)), icc1(matrix), len(seeds), predictor["seconds"]))
    lines += [
        "",
        "## Predictors against the reference",
        "",
        "ρ, τ: Spearman and Kendall rank correlation of the predictor's mean over seeds with the reference "
        "validation Dice (ρ test: with the reference test Dice). ICC(1) over the predictor's seeds. Seconds "
        "per architecture per seed, one thread, under the load given above (zero-cost: all five proxies "
        "share one record; the time shown is per proxy).",
        "",
        "| predictor | archs | ρ val | τ val | ρ test | ρ GM+WM | ICC(1) | seeds | s / arch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, rho, tau, rho_test, rho_gmwm, icc, k, seconds in rows:
        lines.append(
            f"| {name} | {n} | {rho:.3f} | {tau:.3f} | {rho_test:.3f} | {rho_gmwm:.3f} | {icc:.3f} | {k or '—'} "
            f"| {seconds:.1f} |"
        )
    lines += _per_seed_section(work, hashes, reference, ref_seeds)
    lines += FULL_WIDTH_POINTER
    extra = _extra_reference(work)
    presets = {m["name"]: m["config"].hash for m in members if m["name"] in PRESET_NAMES}
    presets = {name: h for name, h in presets.items() if h in ref_val}
    if extra:
        lines += [
            "",
            "## A search's knee and neighbours against the presets, on the reference protocol",
            "",
            "Architectures outside the panel (`fidelity.py reference-extra --config …`), trained exactly as the "
            "reference; Δ: their validation Dice minus each preset's (mean over seeds).",
            "",
            "| architecture | hash | params | seeds | val Dice | test Dice | "
            + " | ".join(f"Δ vs {p} ({ref_val[h]:.4f})" for p, h in presets.items())
            + " |",
            "|---|---|---|---|---|---|" + "---|" * len(presets),
        ]
        for item in extra:
            lines.append(
                f"| {item['name']} | {item['hash']} | {item['params']:,} | {item['seeds']} | {item['val']:.4f} "
                f"| {item['test']:.4f} | "
                + " | ".join(f"{item['val'] - ref_val[h]:+.4f}" for h in presets.values())
                + " |"
            )
    write_text_atomic(DOCS / "fidelity-table.md", "\n".join(lines) + "\n")
    dump = {
        "reference": {names[h]: {"hash": h, "val": ref_val[h], "test": ref_test[h]} for h in hashes},
        "extra_reference": extra,
        # every evaluator run of W/scores, so a machine without W can restore it (fidelity.py restore)
        "raw_scores": merged_raw_scores(
            work, json.loads(SCORES_JSON.read_text()).get("raw_scores", {}) if SCORES_JSON.exists() else {}
        ),
        "predictors": [
            dict(zip(("name", "archs", "rho_val", "tau_val", "rho_test", "rho_gmwm", "icc1", "seeds", "seconds"), row))
            for row in rows
        ],
    }
    write_text_atomic(SCORES_JSON, json.dumps(dump, indent=1) + "\n")
    print("\n".join(lines))


def full_width_report(work: Path) -> None:
    """docs/benchmarks/fidelity-full-width.md: every full-width reference run (``W/reference-full`` merged into
    the archive ``fidelity-full-width.json``), per class, beside the width-0.25 reference; whether the full-width
    protocol repeats itself over seeds (ICC(1), seed SD against the SD between architectures) and whether the
    two widths order the architectures alike."""
    from fidelity import archive_full_width, full_width_runs

    archive_full_width(work)
    archive_scores(work)
    every_run = full_width_runs(include_gpu=True)
    runs = full_width_runs()
    reduced = {
        row["hash"]: float(np.mean([r["metrics"]["dice_mean"] for r in row["runs"]]))
        for row in json.loads((DOCS / "fidelity-reference.json").read_text())["panel"]
        if row["runs"]
    }
    members = [m for m in panel() if m["config"].hash in runs]
    lines = [
        "# The reference protocol at full width (generated by `python benchmarks/fidelity.py full-width-report`)",
        "",
        "Each run: the architecture at width 1 (the network the search prices), trained with the reference protocol "
        "of fidelity.md (8 epochs × 128 random 32³ patches, batch 4, AdamW 2·10⁻³, one-cycle), one torch thread. "
        "Raw runs with their curves: [fidelity-full-width.json](fidelity-full-width.json). A GPU run's s / run is "
        'with the other runs of its call sharing the card (fidelity.md, "A lent GPU for the reference"). '
        f"Load average at report time: {os.getloadavg()[0]:.1f}.",
        "",
        "| architecture | params | MACs | seed | val Dice | CSF | GM | WM | test Dice | "
        f"Δ val Dice, last {REF_EPOCHS // 4} epochs | s / run | ran on | val Dice at width 0.25 (mean of seeds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: float | None, form: str = ".4f") -> str:
        return "—" if value is None else format(value, form)

    for m in members:
        for seed, r in sorted(every_run[m["config"].hash].items()):
            x = r["metrics"]
            lines.append(
                f"| {m['name']}{'¹' if r.get('source') else ''} | {m['params']:,} | {m['macs'] / 1e9:.2f}G | {seed} | "
                f"{x['dice_mean']:.4f} | {cell(x.get('dice_csf'))} | {cell(x.get('dice_gm'))} | "
                f"{cell(x.get('dice_wm'))} | {x['test_dice_mean']:.4f} | "
                f"{cell(curve_drift(r), '+.4f')} | {cell(r.get('wall_s'), '.0f')} | {ran_on(r)} | "
                f"{reduced.get(m['config'].hash, float('nan')):.4f} |"
            )
    sources = sorted({r["source"] for h in runs for r in runs[h].values() if r.get("source")})
    if sources:
        lines += ["", "¹ no run file; the scores come from " + "; ".join(sources) + "."]
    lines += _repeatability(members, runs)
    lines += _gpu_check(members, every_run)
    lines += _full_width_ranking(members, runs, reduced)
    write_text_atomic(DOCS / "fidelity-full-width.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def ran_on(run: dict[str, Any]) -> str:
    """Where a reference run trained, in words: runs archived before the field existed ran on this project's
    2-core CPU machines."""
    return "CPU (2 cores)" if ran_on_cpu(run) else run["device"]


def _repeatability(members: list[dict[str, Any]], runs: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """ICC(1), the two SDs and the ceiling they put on any predictor's ρ: over the seeds every architecture has,
    and, where some have more, over all seeds for the architectures that have every one."""
    by_hash = {m["config"].hash: set(runs[m["config"].hash]) for m in members}
    common = sorted(set.intersection(*by_hash.values())) if by_hash else []
    every = sorted(set.union(*by_hash.values())) if by_hash else []
    groups = []
    for seeds in (common, every) if every != common else (common,):
        rows = [m for m in members if set(seeds) <= by_hash[m["config"].hash]]
        if len(seeds) >= 2 and len(rows) >= 3:
            groups.append((seeds, rows))
    if not groups:
        return []
    lines = [
        "",
        "**Does it repeat itself?** Over the seeds every architecture has"
        + (", and over every seed for the architectures that have them all" if len(groups) > 1 else "")
        + ":",
        "",
        "| score | seeds | ICC(1) | seed-to-seed SD | SD of the architecture means | ρ(first two seeds) | "
        "ceiling of a predictor's ρ against the mean of those seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for seeds, complete in groups:
        # per class only over the architectures whose every run kept its classes
        have = [m for m in complete if all("dice_gm" in r["metrics"] for r in runs[m["config"].hash].values())]
        for key in REFERENCE_SCORES:
            rows = complete if key in ("dice_mean", "test_dice_mean") else have
            if len(rows) < 3:
                continue
            matrix = np.array(
                [[_reference_score(runs[m["config"].hash][s]["metrics"], key) for s in seeds] for m in rows]
            )
            within = float(np.sqrt(matrix.var(axis=1, ddof=1).mean()))
            between = float(matrix.mean(axis=1).std(ddof=1))
            rho = spearmanr(matrix[:, 0], matrix[:, 1]).statistic
            icc = icc1(matrix)
            lines.append(
                f"| {key} ({len(rows)} archs) | {seeds} | {icc:.3f} | {within:.4f} | {between:.4f} | {rho:.3f} | "
                f"{rho_ceiling(icc, len(seeds)):.2f} |"
            )
    return lines


def _gpu_check(members: list[dict[str, Any]], runs: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Do the runs trained on a GPU score like the CPU runs? Each GPU run against what its architecture's CPU runs
    predict for a new seed: their mean shrunk towards the mean of every CPU run by the reliability of a mean of
    that many seeds (an architecture whose two CPU seeds were unlucky is expected to score higher on a third);
    averaged, with its standard error. The reference pools them only if that is noise."""
    cpu = {
        m["config"].hash: [r["metrics"]["dice_mean"] for r in runs[m["config"].hash].values() if ran_on_cpu(r)]
        for m in members
    }
    complete = [scores for scores in cpu.values() if len(scores) >= 2]
    if len(complete) < 3:
        return []
    k = min(len(scores) for scores in complete)
    icc = icc1(np.array([scores[:k] for scores in complete]))
    reliability = spearman_brown(icc, k)
    grand = float(np.mean([np.mean(scores) for scores in complete]))
    residuals, names = [], set()
    for m in members:
        h = m["config"].hash
        for r in runs[h].values():
            if not ran_on_cpu(r) and len(cpu[h]) >= 2:
                expected = grand + reliability * (float(np.mean(cpu[h])) - grand)
                residuals.append(r["metrics"]["dice_mean"] - expected)
                names.add(m["name"])
    if len(residuals) < 2:
        return []
    mean, se = float(np.mean(residuals)), float(np.std(residuals, ddof=1) / np.sqrt(len(residuals)))
    return [
        "",
        f"**GPU runs against the CPU runs.** {len(residuals)} runs of {len(names)} architectures trained on a GPU "
        "(float32, TF32 off), each minus what its architecture's CPU runs predict for a new seed (their mean, "
        f"shrunk towards the mean of all CPU runs, {grand:.4f}, by the reliability {reliability:.2f} of a mean of "
        f"{k} seeds at ICC {icc:.2f}): mean {mean:+.4f} Dice, standard error {se:.4f} "
        f"({abs(mean) / se if se else float('inf'):.1f} standard errors from 0). "
        + (
            "Not noise at this size, and as large as the differences between architectures: the GPU runs are "
            "shown above but left out of the repeatability and the ranking below, which use the CPU runs alone."
            if abs(mean) > 2 * se
            else "Within noise; the repeatability and the ranking below still use the CPU runs alone."
        ),
    ]


DEFAULT_RUNG = "train-today"  # the predictor that is the default search's own score (fidelity.EVALUATORS)
BOOTSTRAP = 2000  # resamples of the architectures for the intervals of the full-width ranking


def partial_rho(x: list[float], y: list[float], z: list[float]) -> float:
    """Spearman ρ of ``x`` and ``y`` with ``z`` held fixed (the partial rank correlation): what ``x`` knows of
    ``y`` beyond what ``z`` (the parameter count) already says."""
    r_xy, r_xz, r_yz = (spearmanr(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
    denominator = np.sqrt((1 - r_xz**2) * (1 - r_yz**2))
    return float((r_xy - r_xz * r_yz) / denominator) if denominator > 1e-12 else float("nan")


def _bootstrap(
    values: list[float], target: list[float], rivals: list[list[float]], seed: int = 0
) -> tuple[float, float, list[float]]:
    """Over ``BOOTSTRAP`` resamples of the architectures: the 5% and 95% quantiles of ρ(values, target), and for
    each of ``rivals`` (other predictors' values on the same architectures) the share of resamples in which
    ``values`` ranks ``target`` better than that rival does."""
    rng = np.random.default_rng(seed)
    v, t = np.asarray(values, dtype=float), np.asarray(target, dtype=float)
    others = [np.asarray(r, dtype=float) for r in rivals]
    rhos, wins = [], []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(v), len(v))
        if len(set(t[pick])) < 3:
            continue
        rho = spearmanr(v[pick], t[pick]).statistic
        rival_rhos = [spearmanr(r[pick], t[pick]).statistic for r in others]
        if np.isfinite(rho) and all(np.isfinite(rival_rhos)):
            rhos.append(rho)
            wins.append([rho > r for r in rival_rhos])
    return float(np.quantile(rhos, 0.05)), float(np.quantile(rhos, 0.95)), np.mean(wins, axis=0).tolist()


def _full_width_ranking(
    members: list[dict[str, Any]], runs: dict[str, dict[int, dict[str, Any]]], reduced: dict[str, float]
) -> list[str]:
    """Every predictor against the full-width validation Dice (mean of the seeds run): ρ with a bootstrap
    interval, τ, ρ with the parameter count held fixed, and how often it beats the parameter count. Evaluator
    scores come from the archive (``raw_scores``, merged with ``W/scores`` by ``archive_scores``)."""
    if len(members) < 3:
        return []
    full = {
        m["config"].hash: float(np.mean([r["metrics"]["dice_mean"] for r in runs[m["config"].hash].values()]))
        for m in members
    }
    seeds_per_arch = sorted({len(runs[h]) for h in full})
    rows: list[tuple[str, list[dict[str, Any]], list[float]]] = [
        ("parameter count", members, [m["params"] for m in members]),
        ("MACs", members, [m["macs"] for m in members]),
    ]
    with_reduced = [m for m in members if m["config"].hash in reduced]
    rows.append(
        ("width-0.25 reference (mean of 2 seeds)", with_reduced, [reduced[m["config"].hash] for m in with_reduced])
    )
    archived = json.loads(SCORES_JSON.read_text()).get("raw_scores", {}) if SCORES_JSON.exists() else {}
    rung: dict[str, float] = {}  # the default search's own score, the rival every other predictor must beat
    iccs: dict[str, str] = {}  # a predictor's own seed agreement, where every architecture has the same ≥ 2 seeds
    for name, predictor in sorted(_predictors(archived).items()):
        scored = [m for m in members if m["config"].hash in predictor["values"]]
        seeds_run = sorted({int(s) for m in scored for s in predictor["values"][m["config"].hash]})
        means = [float(np.mean(list(predictor["values"][m["config"].hash].values()))) for m in scored]
        label = f"{name} (mean of seeds {seeds_run})"
        rows.append((label, scored, means))
        per_seed = [predictor["values"][m["config"].hash] for m in scored]
        if len(seeds_run) >= 2 and all(len(v) == len(seeds_run) for v in per_seed):
            iccs[label] = f"{icc1(np.array([[v[s] for s in sorted(v)] for v in per_seed])):.2f}"
        if name == DEFAULT_RUNG:
            rung = {m["config"].hash: mean for m, mean in zip(scored, means)}
    lines = [
        "",
        f"**Against the full-width validation Dice** (the mean of the seeds run: "
        f"{' or '.join(str(k) for k in seeds_per_arch)} per architecture), {len(members)} architectures. "
        f"Interval: 5–95% of ρ over {BOOTSTRAP:,} bootstrap resamples of the architectures. Partial ρ: with "
        "the parameter count held fixed, what the predictor knows beyond the network's size (0: nothing). "
        "P(> params), P(> rung): the share of resamples in which it ranks better than the parameter count, than "
        f"the default search's own score ({DEFAULT_RUNG}). Evaluators: every run archived in fidelity-scores.json "
        "(`raw_scores`).",
        "",
        "| predictor | archs | Spearman ρ | 90% interval | Kendall τ | partial ρ given params | P(> params) "
        "| P(> rung) | ICC(1) over its seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, scored, values in rows:
        if len(scored) < 3:
            continue
        target = [full[m["config"].hash] for m in scored]
        params = [m["params"] for m in scored]
        rho, tau = spearmanr(values, target).statistic, kendalltau(values, target).statistic
        rival_rung = [rung.get(m["config"].hash) for m in scored]
        against_rung = not name.startswith(DEFAULT_RUNG) and None not in rival_rung
        low, high, wins = _bootstrap(values, target, [params, rival_rung] if against_rung else [params])
        partial = "—" if name == "parameter count" else f"{partial_rho(values, target, params):.3f}"
        beats = "—" if name == "parameter count" else f"{wins[0]:.2f}"
        beats_rung = f"{wins[1]:.2f}" if against_rung else "—"
        lines.append(
            f"| {name} | {len(scored)} | {rho:.3f} | {low:.2f} … {high:.2f} | {tau:.3f} | {partial} | {beats} "
            f"| {beats_rung} | {iccs.get(name, '—')} |"
        )
    return lines


# (patch side, width multiplier of the network scored, the batch in words): the screen scores each architecture's
# copy at that width (``nets.budget.with_width``: the same choices), its costs staying the full network's
SCREEN_SETTINGS = (
    (32, 1.0, "the task's input, 32³"),
    (16, 1.0, "16³ (IBSR's screen_data_options)"),
    (16, 0.5, "16³, the network at width 0.5"),
    (16, 0.25, "16³, the network at width 0.25 (IBSR's quick screen)"),
)
SCREEN_PROXIES = ("grad_norm", "zico")
SCREEN_JSON = DOCS / "fidelity-screen.json"


def screen_check(seeds: tuple[int, ...], threads: int = 2) -> None:
    """docs/benchmarks/fidelity-screen.md: what the pre-screen (``psc_nas.search.prescreen``) would rank the panel
    by, against the full-width reference: each proxy on batches of 4 patches of each side in ``SCREEN_SETTINGS``
    (the screen's own batch and scorer), of the network at each width there, alone and as ``PROXY+macs`` (its rank
    plus the full network's MAC count's rank, the screen's ``ranks_with_macs``), beside the bare MAC count; a
    reduced width's scores also against the same proxy's at width 1. ``threads``: torch threads, as psc-search uses."""
    import time

    import torch
    from fidelity import TASK, full_width_runs

    from psc_nas.evaluators.zero_cost import proxy_score, training_batch
    from psc_nas.memory import keep_freed_memory
    from psc_nas.search.prescreen import Prescreen, ranks_with_macs
    from psc_nas.tasks import get_task

    keep_freed_memory()
    torch.set_num_threads(threads)
    task = get_task(TASK)
    members = panel()
    runs = full_width_runs()
    hashes = [m["config"].hash for m in members]
    target = [float(np.mean([r["metrics"]["dice_mean"] for r in runs[h].values()])) for h in hashes]
    macs = [m["macs"] for m in members]
    params = [m["params"] for m in members]
    started_load = os.getloadavg()[0]
    results: dict[str, Any] = {}
    for side, width, words in SCREEN_SETTINGS:
        for proxy in SCREEN_PROXIES:
            scored = Prescreen(proxy, width=width).scored  # the screen's own width rule
            scores = np.zeros((len(members), len(seeds)))
            clock = time.perf_counter()
            for j, seed in enumerate(seeds):
                batch = training_batch(task, seed=seed, patch_size=(side,) * 3)
                for i, m in enumerate(members):
                    scores[i, j] = proxy_score(proxy, scored(m["config"]), task, seed=seed, batch=batch)
            seconds = (time.perf_counter() - clock) / scores.size
            mean = scores.mean(axis=1).tolist()
            full = results.get(f"{proxy}@{side}")
            results[f"{proxy}@{side}" + ("" if width == 1 else f"w{width}")] = {
                "proxy": proxy,
                "side": side,
                "width": width,
                # Spearman, per seed, with the same proxy of the network at width 1 on the same batch
                "agreement": None
                if full is None or width == 1
                else [
                    spearmanr(scores[:, j], [full["scores"][h][j] for h in hashes]).statistic for j in range(len(seeds))
                ],
                "batch": words,
                "s_per_arch": seconds,
                "scores": {h: scores[i].tolist() for i, h in enumerate(hashes)},
                "icc1": icc1(scores),
                "rho_per_seed": [spearmanr(scores[:, j], target).statistic for j in range(len(seeds))],
                # what a screen uses: one seed's proxy, combined with the MAC count
                "rho_per_seed_macs": [
                    spearmanr(ranks_with_macs(scores[:, j].tolist(), macs), target).statistic for j in range(len(seeds))
                ],
                "rows": {proxy: mean, f"{proxy}+macs": ranks_with_macs(mean, macs)},
            }
            print(f"{proxy} at {side}³, width {width}: {seconds:.2f} s per architecture", flush=True)
    lines = [
        "# The pre-screen's score against the full-width reference "
        "(generated by `python benchmarks/fidelity.py screen`)",
        "",
        f"{len(members)} panel architectures; target: the full-width reference's validation Dice (mean of the seeds "
        "run, fidelity-full-width.json). Each proxy is computed as `psc-search --prescreen` computes it (the "
        f"network at initialisation from the seed, one batch of 4 training patches from the same seed), seeds "
        f"{list(seeds)}, {threads} torch threads; its score is the mean over the seeds. `+macs`: the proxy's rank "
        "plus the MAC count's rank among the 16 (in a search: among the architectures screened). Interval: 5–95% "
        f"of ρ over {BOOTSTRAP:,} bootstrap resamples of the architectures; P(> MACs): the share of resamples in "
        f"which it ranks better than the MAC count alone. Width: the network scored is the architecture at that "
        "width multiplier (the same choices; its MAC count in `+macs` stays the full network's); agreement: Spearman, "
        "per seed, of its proxy with the same proxy of the full-width network on the same batch. Load average "
        f"{started_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| score | patches | width | Spearman ρ | 90% interval | ρ per seed | ICC(1) over seeds | partial ρ given MACs "
        "| P(> MACs) | agreement with width 1 | s / arch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    low, high, _ = _bootstrap(macs, target, [params])
    lines.append(
        f"| MAC count (free) | — | — | {spearmanr(macs, target).statistic:.3f} | {low:.2f} … {high:.2f} | — | — | — "
        "| — | — | 0 |"
    )
    for result in results.values():
        for name, values in result["rows"].items():
            low, high, wins = _bootstrap(values, target, [macs])
            combined = name.endswith("+macs")
            per_seed = result["rho_per_seed_macs" if combined else "rho_per_seed"]
            agreement = result.get("agreement")
            lines.append(
                f"| {name} | {result['side']}³ | {result.get('width', 1.0):g} "
                f"| {spearmanr(values, target).statistic:.3f} | {low:.2f} … {high:.2f} "
                f"| {' / '.join(f'{r:.2f}' for r in per_seed)} "
                f"| {'—' if combined else format(result['icc1'], '.2f')} "
                f"| {'—' if combined else format(partial_rho(values, target, macs), '.3f')} "
                f"| {wins[0]:.2f} | {'—' if combined or not agreement else ' / '.join(f'{a:.2f}' for a in agreement)} "
                f"| {result['s_per_arch']:.2f} |"
            )
    write_text_atomic(SCREEN_JSON, json.dumps({"seeds": list(seeds), "threads": threads, "results": results}) + "\n")
    write_text_atomic(DOCS / "fidelity-screen.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def knee_report(work: Path) -> None:
    """docs/benchmarks/fidelity-knee.md: architectures a search handed the user (its best.yaml, the retrained
    front), trained on the reference protocol at full width, against the hand-designed presets that fit the budget
    (the panel's full-width runs): does the search's answer beat every preset, and by how much not?"""
    from fidelity import KNEE_JSON, TASK, archive_runs, extra_dir, full_width_runs

    from psc_nas import cost
    from psc_nas.arch import ArchConfig
    from psc_nas.tasks import get_task

    spatial = tuple(get_task(TASK).input_shape[1:])
    # the full-width reference-extra runs, archived with their architectures (fidelity.py restore rebuilds W)
    extra = archive_runs(
        KNEE_JSON,
        extra_dir(work, 1.0),
        "python benchmarks/fidelity.py reference-extra --width 1 --config RUN/best.yaml ... --seeds 0 1 --jobs 2 "
        "--work W && python benchmarks/fidelity.py knee-report --work W",
        with_config=True,
    )
    fw = full_width_runs()
    rows: list[dict[str, Any]] = []
    for m in panel():
        if m["name"] in PRESET_NAMES and m["config"].hash in fw:
            rows.append({"name": m["name"], "params": m["params"], "macs": m["macs"], "runs": fw[m["config"].hash]})
    presets = list(rows)
    by_hash: dict[str, dict[int, dict[str, Any]]] = {}
    for record in extra:
        by_hash.setdefault(record["hash"], {})[record["seed"]] = record
    for h, runs in by_hash.items():
        price = cost(ArchConfig.from_json(next(iter(runs.values()))["config"]), spatial)
        name = next(iter(runs.values()))["name"]
        rows.append({"name": name, "params": price.params, "macs": price.macs, "runs": runs, "hash": h})
    for row in rows:
        vals = [r["metrics"]["dice_mean"] for r in row["runs"].values()]
        row["val"] = float(np.mean(vals))
        row["test"] = float(np.mean([r["metrics"]["test_dice_mean"] for r in row["runs"].values()]))
        row["per_seed"] = " / ".join(f"{row['runs'][s]['metrics']['dice_mean']:.4f}" for s in sorted(row["runs"]))
    seed_sd = float(
        np.sqrt(
            np.mean(
                [
                    np.var([r["metrics"]["dice_mean"] for r in runs.values()], ddof=1)
                    for runs in list(fw.values()) + list(by_hash.values())
                    if len(runs) >= 2
                ]
            )
        )
    )
    lines = [
        "# A search's answer against the presets, at full width (generated by "
        "`python benchmarks/fidelity.py knee-report`)",
        "",
        "Each architecture trained on fidelity.md's reference protocol at width 1 (8 epochs × 128 random 32³ "
        "patches, batch 4, AdamW 2·10⁻³, one-cycle, one torch thread), validation Dice on the 2 validation volumes "
        "(mean of CSF/GM/WM), test Dice on the 5 test volumes; val Dice per seed, then the mean. The presets' runs "
        "are the panel's ([fidelity-full-width.md](fidelity-full-width.md)); the others' are in "
        f"[fidelity-knee.json](fidelity-knee.json). Seed-to-seed SD of the val Dice, pooled over every architecture "
        f"with two seeds here: **{seed_sd:.4f}**, which is also the SD of a difference between two 2-seed means "
        "(a Δ below about twice it is within the seeds' noise).",
        "",
        "| architecture | params | MACs | val Dice per seed | val Dice (mean) | test Dice (mean) | "
        + " | ".join(f"Δ val vs {p['name']}" for p in presets)
        + " | dominated by a preset (fewer params, higher val)? |",
        "|---|---|---|---|---|---|" + "---|" * len(presets) + "---|",
    ]
    for row in rows:
        dominators = [
            p["name"] for p in presets if p is not row and p["params"] <= row["params"] and p["val"] > row["val"]
        ]
        lines.append(
            f"| {row['name']} | {row['params']:,} | {row['macs'] / 1e9:.2f}G | {row['per_seed']} | {row['val']:.4f} "
            f"| {row['test']:.4f} | "
            + " | ".join("—" if p is row else f"{row['val'] - p['val']:+.4f}" for p in presets)
            + f" | {', '.join(dominators) or 'no'} |"
        )
    write_text_atomic(DOCS / "fidelity-knee.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


# The default run's retraining at its cap (32 epochs x 32 patches = the reference's 256 steps) with the optimiser it
# had (first) and the reference protocol's (second): fidelity.py measure <variant> --names csn_ip csn_ir.
RECIPE_VARIANTS = ("retrain-quick-32-adam1e-3", "retrain-quick-32-adamw2e-3")


def recipe_report(work: Path) -> None:
    """docs/benchmarks/fidelity-retrain-recipe.md: the two retraining optimisers of ``RECIPE_VARIANTS`` on the same
    architectures and seeds (a seed fixes the initial weights and the patches, so each pair differs only in the
    optimiser): per run, the paired differences, each recipe's seed spread, beside the full-width reference."""
    from fidelity import full_width_runs

    archive_scores(work)
    raw = json.loads(SCORES_JSON.read_text())["raw_scores"]
    before, after = (raw.get(v, {}) for v in RECIPE_VARIANTS)
    names = {m["config"].hash: m["name"] for m in panel()}
    reference = full_width_runs()
    lines = [
        "# The retraining's optimiser (generated by `python benchmarks/fidelity.py recipe-report`)",
        "",
        "The quick profile's retraining at its cap, 32 epochs × 32 random 32³ patches at batch 4 (256 steps, "
        f"one-cycle, full width, one torch thread), with `{RECIPE_VARIANTS[0]}` (Adam, lr 10⁻³, no weight decay) and "
        f"`{RECIPE_VARIANTS[1]}` (AdamW, lr 2·10⁻³, weight decay 10⁻⁴: the fidelity reference protocol's optimiser). "
        "The same seed gives both the same initial weights and the same patches. Validation Dice on the 2 validation "
        f"volumes. Load average at report time: {os.getloadavg()[0]:.1f}.",
        "",
        "| architecture | seed | Adam 10⁻³ | AdamW 2·10⁻³ | Δ | CSF (Adam → AdamW) | s / run (Adam, AdamW) |",
        "|---|---|---|---|---|---|---|",
    ]
    deltas: list[float] = []
    by_arch: dict[str, tuple[list[float], list[float]]] = {}
    for h in sorted(set(before) & set(after), key=lambda h: names.get(h, h)):
        for seed in sorted(set(before[h]) & set(after[h]), key=int):
            a, b = before[h][seed], after[h][seed]
            da, db = a["metrics"]["dice_mean"], b["metrics"]["dice_mean"]
            deltas.append(db - da)
            by_arch.setdefault(h, ([], []))[0].append(da)
            by_arch[h][1].append(db)
            lines.append(
                f"| {names.get(h, h)} | {seed} | {da:.4f} | {db:.4f} | {db - da:+.4f} | "
                f"{a['metrics']['dice_csf']:.4f} → {b['metrics']['dice_csf']:.4f} | "
                f"{a['wall_s']:.0f}, {b['wall_s']:.0f} |"
            )
    if not deltas:
        raise SystemExit(f"no architecture and seed scored by both {RECIPE_VARIANTS}")
    d = np.array(deltas)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    lines += [
        "",
        f"**Paired difference (AdamW 2·10⁻³ − Adam 10⁻³), {len(d)} pairs: mean {d.mean():+.4f}, "
        f"SD {d.std(ddof=1):.4f}, standard error {se:.4f}, range {d.min():+.4f} … {d.max():+.4f}; "
        f"higher in {int((d > 0).sum())} of {len(d)}.**",
        "",
        "| architecture | Adam 10⁻³: mean (seed SD) | AdamW 2·10⁻³: mean (seed SD) "
        "| full-width reference: mean of its CPU seeds |",
        "|---|---|---|---|",
    ]
    for h, (xa, xb) in by_arch.items():
        ref = [r["metrics"]["dice_mean"] for r in reference.get(h, {}).values()]
        lines.append(
            f"| {names.get(h, h)} | {np.mean(xa):.4f} ({np.std(xa, ddof=1):.4f}) | {np.mean(xb):.4f} "
            f"({np.std(xb, ddof=1):.4f}) | {np.mean(ref):.4f} ({len(ref)} seeds) |"
            if len(xa) > 1
            else f"| {names.get(h, h)} | {xa[0]:.4f} | {xb[0]:.4f} | {np.mean(ref):.4f} ({len(ref)} seeds) |"
        )
    write_text_atomic(DOCS / "fidelity-retrain-recipe.md", "\n".join(lines) + "\n")
    print("\n".join(lines))

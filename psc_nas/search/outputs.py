"""What a search leaves in runs/<name>/ besides the study: a table, the front, the knee config.

    trials.csv       one row per trial (pandas), every state: its decisions (one column per search
                     decision of the space), why it was queued (``preset``, ``prescreen``), its search
                     score and per-class metrics with their fidelity in words, the retrained score beside
                     it, its cost, times and why it failed; NaN wherever nothing was trained (over budget,
                     failed, not finished)
    pareto.json      the feasible front: objectives, the hypervolume with its reference point and
                     normalisation, knee, one entry per point (values, params, MACs, latency, fidelity),
                     what its fields mean, and a "retrained" section: the members trained again after
                     the search, their knee
    front/<n>.yaml   the config of every front trial n (ArchConfig.save)
    best.yaml        the retrained knee, or the search's knee before any retraining (``Front.best``)
    best.weights.pt  best.yaml's trained weights, when it was retrained (psc_nas.load_model(run folder))
    prescreen.csv    with ``--prescreen``: every architecture the zero-cost pre-screen scored, and which it queued
                     (written once, by psc_nas.search.prescreen; pareto.json's "prescreen" section sums it up)

Written from the study's records alone, whichever engine filled the study; rewritten after every
bracket, each file atomically, so a killed search leaves readable files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd
from optuna.trial import TrialState

from psc_nas.files import write_text_atomic
from psc_nas.ops.cakes import SHAPES
from psc_nas.search.front import Front, find_front, hypervolume_box
from psc_nas.search.record import COST_FIELDS, Objective, StudyRecord, TrialRecord
from psc_nas.weights import copy_weights

RETRAINED = "retrained_"  # prefix of the retrained scores' columns, beside the search's own

# What pareto.json's fields mean, written into it.
FIELDS = {
    "values": "the trial's objective values, in the order of `objectives`, as the search scored it (at `fidelity`)",
    "fidelity": (
        "how the search score in `values` was obtained, in words: the evaluator's budget for this architecture, "
        "e.g. '2 epochs × 8 samples' (trained from scratch that long, scored on the validation data) or "
        "'supernet, ...' (inherited weight-sharing weights, not trained on its own); scores at different "
        "fidelities are not comparable, and a cheap fidelity's score is lower than the network reaches"
    ),
    "retrained": (
        "the metrics of the same architecture trained again from scratch after the search, for longer "
        "(`retrained_fidelity` says how): the score a user of the network can expect"
    ),
    "metrics": "every metric of the evaluation `values` come from (per-class scores too), at `fidelity`",
    "params": "exact parameter count",
    "macs": "exact multiply-accumulates of one forward pass of one sample of size `input_shape` (C, D, H, W)",
    "latency_ms": "median forward time of one sample on the search's device, in ms; null where not measured "
    "(latency was not an objective)",
    "hypervolume": "see `hypervolume_definition`",
}


def trials_table(records: Sequence[TrialRecord], objectives: Sequence[Objective]) -> pd.DataFrame:
    """One row per trial; scores only where the trial was told them (COMPLETE), else NaN."""
    metric = objectives[0].name
    names = {o.name for o in objectives}
    per_class = [m for m in _ordered(r.metrics for r in records if _scored(r)) if m not in names]
    retrained_metrics = _ordered(r.retrained.metrics for r in records if r.retrained is not None)
    rows = []
    for record in records:
        scored = _scored(record)
        scores = record.metrics if scored else {}
        own = record.own_evaluations()  # reused results cost this trial nothing
        retrained = record.retrained
        row: dict[str, Any] = {
            "number": record.number,
            "state": record.state.name,
            "feasible": record.feasible,
            "over_budget": record.over_budget,
            "preset": record.preset,
            "prescreen": record.prescreen,  # why a pre-screen queued it (--prescreen), else empty
            "evaluator": record.result.evaluator if scored and record.result else None,
            "search_fidelity": record.fidelity.words if scored and record.fidelity else None,
        }
        for index, objective in enumerate(objectives):  # the search's scores, as told to Optuna
            if objective.name not in COST_FIELDS:  # costs: below, priced for every trial
                row[objective.name] = record.values[index] if record.values else math.nan
            if index == 0:  # the retrained score beside the search's, and how it was retrained
                row[RETRAINED + metric] = retrained.metrics.get(metric, math.nan) if retrained else math.nan
                row["retrained_fidelity"] = retrained.fidelity.words if retrained else None
        row.update({name: scores.get(name, math.nan) for name in per_class})
        row.update(
            {
                RETRAINED + name: retrained.metrics.get(name, math.nan) if retrained else math.nan
                for name in retrained_metrics
                if name != metric
            }
        )
        row.update(
            {
                "params": record.params,
                "macs": record.macs,
                "latency_ms": record.latency_ms,
                # seconds this trial spent training (a failed one: its fidelities before the failure); NaN for
                # one that trained nothing, 0 for one whose results were all reused from another trial
                "train_s": sum(e.wall_s for e in own) if record.evaluations else math.nan,
                "fwd_bwd_s": sum(e.fwd_bwd_s for e in own) if record.evaluations else math.nan,
                "val_forward_s": sum(e.val_forward_s for e in own) if record.evaluations else math.nan,
                "duration_s": record.duration_s,
                "completed_at": record.completed_at.isoformat(timespec="seconds") if record.completed_at else None,
                "fail_reason": record.fail_reason,
                "arch_hash": record.arch_hash,
                "summary": record.summary(),
            }
        )
        rows.append(row)
    return pd.concat([pd.DataFrame(rows, index=range(len(rows))), decision_columns(records)], axis=1)


def _scored(record: TrialRecord) -> bool:
    """Told its objective values: evaluated to the end (a failed, over-budget or unfinished trial is not)."""
    return record.state == TrialState.COMPLETE and record.values is not None and record.result is not None


def _ordered(dicts: Iterable[Mapping[str, Any]]) -> list[str]:
    """The keys of all ``dicts``, in order of first appearance."""
    return list(dict.fromkeys(key for d in dicts for key in d))


# -------------------------------------------------------------------------------------- decisions
_PER_M = re.compile(r"^(?P<head>.+)\.m\d+\.(?P<tail>[^.]+)$")  # PmSCn asks orientations per m: b3.pmscn.m2.orientations
_ALLOCATION = re.compile(r"^[0-9a-z]+=\d+(/\d+)?(,[0-9a-z]+=\d+(/\d+)?)*$")  # CAKES: 1x3x3=1/4,3x3x3=3/4


def decision_columns(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """The trials' search decisions as readable columns, one row per record, named by the space's own
    decision names (Optuna's parameters, ``<unit>.op``, ``<unit>.<op>.<argument>``): PmSCn's orientations,
    asked per m, are one column ``<unit>.pmscn.orientations``; a CAKES allocation is one column of
    channel fractions per shape, ``<unit>.cakes.<shape>`` (0 for a shape it leaves out). A decision not
    asked for a trial (its unit took another op, or it had one possible answer) is missing (NaN)."""
    rows: list[dict[str, Any]] = []
    shapes: dict[str, set[str]] = {}  # allocation prefix -> the shapes any trial gave channels
    for record in records:
        row: dict[str, Any] = {}
        for name, value in record.decisions.items():
            per_m = _PER_M.match(name)
            if per_m:
                name = f"{per_m['head']}.{per_m['tail']}"
            if name.endswith(".allocation") and isinstance(value, str) and _ALLOCATION.match(value):
                prefix = name[: -len(".allocation")]
                row[prefix] = {
                    shape: float(Fraction(share)) for shape, share in (p.split("=") for p in value.split(","))
                }
                shapes.setdefault(prefix, set()).update(row[prefix])
            else:
                row[name] = value
        rows.append(row)
    for row in rows:  # each allocation becomes its fractions, in the order of ops.cakes.SHAPES
        for prefix in [key for key in row if key in shapes]:
            fractions = row.pop(prefix)
            for shape in sorted(shapes[prefix], key=lambda s: (SHAPES.index(s) if s in SHAPES else len(SHAPES), s)):
                row[f"{prefix}.{shape}"] = fractions.get(shape, 0.0)
    return pd.DataFrame(rows, columns=_decision_order(rows), index=range(len(rows)))


def _decision_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Decision columns grouped by unit (in the order units were asked), its op first, then op by op,
    each op's arguments in one order for every unit."""
    seen = _ordered(rows)
    units = list(dict.fromkeys(name.split(".")[0] for name in seen))
    tails = list(dict.fromkeys(name.split(".", 1)[1] for name in seen))
    ops = list(dict.fromkeys(tail.split(".")[0] for tail in tails if "." in tail))

    def key(name: str) -> tuple[int, int, int, int]:
        unit, tail = name.split(".", 1)
        last = tail.rsplit(".", 1)[-1]  # a CAKES fraction's shape: in the order of ops.cakes.SHAPES
        within = SHAPES.index(last) if last in SHAPES else len(SHAPES) + tails.index(tail)
        return units.index(unit), tail != "op", ops.index(tail.split(".")[0]) if "." in tail else -1, within

    return sorted(seen, key=key)


def write_outputs(
    out_dir: Path, study: StudyRecord, records: Sequence[TrialRecord], prescreen: Mapping[str, Any] | None = None
) -> Front:
    """Every file above from the study's records; ``prescreen``: pareto.json's account of a pre-screen
    (``psc_nas.search.prescreen.summary``)."""
    front = find_front(records, study)
    write_text_atomic(out_dir / "trials.csv", trials_table(records, study.objectives).to_csv(index=False))
    front_dir = out_dir / "front"
    front_dir.mkdir(exist_ok=True)
    entries, keep = [], set()
    for record in front.members:
        path = record.config().save(front_dir / f"{record.number}.yaml")
        keep.add(path.name)
        entries.append(
            {
                "number": record.number,
                "arch_hash": record.arch_hash,
                "preset": record.preset,
                "evaluator": record.result.evaluator if record.result else None,
                "fidelity": record.fidelity.words if record.fidelity else None,
                "values": {o.name: _json_number(v) for o, v in zip(study.objectives, record.values or ())},
                "metrics": _json_metrics(record.metrics),  # every metric at that fidelity (per class)
                "params": record.params,
                "macs": record.macs,
                "latency_ms": record.latency_ms,
                "retrained": _json_metrics(record.retrained.metrics) if record.retrained else None,
                "retrained_fidelity": record.retrained.fidelity.words if record.retrained else None,
                "config": f"front/{path.name}",
            }
        )
    for stale in front_dir.glob("*.yaml"):  # trials that left the front since the last write
        if stale.name not in keep:
            stale.unlink()
    if front.best is not None:
        front.best.config().save(out_dir / "best.yaml")
    best_retrained = front.best.retrained if front.best is not None else None  # its weights as best.weights.pt
    copy_weights(
        out_dir / best_retrained.weights if best_retrained and best_retrained.weights else None,
        out_dir / "best.weights.pt",
    )
    summary = {
        "task": study.task,
        "space": study.space,
        "input_shape": list(study.input_shape) if study.input_shape else None,  # what MACs count, (C, D, H, W)
        "objectives": [o.to_dict() for o in study.objectives],
        "fields": FIELDS,
        "hypervolume": front.hypervolume,
        "hypervolume_definition": _hypervolume_definition([r for r in records if r.feasible], study),
        "knee": front.knee.number if front.knee else None,  # by the search's scores
        "best": front.best.number if front.best else None,  # best.yaml: the retrained knee when there is one
        "front": entries,
        "retrained": retrained_summary(front, study),
        "prescreen": prescreen,  # null: the search ranked only what it trained
    }
    write_text_atomic(out_dir / "pareto.json", json.dumps(summary, indent=2) + "\n")
    return front


def retrained_summary(front: Front, study: StudyRecord) -> dict[str, Any] | None:
    """pareto.json's "retrained" section: each retrained member's search score beside its retrained
    score, with both fidelities in words, and the knee of the retrained scores (best.yaml)."""
    if not front.retrained:
        return None
    metric = study.objectives[0].name
    searched = {r.number: r for r in front.members}
    members = []
    for record in front.retrained:
        retrained = record.retrained
        assert retrained is not None  # front.retrained holds retrained members only
        search = searched[record.number]
        members.append(
            {
                "number": record.number,
                "arch_hash": record.arch_hash,
                "search_score": _json_number(search.values[0]) if search.values else None,
                "search_fidelity": search.fidelity.words if search.fidelity else None,
                "retrained_score": _json_number(record.values[0]) if record.values else None,
                "retrained_fidelity": retrained.fidelity.words,
                "metrics": _json_metrics(retrained.metrics),
                "epochs": retrained.epochs,
                "seed": retrained.seed,
                "wall_s": retrained.evaluation.wall_s,
                "config": f"front/{record.number}.yaml",
                "weights": retrained.weights,  # the retrained network's state dict, relative to the run folder
            }
        )
    return {
        "metric": metric,
        "knee": front.retrained_knee.number if front.retrained_knee else None,
        "hypervolume": front.retrained_hypervolume,
        "hypervolume_definition": _hypervolume_definition(
            front.retrained, study, "the retrained scores (`retrained_score`)"
        ),
        "members": members,
    }


def _hypervolume_definition(
    feasible: Sequence[TrialRecord], study: StudyRecord, scored: str = "the search's scores (the front's `values`)"
) -> dict[str, Any]:
    """Where the hypervolume beside it was measured (``front.hypervolume_box``), or why it is 0."""
    box = hypervolume_box(feasible, study)
    if box is None:
        why = "no feasible trial" if not feasible else "neither params among the objectives nor a MACs budget"
        return {"objectives": None, "reference_point": None, "normalisation": None, "note": f"0: {why}"}
    return {**box.describe(), "scores": scored}


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    return {name: _json_number(float(value)) for name, value in metrics.items()}

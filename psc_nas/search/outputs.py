"""What a search leaves in runs/<name>/ besides the study: a table, the front, the knee config.

    trials.csv       one row per trial (pandas), every state
    pareto.json      the feasible front: objectives, normalized hypervolume, knee, one entry per point,
                     and a "retrained" section: the members trained again after the search, their knee
    front/<n>.yaml   the config of every front trial n (ArchConfig.save)
    best.yaml        the retrained knee, or the search's knee before any retraining (``Front.best``)
    best.weights.pt  best.yaml's trained weights, when it was retrained (psc_nas.load_model(run folder))

Written from the study's records alone, whichever engine filled the study; rewritten after every
bracket, each file atomically, so a killed search leaves readable files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from psc_nas.files import write_text_atomic
from psc_nas.search.front import Front, find_front
from psc_nas.search.record import Objective, StudyRecord, TrialRecord
from psc_nas.weights import copy_weights


def trials_table(records: Sequence[TrialRecord], objectives: Sequence[Objective]) -> pd.DataFrame:
    rows = []
    for record in records:
        own = record.own_evaluations()  # reused results cost this trial nothing
        fidelity = record.fidelity
        row: dict[str, Any] = {
            "number": record.number,
            "state": record.state.name,
            "feasible": record.feasible,
            "over_budget": record.over_budget,
            "preset": record.preset,
            "arch_hash": record.arch_hash,
            "evaluator": record.result.evaluator if record.result else None,
            "fidelity": fidelity.key if fidelity else None,
            "fidelity_words": fidelity.words if fidelity else None,
        }
        for index, objective in enumerate(objectives):
            row[objective.name] = record.values[index] if record.values else None
        retrained = record.retrained
        row.update(
            {
                # the same metric after retraining from scratch, and how it was retrained, in words
                "retrained": retrained.metrics.get(objectives[0].name) if retrained else None,
                "retrained_fidelity": retrained.fidelity.words if retrained else None,
                "params": record.params,
                "macs": record.macs,
                "latency_ms": record.latency_ms,
                "train_s": sum(e.wall_s for e in own),
                "fwd_bwd_s": sum(e.fwd_bwd_s for e in own),
                "val_forward_s": sum(e.val_forward_s for e in own),
                "duration_s": record.duration_s,
                "fail_reason": record.fail_reason,
                "summary": record.summary(),
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def write_outputs(out_dir: Path, study: StudyRecord, records: Sequence[TrialRecord]) -> Front:
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
        "objectives": [o.to_dict() for o in study.objectives],
        "hypervolume": front.hypervolume,
        "knee": front.knee.number if front.knee else None,  # by the search's scores
        "best": front.best.number if front.best else None,  # best.yaml: the retrained knee when there is one
        "front": entries,
        "retrained": retrained_summary(front, study),
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
        "members": members,
    }


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    return {name: _json_number(float(value)) for name, value in metrics.items()}

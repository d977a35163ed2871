"""Pick an architecture from a search run and hand it over: config, weights, TorchScript, ONNX.

    psc-export runs/ibsr-5M                         the knee of the front -> runs/ibsr-5M/export/trial-12.yaml
                                                    (+ trial-12.weights.pt when the search retrained it)
    psc-export runs/ibsr-5M --pick best --format json
    psc-export runs/ibsr-5M --pick "under 2M" --retrain --torchscript --onnx

The written config rebuilds the network with ``psc_nas.build_model(path)``, with exactly the
parameters and MACs the study recorded for the trial; ``psc_nas.load_model(path)`` rebuilds it with
its trained weights: those the search kept when it retrained the trial (``front/<n>.weights.pt``), or
those ``--retrain`` trains here. TorchScript and ONNX need trained weights (or ``allow_untrained``).
Every user mistake (a pick that matches nothing, a folder without a study, a failed trial, missing or
corrupt weights) raises ``ValueError`` with one clear line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from optuna.trial import TrialState
from torch import nn

from psc_nas.arch import ArchConfig
from psc_nas.costs import format_count, parse_count
from psc_nas.nets import build_model
from psc_nas.results import Run
from psc_nas.search.record import TrialRecord
from psc_nas.weights import copy_weights, load_state, read_checkpoint, read_weights, save_weights, weights_path

PICK_FORMS = "knee, best, 'trial N', 'under 2M' (params) or 'under 50G macs'"
FORMATS = ("yaml", "json")
_PICK = re.compile(r"^\s*(?:(knee|best)|trial\s+(\d+)|under\s+(\S+)(?:\s+(params|macs))?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Pick:
    """Which trial to export: ``knee``, ``best``, ``trial`` (``number``) or ``under`` (``limit`` on ``cost``)."""

    kind: str
    number: int | None = None
    limit: int | None = None
    cost: str = "params"

    @classmethod
    def parse(cls, text: str) -> Pick:
        match = _PICK.match(text)
        if not match:
            raise ValueError(f"--pick must be one of {PICK_FORMS}; got {text!r}")
        named, number, limit, cost = match.groups()
        if named:
            return cls(named.lower())
        if number is not None:
            return cls("trial", number=int(number))
        return cls("under", limit=parse_count(limit), cost=(cost or "params").lower())

    def __str__(self) -> str:
        if self.kind == "trial":
            return f"trial {self.number}"
        if self.kind == "under":
            return f"best under {format_count(self.limit)} {self.cost}"
        return self.kind


def select(run: Run, pick: Pick) -> TrialRecord:
    """The trial ``pick`` names among the run's trials; raises ``ValueError`` when there is none."""
    if pick.kind == "trial":
        record = run.trial(pick.number)  # type: ignore[arg-type]
        if record.over_budget:
            budget = run.record.budget
            # Exact counts: an excess of a few parameters rounds away in format_count's 3 digits.
            excess = ", ".join(
                f"{name} {used:,} > budget {limit:,}, +{100 * (used - limit) / limit:.2g}%"
                for name, used, limit in (("params", record.params, budget.params), ("macs", record.macs, budget.macs))
                if limit is not None and used is not None and used > limit
            )
            raise ValueError(
                f"trial {record.number} is over budget ({excess}) and was never trained; "
                "over-budget trials are priced, not evaluated"
            )
        if record.state != TrialState.COMPLETE:
            state = {"FAIL": "failed", "RUNNING": "still running"}.get(record.state.name, record.state.name.lower())
            reason = f": {record.fail_reason}" if record.fail_reason else ""
            raise ValueError(f"trial {record.number} {state}{reason}; only finished trials can be exported")
        return record
    candidates = run.completed()
    if not candidates:
        raise ValueError(f"{run.path}: no trial has finished within budget yet")
    if pick.kind == "knee":
        return run.trial(run.knee())  # type: ignore[arg-type]
    if pick.kind == "under":
        fitting = [r for r in candidates if r.measure(pick.cost) <= pick.limit]  # type: ignore[operator]
        if not fitting:
            smallest = min(r.measure(pick.cost) for r in candidates)  # type: ignore[type-var]
            raise ValueError(
                f"no finished trial has {pick.cost} <= {format_count(pick.limit)} "
                f"(the smallest has {format_count(smallest)})"
            )
        candidates = fitting
    sign = 1 if run.quality.maximize else -1
    return max(candidates, key=lambda r: (sign * run.quality_of(r), -r.number))  # type: ignore[operator]


@dataclass
class Exported:
    record: TrialRecord
    config: ArchConfig
    files: dict[str, Path]  # what was written: config, weights, torchscript, onnx
    weights: str | None = None  # where the weights come from, in words; None: the network is untrained
    warnings: tuple[str, ...] = ()  # what a user must not miss (untrained weights in a TorchScript/ONNX file)


def full_fidelity_epochs(run: Run) -> int:
    """Epochs of the run's longest learning curve: what its full-fidelity trials trained for."""
    epochs = max((len(r.curve) for r in run.records), default=0)
    if not epochs:
        raise ValueError(f"{run.path}: no trial recorded a learning curve; give --epochs for --retrain")
    return epochs


def retrain_weights(run: Run, config: ArchConfig, stem: Path, *, epochs: int, data_dir: str | Path | None) -> Path:
    """Train ``config`` from scratch on the run's task; save the best epoch's weights for build_model()."""
    from psc_nas.train import fit_into

    result = fit_into(stem.with_name(stem.name + "-retrain"), config, run.task, epochs=epochs, data_dir=data_dir)
    if result.checkpoint is None:
        raise ValueError(f"retraining trial {stem.name} saved no checkpoint")
    _, weights = read_checkpoint(result.checkpoint)
    return save_weights(weights, weights_path(stem.with_suffix(".yaml")))


def search_weights(run: Run, record: TrialRecord) -> tuple[Path, str] | None:
    """The weights the search kept for ``record`` (it retrained the trial) and how they were trained, in
    words; None when it kept none. A recorded file that is gone raises ``ValueError``."""
    retrained = record.retrained
    if retrained is None or not retrained.weights:
        return None
    path = run.path / retrained.weights
    if not path.is_file():
        raise ValueError(
            f"trial {record.number}'s retrained weights {path} are missing (moved or deleted?); "
            "--retrain trains the network again"
        )
    metric = run.quality.name
    score = retrained.metrics.get(metric)
    scored = f", {metric} {score:.4f}" if isinstance(score, float) else ""
    return path, f"{retrained.fidelity.words}{scored} (the search's retraining, {retrained.weights})"


def untrained_reason(run: Run, record: TrialRecord) -> str:
    """Why ``record`` has no weights, and which trials of the run do."""
    kept = sorted({r.retrained.trial for r in run.records if r.retrained is not None and r.retrained.weights})
    why = (
        f"trial {record.number} was retrained before psc-nas kept weights"
        if record.retrained is not None
        else f"trial {record.number} was not retrained after the search"
    )
    return why + (f" (trials with weights: {', '.join(map(str, kept))})" if kept else "")


def example_input(run: Run) -> torch.Tensor:
    """One sample at the task's input size, the size the study priced the trial at."""
    from psc_nas.tasks import get_task

    return torch.zeros(1, *get_task(run.task).input_shape)


def to_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit in favour of torch.export, but TorchScript is what was asked
        # for; tracing (scripting cannot compile the fast ops) fixes the input size to the task's.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
    traced.save(str(path))
    return path


def to_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ValueError("--onnx needs the onnx and onnxscript packages: pip install 'psc-nas[onnx]'") from None
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            # One self-contained file: these networks are far below ONNX's 2 GB protobuf limit.
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                input_names=["image"],
                output_names=["logits"],
            )
    finally:
        exporter_log.setLevel(level)
    return path


def export(
    run_dir: str | Path,
    pick: str = "knee",
    *,
    fmt: str = "yaml",
    out_dir: str | Path | None = None,
    retrain: bool = False,
    epochs: int | None = None,
    data_dir: str | Path | None = None,
    torchscript: bool = False,
    onnx: bool = False,
    storage: str | None = None,
    study_name: str | None = None,
    allow_untrained: bool = False,
) -> Exported:
    """Write the picked trial's config, its trained weights where there are any, and on request
    TorchScript and ONNX, to ``out_dir``.

    ``out_dir`` defaults to ``run_dir/export``; files are named ``trial-<N>.<ext>``. The weights are
    those the search kept when it retrained the trial, or with ``retrain`` a new training (for
    ``epochs``, by default the run's full fidelity). TorchScript and ONNX carry those weights; without
    any they are refused unless ``allow_untrained``, and then ``Exported.warnings`` says so.
    ``storage``/``study_name``: where psc-search's ``--storage`` keeps the study (``results.Run.open``),
    for a search run on PostgreSQL or a journal.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    selection = Pick.parse(pick)
    run = Run.open(run_dir, storage=storage, study_name=study_name)
    record = select(run, selection)
    config = record.config()
    stem = Path(out_dir or run.path / "export") / f"trial-{record.number}"
    model = build_model(config)
    params = sum(p.numel() for p in model.parameters())
    if params != record.params:
        raise ValueError(
            f"trial {record.number} rebuilds with {params} parameters but the study recorded "
            f"{record.params}; was the study written by another psc-nas version?"
        )
    # Everything that can refuse does so before anything is written.
    kept = None if retrain else search_weights(run, record)
    wanted = [name for name, on in (("--torchscript", torchscript), ("--onnx", onnx)) if on]
    if wanted and not retrain and kept is None and not allow_untrained:
        raise ValueError(
            f"{' and '.join(wanted)} need{'s' if len(wanted) == 1 else ''} trained weights and "
            f"{untrained_reason(run, record)}; "
            "add --retrain to train it, or --allow-untrained to export random weights"
        )
    if kept is not None:
        load_state(model, read_weights(kept[0]), kept[0])  # weights that do not fit are refused, not copied
    files = {"config": config.save(stem.with_suffix(f".{fmt}"))}
    origin = None
    if retrain:
        epochs = epochs or full_fidelity_epochs(run)
        files["weights"] = retrain_weights(run, config, stem, epochs=epochs, data_dir=data_dir)
        origin = f"retrained here: {epochs} epoch{'s' if epochs != 1 else ''}, best epoch"
        load_state(model, read_weights(files["weights"]), files["weights"])
    elif kept is not None:
        source, origin = kept
        files["weights"] = copy_weights(source, weights_path(files["config"]))  # type: ignore[assignment]
    model.eval()
    notes: list[str] = []
    if wanted:
        example = example_input(run)
        if torchscript:
            files["torchscript"] = to_torchscript(model, example, stem.with_suffix(".torchscript.pt"))
        if onnx:
            files["onnx"] = to_onnx(model, example, stem.with_suffix(".onnx"))
        if origin is None:
            written = ", ".join(files[kind].name for kind in ("torchscript", "onnx") if kind in files)
            notes.append(
                f"WARNING: {written} carry UNTRAINED, randomly initialized weights ({untrained_reason(run, record)})"
            )
    return Exported(record, config, files, origin, tuple(notes))

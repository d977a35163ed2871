"""What a search asks of an evaluator: a score for one architecture at one fidelity.

An *evaluator* turns an ArchConfig into metrics. ``train`` trains it from scratch; others (a
weight-sharing super-network, zero-cost proxies) plug in behind the same interface and the search,
its cache, its promotion policy and its study record stay the same:

    levels()   the fidelities it offers, cheap to expensive; the policy promotes along them
    prepare()  one-time work before any evaluation (training a super-network); plain training: none
    evaluate() one architecture at one fidelity -> Evaluation (metrics, curve, seconds)

Register an evaluator with ``psc_nas.evaluators.register_evaluator``; nothing else names it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from psc_nas.arch import ArchConfig


@dataclass(frozen=True)
class Fidelity:
    """How hard an evaluator looked: ``key`` orders one evaluator's fidelities (epochs for ``train``),
    ``words`` says what it means to a person ("2 epochs × 8 samples")."""

    key: int
    words: str


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation of one architecture gave."""

    evaluator: str
    fidelity: Fidelity  # the one reached: lower than asked when the search's time ran out
    metrics: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch, when the evaluator trains
    wall_s: float = 0.0
    fwd_bwd_s: float = 0.0  # network forward + backward while training
    val_forward_s: float = 0.0  # network forward while validating
    evaluated_by: int | None = None  # the trial that computed it (another one when a result is reused)


@dataclass(frozen=True)
class EvaluatorSetup:
    """What a search gives every evaluator it builds; each takes what it needs."""

    task: Any
    seed: int = 0
    data_dir: Path | None = None
    epochs: tuple[int, ...] = (1,)  # training fidelities the run profile asks for, cheap to expensive
    data_options: Mapping[str, Any] = field(default_factory=dict)  # passed to task.datamodule
    space: Any = None  # the SearchSpace searched (a weight-sharing evaluator builds its super-network from it)
    admissible: Callable[[ArchConfig], bool] | None = None  # within the run's budget (None: everything is)
    options: Mapping[str, Any] = field(default_factory=dict)  # evaluator-specific (``--evaluator-option k=v``)


class EvaluationFailed(RuntimeError):
    """An evaluation gave no usable result; the message (one line) says why and lands in the study."""


class Evaluator(ABC):
    name: ClassVar[str]

    @abstractmethod
    def levels(self) -> tuple[Fidelity, ...]:
        """The fidelities this evaluator offers, cheap to expensive (increasing ``key``)."""

    def prepare(self, work_dir: Path, *, seconds_left: float | None) -> None:
        """One-time work before the first evaluation of a search, kept in ``work_dir`` (the run
        folder) so that a resumed search can reuse it. Evaluating from scratch needs none."""

    @abstractmethod
    def evaluate(self, config: ArchConfig, fidelity: Fidelity, *, seconds_left: float | None) -> Evaluation:
        """Score ``config`` at ``fidelity``. Past ``seconds_left`` an evaluator may stop early and
        report the lower fidelity it reached; it raises on failure (``EvaluationFailed`` when it
        can say why in one line)."""


def failure_reason(error: BaseException) -> str:
    """One line for the study's ``fail_reason``: out-of-memory named as such."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return f"out of memory: {text}"
    if isinstance(error, EvaluationFailed):
        return text
    return f"{type(error).__name__}: {text}"

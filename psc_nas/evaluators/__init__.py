"""Evaluators by name: ``make_evaluator("train", setup)``; a plugin adds its own with ``register_evaluator``.

Evaluator modules may import Lightning and MONAI, so they load only when asked for by name.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from psc_nas.evaluators.base import Evaluation, EvaluationFailed, Evaluator, EvaluatorSetup, Fidelity, failure_reason
from psc_nas.plugins import load_plugins

EvaluatorFactory = Callable[[EvaluatorSetup], Evaluator]

# name -> "module:class" (imported on first use) or a factory registered by a plugin
_EVALUATORS: dict[str, str | EvaluatorFactory] = {
    "train": "psc_nas.evaluators.train:TrainEvaluator",
    "supernet": "psc_nas.evaluators.supernet:SupernetEvaluator",
}


def register_evaluator(name: str, factory: EvaluatorFactory) -> None:
    if name in _EVALUATORS:
        raise ValueError(f"evaluator {name!r} is already registered")
    _EVALUATORS[name] = factory


def evaluator_names() -> list[str]:
    load_plugins()
    return sorted(_EVALUATORS)


def make_evaluator(name: str, setup: EvaluatorSetup) -> Evaluator:
    if name not in evaluator_names():
        raise ValueError(f"unknown evaluator {name!r}; known: {', '.join(evaluator_names())}")
    factory = _EVALUATORS[name]
    if isinstance(factory, str):
        module, cls = factory.split(":")
        factory = getattr(import_module(module), cls)
    return factory(setup)


__all__ = [
    "Evaluation",
    "EvaluationFailed",
    "Evaluator",
    "EvaluatorSetup",
    "Fidelity",
    "evaluator_names",
    "failure_reason",
    "make_evaluator",
    "register_evaluator",
]

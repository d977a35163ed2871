"""The task registry: task name -> ``Task`` subclass, filled by the task modules themselves.

A task module decorates its class with ``@register_task``. The shipped tasks import MONAI and
Lightning, so their modules load only when a task is asked for by name (``BUILTIN``); tasks from
outside the package arrive through ``psc_nas.plugins`` (``$PSC_NAS_PLUGINS`` or entry points),
which are imported before the registry is first read.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from psc_nas.plugins import load_plugins

if TYPE_CHECKING:
    from psc_nas.tasks.base import Task

# shipped task name -> module that registers it
BUILTIN = {"em": "psc_nas.tasks.em", "ibsr": "psc_nas.tasks.ibsr", "ucf101": "psc_nas.tasks.ucf101"}
DIRECTIONS = ("maximize", "minimize")
# The problem definition every task class states (see ``Task``); the rest has defaults or is code.
REQUIRED = (
    "name",
    "backbone",
    "backbone_hparams",
    "class_names",
    "input_shape",
    "metric",
    "metric_direction",
    "metric_range",
)

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: check the problem definition ``cls`` declares and register it by ``cls.name``."""
    where = f"{cls.__module__}.{cls.__qualname__}"
    missing = [attr for attr in REQUIRED if not hasattr(cls, attr)]
    if missing:
        raise TypeError(f"task {where} does not set {', '.join(missing)}")
    if cls.metric_direction not in DIRECTIONS:
        raise TypeError(f"task {where}: metric_direction must be one of {DIRECTIONS}, got {cls.metric_direction!r}")
    low, high = cls.metric_range
    if not low < high:
        raise TypeError(f"task {where}: metric_range must be (low, high) with low < high, got {cls.metric_range!r}")
    if len(cls.input_shape) != 4 or not all(isinstance(s, int) and s > 0 for s in cls.input_shape):
        raise TypeError(f"task {where}: input_shape must be (C, D, H, W) positive ints, got {cls.input_shape!r}")
    known = TASKS.get(cls.name)
    if known is not None and known is not cls:
        raise TypeError(f"task name {cls.name!r} of {where} is taken by {known.__module__}.{known.__qualname__}")
    TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    load_plugins()
    return sorted(set(TASKS) | set(BUILTIN))


def get_task(name: str) -> Task:
    """A fresh instance of the task registered as ``name``; unknown names raise ``ValueError``."""
    load_plugins()
    if name not in TASKS and name in BUILTIN:
        import_module(BUILTIN[name])
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}")
    return TASKS[name]()

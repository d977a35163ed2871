"""Tasks: data, loss, metrics, default backbone and input size for each application.

Task modules import MONAI and Lightning, so they load only when asked for by name.
"""

from __future__ import annotations

from importlib import import_module

from psc_nas.tasks.base import DataError, Metrics, Task

# name -> "module:class"
_TASKS = {
    "ibsr": "psc_nas.tasks.ibsr:IBSRTask",
}


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}")
    module, cls = _TASKS[name].split(":")
    return getattr(import_module(module), cls)()


__all__ = ["DataError", "Metrics", "Task", "get_task", "task_names"]

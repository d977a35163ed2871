"""Tasks: each application's problem definition (input shape, backbone, metric), data, loss and metrics.

One file per task registers a ``Task`` subclass with ``@register_task``; ``get_task(name)`` returns
it. Shipped task modules import MONAI and Lightning, so they load only when asked for by name.
"""

from psc_nas.tasks.base import Batch, DataError, Metrics, TargetLoss, Task
from psc_nas.tasks.registry import get_task, register_task, task_names

__all__ = ["Batch", "DataError", "Metrics", "TargetLoss", "Task", "get_task", "register_task", "task_names"]

"""Let OpenMP threads sleep while they wait, instead of spinning.

PyTorch's CPU kernels run on an OpenMP team (one thread per core by default). Between parallel regions
an idle team thread spins on the CPU for a while before it sleeps (``OMP_WAIT_POLICY=ACTIVE``-like
default). On a machine whose cores are busy with anything else (another search worker, a build, a second
training) the spinning threads take the CPU the working thread needs, and a step can take twice as long
and twice the CPU (docs/benchmarks/search.md, "Threads on a busy machine"). ``OMP_WAIT_POLICY=PASSIVE``
makes waiting threads sleep at once.

The OpenMP runtime reads the variable once, when it loads with PyTorch, so ``sleep_when_waiting()`` must
run before ``import torch``; psc-search, psc-train and psc-export call it first. A value the user set
is kept (``OMP_WAIT_POLICY=ACTIVE psc-search ...`` restores spinning).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("psc_nas")

VARIABLE = "OMP_WAIT_POLICY"


def sleep_when_waiting() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it; True when it is PASSIVE for this process's
    OpenMP runtime (False when torch was imported before, or the user chose another policy)."""
    if VARIABLE in os.environ:
        return os.environ[VARIABLE].upper() == "PASSIVE"
    if "torch" in sys.modules:  # the OpenMP runtime has read its environment already
        log.debug("%s not set: torch was imported first", VARIABLE)
        return False
    os.environ[VARIABLE] = "PASSIVE"
    return True

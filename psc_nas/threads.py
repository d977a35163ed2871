"""On a busy machine, let OpenMP threads sleep while they wait instead of spinning.

PyTorch's CPU kernels run on an OpenMP team (one thread per core by default). Between parallel regions an idle
team thread spins for a while before it sleeps. When other processes keep cores busy (another search worker, a
build, a second training) the spinning threads take the CPU the working thread needs. ``OMP_WAIT_POLICY=PASSIVE``
makes waiting threads sleep at once. Measured with ``benchmarks/threads.py`` (docs/benchmarks/search.md, section 7,
csn_ir training at 2 threads on 2 cores): beside two other jobs, sleeping is 1.45x faster at full width and 2.9x at
the search's quarter width; on an idle machine it is 4% and 12% slower. So the policy is chosen by the load:
``sleep_when_waiting()`` sets PASSIVE when the 1-minute load average is at least ``$PSC_NAS_BUSY_LOAD`` (default
0.75: on average some other process wants a core), and leaves OpenMP's default otherwise.

The OpenMP runtime reads the variable once, when it loads with PyTorch, so this must run before ``import torch``;
psc-search, psc-train and psc-export call it first. An ``OMP_WAIT_POLICY`` the user set is always kept.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("psc_nas")

VARIABLE = "OMP_WAIT_POLICY"
BUSY_VARIABLE = "PSC_NAS_BUSY_LOAD"
BUSY_LOAD = 0.75


def busy_load() -> float:
    """The load average from which the machine counts as busy: ``$PSC_NAS_BUSY_LOAD``, else ``BUSY_LOAD``."""
    text = os.environ.get(BUSY_VARIABLE, "").strip()
    try:
        return float(text) if text else BUSY_LOAD
    except ValueError:
        raise ValueError(f"${BUSY_VARIABLE} must be a number (a load average), got {text!r}") from None


def sleep_when_waiting(load: float | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when the machine is busy (``load``, default the 1-minute load average, at
    least ``busy_load()``) and the user set no policy; True when PASSIVE is this process's policy. Nothing is set
    once torch is loaded: the OpenMP runtime has read its environment then."""
    if VARIABLE in os.environ:
        return os.environ[VARIABLE].upper() == "PASSIVE"
    if "torch" in sys.modules:
        log.debug("%s not set: torch was imported first", VARIABLE)
        return False
    threshold = busy_load()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average (Windows): keep OpenMP's default
            return False
    if load < threshold:
        return False
    os.environ[VARIABLE] = "PASSIVE"
    return True

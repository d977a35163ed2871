"""Ctrl-C during a search: an interrupt, not a crash.

Lightning turns a ``KeyboardInterrupt`` inside ``Trainer.fit`` into ``sys.exit(1)`` (and ignores
further Ctrl-C), so a search interrupted mid-training used to end with exit 1, no message, and its
held trial failed like a dead worker's. Under :func:`sigint_raises` SIGINT raises
:class:`Interrupted` instead: not a ``KeyboardInterrupt``, so Lightning tears down and re-raises it;
the engine hands the held trials back to the queue and the CLI exits 130 with one line.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) arrived during a search."""


INTERRUPTS = (Interrupted, KeyboardInterrupt)


@contextmanager
def sigint_raises() -> Iterator[None]:
    """Within the block, SIGINT raises :class:`Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    raised = []

    def interrupt(signum: int, frame: object) -> None:
        if not raised:  # once: a second Ctrl-C must not cut short handing the trial back
            raised.append(signum)
            raise Interrupted()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def sigint_held() -> Iterator[None]:
    """SIGINT held back while the block runs (delivered on leaving it), so a Ctrl-C never leaves half a trial
    written. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

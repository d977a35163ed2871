"""Writing files that other processes may be reading or writing at the same moment."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a per-process temporary file and a rename.

    Readers (the live dashboard, a resumed search) never see a half-written file, and workers of
    one study that finish together do not trip over each other's temporary file.
    """
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """``write_text_atomic`` for bytes (a saved super-network, say)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    partial.replace(path)
    return path

"""Writing files that other processes may be reading or writing at the same moment."""

from __future__ import annotations

import hashlib
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


FINGERPRINT_SAMPLE = 1 << 20  # bytes hashed from each end of a file


def folder_fingerprint(root: Path) -> str:
    """A hex digest of the files under ``root``: relative paths, sizes, and the first and last MiB of
    each file's content. Changed, added, removed or renamed files change it; moving or copying the
    folder does not. Reads at most 2 MiB per file, so a large data set is fingerprinted in seconds."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_SAMPLE))
            if size > 2 * FINGERPRINT_SAMPLE:
                handle.seek(-FINGERPRINT_SAMPLE, os.SEEK_END)
            digest.update(handle.read(FINGERPRINT_SAMPLE))
    return digest.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """``write_text_atomic`` for bytes (a saved super-network, say)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    partial.replace(path)
    return path

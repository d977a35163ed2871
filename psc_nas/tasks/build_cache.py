"""A directory of generated data, built once, checked by checksum, replaced atomically.

Embedded data sets (synthetic EM volumes, synthetic action videos) are generated on first use into
``$PSC_NAS_CACHE/<kind>/<variant>`` (default ``~/.cache/psc-nas``). A manifest records the builder
version, the parameters and the SHA-256 of every file; a directory whose manifest is missing, stale
or does not match its files is rebuilt. A build writes into a temporary directory that is renamed
into place, so an interrupted build leaves nothing that looks complete, and builds a killed process
abandoned are deleted an hour later.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psc_nas.tasks.base import DataError

MANIFEST = "manifest.json"


def cache_root() -> Path:
    return Path(os.environ.get("PSC_NAS_CACHE") or Path.home() / ".cache" / "psc-nas")


def cached_build(target: Path, *, version: int, params: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """``target``, built by ``write(directory)`` unless a valid build with these parameters is there.

    ``write`` fills an empty directory; every file it leaves is checksummed into the manifest.
    """
    if is_valid(target, version=version, params=params):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        write(staging)
        files = {str(path.relative_to(staging)): _sha256(path) for path in sorted(staging.rglob("*")) if path.is_file()}
        manifest = {"version": version, "params": params, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not is_valid(target, version=version, params=params):  # another process replaced it meanwhile
        raise DataError(target, "cached data changed while it was being built; run again")
    return target


def is_valid(directory: Path, *, version: int, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        return (
            manifest["version"] == version
            and manifest["params"] == params
            and all(_sha256(directory / name) == digest for name, digest in manifest["files"].items())
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_abandoned_builds(parent: Path, *, older_than_s: float = 3600.0) -> None:
    """Delete temporary directories a killed build left; recent ones may belong to a running build."""
    now = time.time()
    for leftover in [*parent.glob(".build-*"), *parent.glob(".stale-*")]:
        if now - leftover.stat().st_mtime > older_than_s:
            shutil.rmtree(leftover, ignore_errors=True)


def _replace(staging: Path, target: Path) -> None:
    """Move a finished build into place; a stale build is moved aside first, then deleted."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:  # a concurrent build got there first; is_valid() decides whether that one is usable
        pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

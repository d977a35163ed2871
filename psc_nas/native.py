"""psc-nas's own C++ kernels: each compiled once per machine and torch installation, loaded by later processes.

A kernel (``ops/depthwise.py``: the depthwise conv's weight gradient; ``ops/norm_act.py``: BatchNorm ─ ReLU) is an
``Extension``: its C++ source, the functions it exports, and a versioned name. The first ``module()`` builds it with
``torch.utils.cpp_extension.load_inline`` (g++, ninja) into ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) or loads it from there. The build folder's name carries a digest of torch's install
path: its headers' path is part of the compile command, so two virtual environments sharing one folder would
rebuild it in turn. A machine without a compiler, a failed build, or ``PSC_NAS_NO_EXTENSIONS=1`` gives ``None``
(``available()`` False, ``unavailable_reason()`` says why) and the callers keep PyTorch's own path. A build prints
one line with its time to stderr and ``load_seconds()`` reports it, so compile time never hides inside a timed
search or benchmark.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

DISABLE_VAR = "PSC_NAS_NO_EXTENSIONS"
EXTENSIONS: dict[str, Extension] = {}  # every kernel by stem, as its module defines it (``psc_nas.ops`` imports all)


def build_flags() -> list[str]:
    """The compiler flags of every kernel: this machine's vector units (AVX-512 where it has them), OpenMP."""
    return ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=fast"]


def torch_digest() -> str:
    import torch

    return hashlib.sha1(os.path.dirname(torch.__file__).encode()).hexdigest()[:8]


class Extension:
    """One C++ kernel: built or loaded on the first ``module()`` call, once per process (thread-safe).

    ``stem`` and ``version`` name the build (bump the version when the source changes, so a cached build of the
    old source is not loaded); ``what`` names it in the build line ("the depthwise C++ kernel")."""

    def __init__(self, stem: str, version: int, source: str, functions: Sequence[str], what: str) -> None:
        self.stem, self.version, self.source, self.functions, self.what = stem, version, source, list(functions), what
        self._lock = threading.Lock()
        self._tried = False
        self._module: Any | None = None
        self._seconds: float | None = None
        self._error: str | None = None
        self._said = False  # whether the reason it is unavailable was printed (a failed build says why)
        EXTENSIONS[stem] = self

    @property
    def name(self) -> str:
        return f"psc_nas_{self.stem}_v{self.version}_{torch_digest()}"

    def module(self) -> Any | None:
        """The compiled module, or None where it cannot be built."""
        with self._lock:
            if not self._tried:
                self._tried = True
                self._module = self._load()
            return self._module

    def _load(self) -> Any | None:
        if os.environ.get(DISABLE_VAR, "") not in ("", "0"):
            self._error = f"disabled by {DISABLE_VAR}"
            return None
        if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
            self._error = "no C++ compiler on PATH"
            return None
        from torch.utils import cpp_extension

        started = time.perf_counter()
        try:
            module = cpp_extension.load_inline(
                name=self.name,
                cpp_sources=self.source,
                functions=self.functions,
                extra_cflags=build_flags(),
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as err:  # noqa: BLE001 - any build failure means: use PyTorch's path
            text = str(err).strip()
            self._error = f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"
            print(f"psc-nas: {self.what} is unavailable ({self._error}); PyTorch's own path runs", file=sys.stderr)
            self._said = True
            return None
        self._seconds = time.perf_counter() - started
        if self._seconds > 2.0:  # a cached load takes well under a second; this was a build
            print(f"psc-nas: built {self.what} in {self._seconds:.1f} s (cached)", file=sys.stderr)
        return module

    def available(self) -> bool:
        """Whether the kernel runs on this machine (builds or loads it on the first call)."""
        return self.module() is not None

    def load_seconds(self) -> float | None:
        """Seconds the first ``module()`` took to build or load the kernel; None before, or if unavailable."""
        return self._seconds

    def unavailable_reason(self) -> str | None:
        return self._error

    def said_why(self) -> bool:
        """Whether this process already printed why the kernel is unavailable (a failed build does; a disabled one
        or a machine without a compiler does not)."""
        return self._said

"""Exact analytic cost: trainable parameters and multiply-accumulates.

``macs`` counts conv, transposed conv and linear layers for one sample, the same quantity as
``torch.utils.flop_counter.FlopCounterMode`` forward FLOPs / 2. Nothing here runs a forward pass,
so thousands of candidates can be priced per second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Spatial = tuple[int, int, int]

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kKmMgGtT]?)\s*$")


@dataclass(frozen=True)
class Cost:
    params: int = 0
    macs: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs)

    def __radd__(self, other: int) -> Cost:  # lets sum() start from 0
        if other == 0:
            return self
        return NotImplemented

    def fits(self, *, params: int | None = None, macs: int | None = None) -> bool:
        return (params is None or self.params <= params) and (macs is None or self.macs <= macs)


MAX_COUNT = 2**62  # beyond any network, and within the 64-bit integers cost arithmetic and storage use


def parse_count(text: str | int | float) -> int:
    """Parse a human count such as ``5M``, ``1.4M``, ``250k``, ``60G`` or ``1200`` into an int.

    Raises ``ValueError`` naming the accepted forms for anything else (negative, empty, ``5X``).
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a count such as 5M, 1.4M, 250k or 60G, got {text!r}")
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ValueError(f"a count must be positive, got {text!r}")
        if text > MAX_COUNT:
            raise ValueError(f"{text!r} is larger than any network can be (at most {MAX_COUNT:.2e})")
        return int(text)
    match = _NUMBER.match(str(text))
    if not match:
        raise ValueError(f"expected a count such as 5M, 1.4M, 250k or 60G, got {text!r}")
    value = round(float(match.group(1)) * _SUFFIXES[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"a count must be positive, got {text!r}")
    if value > MAX_COUNT:
        raise ValueError(f"{text!r} is larger than any network can be (at most {MAX_COUNT:.2e})")
    return value


def format_count(value: int) -> str:
    """Inverse of :func:`parse_count` for display: 5_200_000 -> '5.2M'."""
    for suffix, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return str(value)

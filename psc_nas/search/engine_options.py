"""Checks shared by the one-shot engines' ``--engine-option KEY=VALUE`` parsers (``cakes_engine``,
``nni_oneshot``): each failure is one ``ValueError`` line naming the engine (``where``) and the option."""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping
from typing import Any


def check_numbers(
    options: MutableMapping[str, Any], keys: Iterable[str], where: str, *, zero_ok: Iterable[str] = ()
) -> None:
    """``options[key]`` as a finite float ≥ 0 for each of ``keys``, above 0 unless the key is in ``zero_ok``."""
    zero_ok = set(zero_ok)
    for key in keys:
        try:
            options[key] = float(options[key])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: option {key} must be a number, got {options[key]!r}") from None
        value = options[key]
        if not math.isfinite(value) or value < 0 or (value == 0 and key not in zero_ok):
            raise ValueError(f"{where}: option {key} must be positive, got {value!r}")


def check_positive_ints(
    options: MutableMapping[str, Any],
    keys: Iterable[str],
    where: str,
    *,
    optional: Iterable[str] = (),
    auto: Iterable[str] = ("steps",),
) -> None:
    """Each of ``keys`` a positive int (not a bool); None passes for keys in ``optional``, "auto" for ``auto``."""
    optional, auto = set(optional), set(auto)
    for key in keys:
        value = options[key]
        if (value is None and key in optional) or (value == "auto" and key in auto):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: option {key} must be a positive int, got {value!r}")

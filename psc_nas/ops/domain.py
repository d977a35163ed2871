"""Argument domains of op families in a search space, and the YAML parsing helpers they share.

A domain lists the categorical *parameters* its family may ask for (name -> choices, every
choice a plain str/int/float so Optuna and NNI can store it), asks them define-by-run through
``decide(pick)`` (PmSCn asks ``m`` first, then the orientation subsets of that size), and
``resolve``s the abstract decision for one slot into an exact ``BlockChoice``:

    pmscn:  {m: [1, 2], n: [1, 2, 3], orientations: all, width: [0.5, 1.0]}
    cakes:  {shapes: [1D, 2D], step: 1/4}

Decisions are slot-independent (channel *fractions*, width *multipliers*) so one decision can be
shared by slots of different widths; resolution turns them into integer channel counts. Each
family's domain lives in the family's module and is named by its ``OpFamily`` record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from psc_nas.arch import BlockChoice, ConfigError, Slot
from psc_nas.ops.registry import families

Choice = str | int | float
Pick = Callable[[str], Any]


@dataclass(frozen=True)
class OpDomain:
    """Base of the family domains, itself the domain of a family searched without arguments
    (conv3d at 3x3x3, csn_ip, csn_ir). ``op`` is the family name used in configs and parameter names."""

    op: str

    @classmethod
    def parse(cls, op: str, raw: Mapping[str, Any], path: str) -> OpDomain:
        """The domain from the family's YAML arguments; errors are ``ConfigError``s at ``path``."""
        check_keys(raw, (), path)
        return cls(op)

    @property
    def params(self) -> dict[str, tuple[Choice, ...]]:
        return {}

    def decide(self, pick: Pick) -> tuple[Any, ...]:
        return ()

    def resolve(self, decision: tuple[Any, ...], slot: Slot) -> BlockChoice:
        return BlockChoice(self.op)


def parse_domain(op: str, raw: Any, path: str) -> OpDomain:
    """The domain of family ``op`` from its YAML arguments (``null`` or ``{}`` for the defaults)."""
    known = families()
    if op not in known:
        raise ConfigError(path, f"unknown op; allowed: {sorted(known)}")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"arguments must be a mapping (or empty), got {raw!r}")
    return known[op].domain.parse(op, raw, path)


# ---------------------------------------------------------------------- helpers for domains
def check_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        message = f"unknown argument; allowed: {list(allowed)}" if allowed else "takes no arguments"
        raise ConfigError(f"{path}.{unknown[0]}", message)


def as_list(raw: Any, path: str) -> list[Any]:
    """A YAML scalar or list as a non-empty list without duplicates."""
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise ConfigError(path, "must not be empty")
    if len({repr(v) for v in values}) != len(values):
        raise ConfigError(path, f"has duplicates: {values}")
    return values


def int_choices(raw: Any, path: str, allowed: tuple[int, ...]) -> tuple[int, ...]:
    values = as_list(raw, path)
    for value in values:
        if isinstance(value, bool) or value not in allowed:
            raise ConfigError(path, f"values must be from {list(allowed)}, got {value!r}")
    return tuple(values)


def str_choices(raw: Any, path: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    values = as_list(raw, path)
    for value in values:
        if value not in allowed:
            raise ConfigError(path, f"values must be from {list(allowed)}, got {value!r}")
    return tuple(values)


def multipliers(raw: Any, path: str, rule: str) -> tuple[float, ...]:
    """Positive numbers as distinct floats; ``rule`` is the error's wording, e.g. what 1.0 means."""
    values = as_list(raw, path)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(path, f"{rule}, got {value!r}")
    floats = tuple(float(v) for v in values)
    if len(set(floats)) != len(floats):
        raise ConfigError(path, f"has duplicates: {values}")
    return floats

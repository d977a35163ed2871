"""psc-nas: neural architecture search over efficient replacements of 3D convolution.

The package's public face: it re-exports from the layers below and no module of the package
imports from it (``docs/architecture.md``, layers).

Names that need PyTorch load on first use (PEP 562), so that importing any ``psc_nas`` module, as
every console script does, costs no PyTorch import until it is needed: ``psc-search`` shows its
first line before PyTorch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError, as_config
from psc_nas.costs import Cost, format_count, parse_count

if TYPE_CHECKING:
    from psc_nas.nets import build_model, convert, cost, from_module, validate
    from psc_nas.weights import WeightsError, load_model

__version__ = "0.1.0"

_LAZY = {  # name -> the module it comes from, imported on first use
    "build_model": "psc_nas.nets",
    "convert": "psc_nas.nets",
    "cost": "psc_nas.nets",
    "from_module": "psc_nas.nets",
    "validate": "psc_nas.nets",
    "WeightsError": "psc_nas.weights",
    "load_model": "psc_nas.weights",
}

__all__ = [
    "ArchConfig",
    "BlockChoice",
    "ConfigError",
    "Cost",
    "as_config",
    "build_model",
    "convert",
    "cost",
    "format_count",
    "from_module",
    "load_model",
    "parse_count",
    "validate",
    "WeightsError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'psc_nas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

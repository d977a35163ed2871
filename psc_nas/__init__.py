"""psc-nas: neural architecture search over efficient replacements of 3D convolution.

The package's public face: it re-exports from the layers below and no module of the package
imports from it (``docs/architecture.md``, layers).
"""

from __future__ import annotations

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError, as_config
from psc_nas.costs import Cost, format_count, parse_count
from psc_nas.nets import build_model, convert, cost, from_module, validate
from psc_nas.weights import WeightsError, load_model

__version__ = "0.1.0"

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

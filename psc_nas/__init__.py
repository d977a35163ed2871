"""psc-nas: neural architecture search over efficient replacements of 3D convolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError
from psc_nas.costs import Cost, format_count, parse_count

__version__ = "0.1.0"


def as_config(config: ArchConfig | str | Path | Mapping[str, Any]) -> ArchConfig:
    """An ArchConfig from itself, a YAML/JSON file path, or a plain mapping."""
    if isinstance(config, ArchConfig):
        return config
    if isinstance(config, Mapping):
        return ArchConfig.from_dict(config)
    return ArchConfig.load(config)


def build_model(config: ArchConfig | str | Path | Mapping[str, Any]) -> nn.Module:
    """Build the network an ArchConfig (or a config file) describes."""
    from psc_nas.nets import get_backbone

    config = as_config(config).validate()
    return get_backbone(config.backbone).build(config)


def cost(obj: Any, input_shape: Sequence[int]) -> Cost:
    """Exact (params, MACs) of an ArchConfig, an op spec or an op/net module, for one sample.

    ``input_shape`` may be (D, H, W), (C, D, H, W) or (N, C, D, H, W); only D, H, W matter.
    """
    spatial = tuple(int(s) for s in input_shape[-3:])
    if isinstance(obj, (ArchConfig, str, Path, Mapping)):
        from psc_nas.nets import get_backbone

        config = as_config(obj).validate()
        return get_backbone(config.backbone).cost(config, spatial)
    if hasattr(obj, "cost"):
        return obj.cost(spatial)
    raise TypeError(f"cannot price {type(obj).__name__}: expected an ArchConfig, an op spec or a psc-nas module")


__all__ = ["ArchConfig", "BlockChoice", "ConfigError", "Cost", "build_model", "cost", "format_count", "parse_count"]

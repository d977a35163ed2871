"""A config checked against its backbone, built into a network, and priced without building it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from psc_nas.arch import ArchConfig, ConfigError, as_config
from psc_nas.costs import Cost
from psc_nas.nets.registry import get_backbone

Configish = ArchConfig | str | Path | Mapping[str, Any]


def validate(config: ArchConfig) -> ArchConfig:
    """``config`` itself once its backbone accepts it: hparams, slot count and every op's arguments.

    Raises ``ConfigError`` naming the bad field (``blocks[3]: cakes: ...``).
    """
    get_backbone(config.backbone, path="backbone").validate(config)
    return config


def validated(config: Configish) -> ArchConfig:
    """A validated ArchConfig from itself, a YAML/JSON file (errors name the file) or a mapping."""
    if isinstance(config, (str, Path)):
        loaded = ArchConfig.load(config)
        try:
            return validate(loaded)
        except ConfigError as err:
            raise err.within(config) from None
    return validate(as_config(config))


def build_model(config: Configish) -> nn.Module:
    """Build the network an ArchConfig (or a config file) describes."""
    config = validated(config)
    return get_backbone(config.backbone).build(config)


def build_with_fill(config: ArchConfig, fill: Any) -> nn.Module:
    """``config``'s network with every slot's module made by ``fill(index, specs, build)`` (the hook a
    super-network's switchable slots use); one ``ValueError`` line for a backbone without the hook."""
    try:
        return get_backbone(config.backbone).build(config, fill=fill)
    except TypeError as err:
        raise ValueError(
            f"backbone {config.backbone} cannot build a super-network (no slot-fill hook): {err}"
        ) from None


def cost(obj: Any, input_shape: Sequence[int]) -> Cost:
    """Exact (params, MACs) of an ArchConfig, an op spec or an op/net module, for one sample.

    ``input_shape`` may be (D, H, W), (C, D, H, W) or (N, C, D, H, W); only D, H, W matter.
    """
    spatial = tuple(int(s) for s in input_shape[-3:])
    if isinstance(obj, (ArchConfig, str, Path, Mapping)):
        config = validated(obj)
        return get_backbone(config.backbone).cost(config, spatial)
    if hasattr(obj, "cost"):
        return obj.cost(spatial)
    raise TypeError(f"cannot price {type(obj).__name__}: expected an ArchConfig, an op spec or a psc-nas module")

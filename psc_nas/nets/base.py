"""What every backbone provides.

A backbone declares its searchable *slots* (``psc_nas.arch.Slot``: one 3D conv, or a run of
consecutive 3D convs with no pooling between) from its hyper-parameters alone, so spaces can be
sampled and priced without building a module; ``psc_nas.ops.realize`` turns the choice for a slot
into the op specs that fill it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError, Slot
from psc_nas.costs import Cost, Spatial
from psc_nas.ops import realize


class Backbone:
    """Base of the backbones; subclasses set ``name``/``defaults`` and implement the three hooks."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]

    def hparams(self, given: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ConfigError(f"hparams.{unknown[0]}", f"unknown for {self.name}; allowed: {sorted(self.defaults)}")
        return {**self.defaults, **given}

    def slots(self, hparams: Mapping[str, Any]) -> list[Slot]:
        raise NotImplementedError

    def build(self, config: ArchConfig, *, fill: Any = None) -> nn.Module:
        """The network; ``fill(index, specs, build)`` (``nets._layers.SlotFill``), when given, makes what
        fills each slot instead of ``build(specs)`` (a super-network's switchable slots)."""
        raise NotImplementedError

    def cost(self, config: ArchConfig, spatial: Spatial) -> Cost:
        """Exact params and MACs for one sample of spatial size ``spatial``, without a forward pass."""
        raise NotImplementedError

    def validate(self, config: ArchConfig) -> None:
        if config.backbone != self.name:
            raise ConfigError("backbone", f"config is for {config.backbone!r}, not {self.name!r}")
        slots = self.slots(self.hparams(config.hparams))
        if len(config.blocks) != len(slots):
            given = len(config.blocks)
            raise ConfigError("blocks", f"{self.name} has {len(slots)} searchable slots, the config gives {given}")
        for index, (slot, block) in enumerate(zip(slots, config.blocks)):
            try:
                realize(slot, block)
            except (ValueError, TypeError) as err:  # TypeError: a value of the wrong kind a family did not check
                where = f"slot {slot.name}: {slot.in_channels}->{slot.out_channels}"
                text = str(err) if isinstance(err, ValueError) else f"{block.op}: invalid argument ({err})"
                raise ConfigError(f"blocks[{index}]", f"{text} ({where})") from None

    def uniform(self, choice: BlockChoice, **hparams: Any) -> ArchConfig:
        """Config with the same choice in every slot (what the papers' hand-designed networks do)."""
        merged = self.hparams(hparams)
        return ArchConfig(self.name, merged, tuple(choice for _ in self.slots(merged)))

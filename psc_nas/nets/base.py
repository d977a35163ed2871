"""What every backbone provides, and how a slot's BlockChoice becomes operator specs.

A backbone declares its searchable *slots* (one 3D conv, or a run of consecutive 3D convs with no
pooling between) from its hyper-parameters alone, so spaces can be sampled and priced without
building a module. ``realize`` turns the choice for a slot into the op specs that fill it:

- a PmSCn choice with n > 1 in a slot of several convs replaces the whole run jointly (the
  paper's P2SC2 for a UNet double conv or a ResNet basic pair);
- any other choice replaces each conv of the run one to one, the backbone keeping its own
  normalization and activation between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError
from psc_nas.costs import Cost, Spatial
from psc_nas.ops import OpSpec, make_spec
from psc_nas.ops._conv import Triple


@dataclass(frozen=True)
class Slot:
    name: str
    in_channels: int
    out_channels: int
    stride: Triple = (1, 1, 1)
    convs: int = 1  # consecutive 3D convs this slot stands for (2 for a double conv)


def realize(slot: Slot, choice: BlockChoice) -> list[OpSpec]:
    """Op specs filling ``slot`` under ``choice``; raises ``ValueError`` for invalid arguments."""
    args = dict(choice.args)
    joint = choice.op == "pmscn" and args.get("n", 1) > 1 and slot.convs > 1
    first = make_spec(choice.op, slot.in_channels, slot.out_channels, stride=slot.stride, **args)
    if joint:
        return [first]
    rest = [make_spec(choice.op, slot.out_channels, slot.out_channels, **args) for _ in range(slot.convs - 1)]
    return [first, *rest]


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

    def build(self, config: ArchConfig) -> nn.Module:
        raise NotImplementedError

    def cost(self, config: ArchConfig, spatial: Spatial) -> Cost:
        """Exact params and MACs for one sample of spatial size ``spatial``, without a forward pass."""
        raise NotImplementedError

    def validate(self, config: ArchConfig) -> None:
        if config.backbone != self.name:
            raise ConfigError("backbone", f"config is for {config.backbone!r}, not {self.name!r}")
        slots = self.slots(self.hparams(config.hparams))
        if len(config.blocks) != len(slots):
            raise ConfigError("blocks", f"{self.name} has {len(slots)} searchable slots, the config gives {len(config.blocks)}")
        for index, (slot, block) in enumerate(zip(slots, config.blocks)):
            try:
                realize(slot, block)
            except ValueError as err:
                raise ConfigError(f"blocks[{index}]", f"{err} (slot {slot.name}: {slot.in_channels}->{slot.out_channels})") from None

    def uniform(self, choice: BlockChoice, **hparams: Any) -> ArchConfig:
        """Config with the same choice in every slot (what the papers' hand-designed networks do)."""
        merged = self.hparams(hparams)
        return ArchConfig(self.name, merged, tuple(choice for _ in self.slots(merged)))

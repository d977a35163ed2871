"""Backbones built from an ArchConfig; every 3D conv slot is searchable."""

from __future__ import annotations

from psc_nas.arch import ConfigError
from psc_nas.nets.base import Backbone, Slot, realize

BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> Backbone:
    BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name: str, *, path: str = "backbone") -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(path, f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name]


# Imported last: each module registers its backbone through register_backbone above.
from psc_nas.nets import densenet3d, resnet3d, unet3d  # noqa: F401
from psc_nas.nets.budget import fit_to_budget

__all__ = ["BACKBONES", "Backbone", "Slot", "fit_to_budget", "get_backbone", "realize", "register_backbone"]

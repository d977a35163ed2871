"""The registry of backbones: each backbone module registers one ``Backbone`` instance.

Built-in backbones are the modules of ``psc_nas.nets``, imported with the package (no hand-kept
list); third-party ones call ``register_backbone`` from a plugin module (``psc_nas.plugins``),
loaded the first time the registry is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psc_nas.arch import ConfigError
from psc_nas.plugins import load_plugins

if TYPE_CHECKING:
    from psc_nas.nets.base import Backbone

BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> Backbone:
    """Add ``backbone``; a name another backbone already has raises ``ValueError``."""
    known = BACKBONES.get(backbone.name)
    if known is not None and known is not backbone:
        raise ValueError(f"backbone {backbone.name!r} is already registered (by {type(known).__module__})")
    BACKBONES[backbone.name] = backbone
    return backbone


def backbones() -> dict[str, Backbone]:
    """Every registered backbone by name, plugins included."""
    load_plugins()
    return dict(BACKBONES)


def get_backbone(name: str, *, path: str = "backbone") -> Backbone:
    """The backbone called ``name``; unknown names raise ``ConfigError`` at ``path``."""
    load_plugins()
    if name not in BACKBONES:
        raise ConfigError(path, f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name]

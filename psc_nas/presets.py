"""The papers' hand-designed networks: one choice repeated in every slot of a backbone.

Each family declares its own presets in its ``OpFamily`` record (``conv3d``; PmSCn's ``p1sc1``,
``p2sc2``, ``p2sc3``; ``csn_ip``, ``csn_ir``; ``cakes_uniform``); this module gathers them.
``PRESETS`` reads the registry when used, so plugin families' presets are in it.
"""

from __future__ import annotations

from typing import Any

from psc_nas.arch import ArchConfig, BlockChoice
from psc_nas.nets import Backbone, get_backbone, validate
from psc_nas.ops import families


def presets() -> dict[str, BlockChoice]:
    """Every registered family's presets, name -> the choice repeated in every slot."""
    found = {}
    for family in families().values():
        found.update({name: BlockChoice(family.name, args) for name, args in family.presets.items()})
    return found


def preset_config(name: str, backbone: str | Backbone, **hparams: Any) -> ArchConfig:
    """The validated config of preset ``name`` on ``backbone``; unknown names raise ``ValueError``."""
    known = presets()
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; known: {list(known)}")
    if isinstance(backbone, str):
        backbone = get_backbone(backbone)
    return validate(backbone.uniform(known[name], **hparams))


def __getattr__(name: str) -> Any:
    if name == "PRESETS":  # computed on use: the registry is complete only once plugins are loaded
        return presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The papers' hand-designed networks: one choice repeated in every slot of a backbone.

- ``conv3d``: the 3D baseline.
- ``p1sc1``: PmSCn m=1, n=1, i.e. (2+1)D: 2D over H×W then 1D over D.
- ``p2sc2``, ``p2sc3``: PmSCn with two streams (1x3x3, 3x1x3) and n=2 / n=3 2D convs per stream.
  Where a slot is a run of convs (UNet double conv, ResNet basic pair) n>1 replaces the run
  jointly; in DenseNet every slot is one conv and n applies to it (``nets.base.realize``).
- ``csn_ip``, ``csn_ir``: interaction-preserved / interaction-reduced channel-separated convs.
- ``cakes_uniform``: CAKES's manual setting, output channels spread evenly over the seven shapes.

Orientations are written out so a preset equals the config a search space resolves for the same
choice (spaces always name them).
"""

from __future__ import annotations

from typing import Any

from psc_nas.arch import ArchConfig, BlockChoice
from psc_nas.nets import Backbone, get_backbone

PRESETS: dict[str, BlockChoice] = {
    "conv3d": BlockChoice("conv3d"),
    "p1sc1": BlockChoice("pmscn", {"m": 1, "n": 1, "orientations": ["1x3x3"]}),
    "p2sc2": BlockChoice("pmscn", {"m": 2, "n": 2, "orientations": ["1x3x3", "3x1x3"]}),
    "p2sc3": BlockChoice("pmscn", {"m": 2, "n": 3, "orientations": ["1x3x3", "3x1x3"]}),
    "csn_ip": BlockChoice("csn_ip"),
    "csn_ir": BlockChoice("csn_ir"),
    "cakes_uniform": BlockChoice("cakes"),  # allocation None: uniform over the seven shapes per slot
}


def preset_config(name: str, backbone: str | Backbone, **hparams: Any) -> ArchConfig:
    """The validated config of preset ``name`` on ``backbone``; unknown names raise ``ValueError``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {list(PRESETS)}")
    if isinstance(backbone, str):
        backbone = get_backbone(backbone)
    return backbone.uniform(PRESETS[name], **hparams).validate()

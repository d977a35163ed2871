"""Fit a network to a budget: the widest version of a config whose exact cost stays within it.

The PSC paper sizes each PmSCn block so it costs what the 3D conv it replaces cost (eq. 5); this
is the same idea at network level. The width multiplier moves on a grid of ``1 / WIDTH_GRID``;
bisection on the analytic cost finds a width ``w`` with ``cost(w) <= budget < cost(w + 1/WIDTH_GRID)``.
Cost rises with width for every family but ``csn_ir`` (its group count, gcd(C_in, C_out), jumps
with the channel counts); configs using it still get a width at which one more step breaks the
budget, though a wider one may fit again.

Choices whose arguments count channels follow their slot's new width, as each family's ``rescale``
rule says (a CAKES allocation in proportion, an explicit ``mid_channels`` with the slot).
"""

from __future__ import annotations

from collections.abc import Sequence

from psc_nas.arch import ArchConfig
from psc_nas.nets.registry import get_backbone
from psc_nas.ops import rescale

WIDTH_GRID = 1000  # widths are multiples of 0.001
MAX_WIDTH = 64


def fit_to_budget(
    config: ArchConfig, *, params: int | None = None, macs: int | None = None, input_shape: Sequence[int]
) -> ArchConfig:
    """``config`` at the largest width on the grid whose cost fits ``params`` and/or ``macs``.

    ``input_shape`` is (D, H, W) or ends with it; MACs are for one sample of that size. Raises
    ``ValueError`` when even the narrowest network, or no width up to ``MAX_WIDTH``, matches the budget.
    """
    if params is None and macs is None:
        raise ValueError("fit_to_budget needs a budget: params=, macs= or both")
    backbone = get_backbone(config.backbone)
    backbone.validate(config)
    depth, height, width = (int(s) for s in input_shape[-3:])
    spatial = (depth, height, width)

    def fits(steps: int) -> bool:
        return backbone.cost(with_width(config, steps / WIDTH_GRID), spatial).fits(params=params, macs=macs)

    if not fits(1):
        narrowest = backbone.cost(with_width(config, 1 / WIDTH_GRID), spatial)
        raise ValueError(f"budget too small: the narrowest {config.backbone} already costs {narrowest}")
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
        if high > MAX_WIDTH * WIDTH_GRID:
            raise ValueError(f"budget too large: {config.backbone} fits it even at width {MAX_WIDTH}")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return with_width(config, low / WIDTH_GRID)


def with_width(config: ArchConfig, width: float) -> ArchConfig:
    """``config`` at width multiplier ``width``, its channel-counting choices following their slots."""
    backbone = get_backbone(config.backbone)
    hparams = {**config.hparams, "width": width}
    old, new = backbone.slots(config.hparams), backbone.slots(hparams)
    return ArchConfig(config.backbone, hparams, tuple(map(rescale, config.blocks, old, new)))

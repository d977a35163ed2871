"""What a ``BlockChoice`` means, as its family's record says: the specs filling a slot, its label, its
arguments at another width.

``realize`` turns the choice for a slot into the op specs that fill it: a family whose ``joint``
rule holds (PmSCn with n > 1 in a slot of several convs, the paper's P2SC2 for a UNet double conv)
replaces the slot's whole run with one op; any other choice replaces each conv of the run one to
one, the backbone keeping its own normalization and activation between them.
"""

from __future__ import annotations

from psc_nas.arch import ArchConfig, BlockChoice, Slot
from psc_nas.ops.base import OpSpec, make_spec
from psc_nas.ops.registry import families, get_family


def realize(slot: Slot, choice: BlockChoice) -> list[OpSpec]:
    """Op specs filling ``slot`` under ``choice``; raises ``ValueError`` for invalid arguments."""
    args = dict(choice.args)
    first = make_spec(choice.op, slot.in_channels, slot.out_channels, stride=slot.stride, **args)
    if slot.convs > 1 and get_family(choice.op).joint(args, slot):
        return [first]
    rest = [make_spec(choice.op, slot.out_channels, slot.out_channels, **args) for _ in range(slot.convs - 1)]
    return [first, *rest]


def label(choice: BlockChoice) -> str:
    """Short human name, e.g. ``pmscn(m=2,n=2)``; a family that is not installed shows its bare name."""
    family = families().get(choice.op)
    shown = [key for key in choice.args if family is not None and key in family.label_args]
    inner = ",".join(f"{key}={choice.to_dict()[key]}" for key in shown)
    return f"{choice.op}({inner})" if inner else choice.op


def summary(config: ArchConfig) -> str:
    """One line per run of equal choices, e.g. ``densenet3d: 20×pmscn(m=2,n=2)``."""
    runs: list[list] = []
    for block in config.blocks:
        if runs and runs[-1][0] == block:
            runs[-1][1] += 1
        else:
            runs.append([block, 1])
    body = ", ".join(f"{count}×{label(block)}" if count > 1 else label(block) for block, count in runs)
    return f"{config.backbone}: {body}"


def rescale(choice: BlockChoice, old: Slot, new: Slot) -> BlockChoice:
    """``choice`` for slot ``old`` resized to ``new``: arguments that count channels follow the slot."""
    return BlockChoice(choice.op, get_family(choice.op).rescale(dict(choice.args), old, new))

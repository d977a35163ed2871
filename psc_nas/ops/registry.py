"""The registry of op families: each family's module registers one ``OpFamily`` record.

The record is everything psc-nas knows about a family; nothing outside the family's module names
it. Built-in families are the modules of ``psc_nas.ops``, imported with the package (no hand-kept
list); a third-party family is a module that calls ``register_family`` and is loaded as a plugin
(``$PSC_NAS_PLUGINS`` or a ``psc_nas.plugins`` entry point, see ``psc_nas.plugins``) the first time
the registry is read.

    FAMILY = register_family(OpFamily(spec=GhostSpec, domain=GhostDomain, label_args=("kernel",)))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psc_nas.arch import Slot
from psc_nas.plugins import load_plugins

if TYPE_CHECKING:
    from psc_nas.ops.base import OpSpec
    from psc_nas.ops.domain import OpDomain


def replaces_each_conv(args: Mapping[str, Any], slot: Slot) -> bool:
    """The default ``joint`` rule: one op per conv of a slot's run, never one op for the whole run."""
    return False


def keeps_arguments(args: dict[str, Any], old: Slot, new: Slot) -> dict[str, Any]:
    """The default ``rescale`` rule: arguments that count no channels stay as they are."""
    return args


@dataclass(frozen=True)
class OpFamily:
    """One op family, declared in its own module.

    - ``spec``: the frozen ``OpSpec`` subclass: arguments and their checks, exact cost, the module
      (a ``ConvGraph`` or any module of exact cost), the measured fast implementation, the
      dashboard's drawing;
    - ``domain``: the ``OpDomain`` subclass that reads the family's arguments in a search-space YAML;
    - ``label_args``: the arguments a one-line summary shows, ``pmscn(m=2,n=2)``;
    - ``joint(args, slot)``: whether one op replaces a slot's whole run of ``slot.convs`` convs
      (otherwise each conv is replaced one to one);
    - ``rescale(args, old, new)``: the arguments when ``fit_to_budget`` resizes the slot ``old`` to
      ``new`` (arguments that count channels must follow);
    - ``presets``: the papers' hand-designed networks of this family, name -> arguments, each
      repeated in every slot of a backbone.
    """

    spec: type[OpSpec]
    domain: type[OpDomain]
    label_args: tuple[str, ...] = ()
    joint: Callable[[Mapping[str, Any], Slot], bool] = replaces_each_conv
    rescale: Callable[[dict[str, Any], Slot, Slot], dict[str, Any]] = keeps_arguments
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.family


FAMILIES: dict[str, OpFamily] = {}


def register_family(family: OpFamily) -> OpFamily:
    """Add ``family``; a name or preset name already taken by another family raises ``ValueError``."""
    known = FAMILIES.get(family.name)
    if known is not None and known is not family:
        raise ValueError(f"op family {family.name!r} is already registered (by {known.spec.__module__})")
    for other in FAMILIES.values():
        taken = sorted(set(other.presets) & set(family.presets)) if other is not family else []
        if taken:
            raise ValueError(f"op family {family.name!r}: preset {taken[0]!r} is already family {other.name!r}'s")
    FAMILIES[family.name] = family
    return family


def families() -> dict[str, OpFamily]:
    """Every registered family by name, plugins included."""
    load_plugins()
    return dict(FAMILIES)


def get_family(name: str) -> OpFamily:
    """The family called ``name``; unknown names raise ``ValueError`` listing the known ones."""
    load_plugins()
    if name not in FAMILIES:
        raise ValueError(f"op must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]

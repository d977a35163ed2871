"""Search spaces: which op families (and which of their arguments) each slot of a backbone may take.

A space is a YAML file (``search_spaces/*.yaml``, schema in ``docs/architecture.md``) read into a
``SearchSpace``. Its slots are cut into *units*, each one decision: a single slot, or a group of
slots sharing one choice (a dense block, a stage). ``decide(ask)`` is the define-by-run core: it asks
``<unit>.op`` and then only the parameters of the chosen op, and returns the ``ArchConfig``. Optuna
(``sample(trial)``) and NNI (``to_nni().freeze(sample)``) both drive that one function, so they
produce the same configs from the same answers.

    b3.op = pmscn ─► b3.pmscn.m = 2 ─► b3.pmscn.n = 1 ─► b3.pmscn.m2.orientations = 1x3x3+3x1x3
                                                      ─► b3.pmscn.width = 0.5
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError, Slot
from psc_nas.nets import get_backbone
from psc_nas.nets.torch_module import space_backbone
from psc_nas.ops import Choice, OpDomain, parse_domain, realize
from psc_nas.presets import preset_config
from psc_nas.presets import presets as all_presets

if TYPE_CHECKING:
    import optuna

    from psc_nas.space_nni import NniArchSpace

Ask = Callable[[str, tuple[Choice, ...]], Choice]
T = TypeVar("T")

_SPACE_KEYS = ("name", "description", "task", "backbone", "hparams", "blocks")
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Unit:
    """One decision: ``label`` prefixes its parameter names; ``ops_path`` is where its ops are written."""

    label: str
    slots: tuple[int, ...]
    domains: Mapping[str, OpDomain]
    ops_path: str


@dataclass(frozen=True, eq=False)
class SearchSpace:
    name: str
    source: str  # the file it came from, as error messages name it
    task: str  # the task it searches for; the task fixes the input size everything is priced at
    backbone: str
    hparams: Mapping[str, Any]
    slots: tuple[Slot, ...]
    units: tuple[Unit, ...]
    option_counts: tuple[int, ...]  # distinct resolved choices per unit
    description: str = ""

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, name_or_path: str | Path, *, hparams: Mapping[str, Any] | None = None) -> SearchSpace:
        """A shipped space by name (``ibsr_densenet3d``) or a YAML file; ``hparams`` override the file's."""
        path = _locate(name_or_path)
        source = _display(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ConfigError("", f"cannot read {source}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(source, f"not valid YAML: {err}") from None
        if isinstance(data, dict) and hparams:
            data = {**data, "hparams": {**(data.get("hparams") or {}), **hparams}}
        return cls.from_dict(data, source=source, default_name=path.stem)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<space>", default_name: str = "space") -> SearchSpace:
        try:
            return cls._parse(data, source, default_name)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err.path}" if err.path else source, err.message) from None

    @classmethod
    def _parse(cls, data: Any, source: str, default_name: str) -> SearchSpace:
        if not isinstance(data, Mapping):
            raise ConfigError("", f"a search space must be a mapping with keys {list(_SPACE_KEYS)}")
        if "input_size" in data:
            raise ConfigError("input_size", "no longer part of a space: its task sets the input size now; remove it")
        unknown = sorted(set(data) - set(_SPACE_KEYS))
        if unknown:
            raise ConfigError(unknown[0], f"unknown key; allowed: {list(_SPACE_KEYS)}")
        raw_backbone = data.get("backbone")
        if not isinstance(raw_backbone, (str, Mapping)):
            raise ConfigError(
                "backbone", f"required, a backbone name or {{module: import.path, args: {{...}}}}; got {raw_backbone!r}"
            )
        given = data.get("hparams") or {}
        if not isinstance(given, Mapping):
            raise ConfigError("hparams", f"must be a mapping, got {given!r}")
        if not isinstance(data.get("task"), str):
            raise ConfigError("task", f"required, the name of the task the space is for; got {data.get('task')!r}")
        if isinstance(raw_backbone, Mapping):  # bring your own network (psc_nas/nets/torch_module.py)
            name, hparams = space_backbone(raw_backbone, given)
            backbone = get_backbone(name)
        else:
            backbone = get_backbone(raw_backbone)
            hparams = backbone.hparams(given)
        slots = tuple(backbone.slots(hparams))
        units = _parse_units(data.get("blocks"), slots)
        return cls(
            name=str(data.get("name", default_name)),
            source=source,
            task=data["task"],
            backbone=backbone.name,
            hparams=hparams,
            slots=slots,
            units=units,
            option_counts=tuple(_count_options(unit, slots) for unit in units),
            description=str(data.get("description", "")),
        )

    # ------------------------------------------------------------------ sampling
    def decide(self, ask: Ask) -> ArchConfig:
        """The config ``ask(name, choices)`` picks; only parameters of chosen ops are asked.

        Parameters with a single choice are never asked, so they do not clutter trial records.
        """

        def pick(name: str, choices: tuple[Choice, ...]) -> Choice:
            return choices[0] if len(choices) == 1 else ask(name, choices)

        blocks: list[BlockChoice | None] = [None] * len(self.slots)
        for unit in self.units:
            op = str(pick(f"{unit.label}.op", tuple(unit.domains)))
            domain = unit.domains[op]
            decision = domain.decide(lambda param: pick(f"{unit.label}.{op}.{param}", domain.params[param]))
            for index in unit.slots:
                blocks[index] = domain.resolve(decision, self.slots[index])
        return ArchConfig(self.backbone, dict(self.hparams), tuple(blocks))  # type: ignore[arg-type]

    def sample(self, trial: optuna.Trial) -> ArchConfig:
        """Define-by-run sampling through an Optuna trial (parameters such as ``b3.pmscn.m``)."""
        return self.decide(trial.suggest_categorical)  # type: ignore[arg-type]

    def parameters(self) -> dict[str, tuple[Choice, ...]]:
        """Every parameter ``decide`` may ask, with its choices (conditional ones included)."""
        found: dict[str, tuple[Choice, ...]] = {}
        for unit in self.units:
            found[f"{unit.label}.op"] = tuple(unit.domains)
            for op, domain in unit.domains.items():
                found.update({f"{unit.label}.{op}.{param}": choices for param, choices in domain.params.items()})
        return {name: choices for name, choices in found.items() if len(choices) > 1}

    def to_nni(self) -> NniArchSpace:
        """The space as NNI 3 mutables; ``.freeze(sample)`` gives the ArchConfig (needs the ``nni`` extra)."""
        from psc_nas.space_nni import NniArchSpace

        return NniArchSpace(self)

    # ------------------------------------------------------------------ describing
    def size(self) -> int:
        """Exact number of distinct ArchConfigs the space can produce.

        Units are disjoint, so this is the product over units of their distinct resolved choices
        (counted at load by resolving every decision of every op for the unit's slots).
        """
        return math.prod(self.option_counts)

    def presets(self) -> dict[str, ArchConfig]:
        """The papers' hand-designed networks on this space's backbone and hyper-parameters."""
        found = {}
        for name in all_presets():
            try:
                found[name] = preset_config(name, self.backbone, **self.hparams)
            except ConfigError:
                continue  # the preset does not fit some slot (e.g. m=2 streams for 1 output channel)
        return found


def _parse_units(raw: Any, slots: tuple[Slot, ...]) -> tuple[Unit, ...]:
    """Units from the ``blocks`` section; groups claim slots by name pattern, first match wins."""
    if not isinstance(raw, Mapping):
        raise ConfigError("blocks", f"required, a mapping with ops, share and optional groups; got {raw!r}")
    unknown = sorted(set(raw) - {"ops", "share", "groups"})
    if unknown:
        raise ConfigError(f"blocks.{unknown[0]}", "unknown key; allowed: ['groups', 'ops', 'share']")
    default_ops = _parse_ops(raw["ops"], "blocks.ops") if "ops" in raw else None
    default_share = _share(raw.get("share", False), "blocks.share")
    groups = raw.get("groups", [{"slots": "*"}])
    if not isinstance(groups, list) or not groups:
        raise ConfigError("blocks.groups", f"must be a non-empty list of groups, got {groups!r}")

    unclaimed = list(range(len(slots)))
    units: list[Unit] = []
    for number, group in enumerate(groups):
        path = f"blocks.groups[{number}]" if "groups" in raw else "blocks"
        if not isinstance(group, Mapping):
            raise ConfigError(path, f"a group must be a mapping with slots, share, ops, name; got {group!r}")
        unknown = sorted(set(group) - {"name", "slots", "share", "ops"})
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}", "unknown key; allowed: ['name', 'ops', 'share', 'slots']")
        patterns = group.get("slots", "*")
        patterns = patterns if isinstance(patterns, list) else [patterns]
        if not all(isinstance(p, str) for p in patterns):
            raise ConfigError(
                f"{path}.slots", f"must be slot-name patterns such as 'block1.*', got {group.get('slots')!r}"
            )
        members = tuple(i for i in unclaimed if any(fnmatchcase(slots[i].name, p) for p in patterns))
        if not members:
            names = [slots[i].name for i in unclaimed]
            raise ConfigError(f"{path}.slots", f"{patterns} matches no slot left unclaimed; those are {names}")
        unclaimed = [i for i in unclaimed if i not in members]
        if "ops" in group:
            domains, ops_path = _parse_ops(group["ops"], f"{path}.ops"), f"{path}.ops"
        elif default_ops is not None:
            domains, ops_path = default_ops, "blocks.ops"
        else:
            raise ConfigError(f"{path}.ops", "required here (or as blocks.ops for every group)")
        if _share(group.get("share", default_share), f"{path}.share"):
            label = group.get("name", f"g{number}")
            units.append(Unit(_unit_label(label, units, f"{path}.name"), members, domains, ops_path))
        else:
            units += [Unit(f"b{i}", (i,), domains, ops_path) for i in members]
    if unclaimed:
        raise ConfigError(
            "blocks.groups", f"slots {[slots[i].name for i in unclaimed]} are in no group; end with slots: '*'"
        )
    return tuple(sorted(units, key=lambda unit: unit.slots[0]))


def _parse_ops(raw: Any, path: str) -> dict[str, OpDomain]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            path,
            f"must map op families to their argument domains, e.g. {{conv3d: {{}}, pmscn: {{m: [1, 2]}}}}; got {raw!r}",
        )
    domains = {}
    for op, args in raw.items():
        try:
            domains[op] = parse_domain(op, args, f"{path}.{op}")
        except TypeError as err:  # a value of a kind the family's parser did not check for
            raise ConfigError(f"{path}.{op}", f"invalid argument domain ({err}): {args!r}") from None
    return domains


def _share(raw: Any, path: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(path, f"must be true (one decision for the group) or false (one per slot), got {raw!r}")
    return raw


def _unit_label(label: Any, units: list[Unit], path: str) -> str:
    if not isinstance(label, str) or not _LABEL.fullmatch(label) or re.fullmatch(r"b\d+", label):
        raise ConfigError(path, f"must be an identifier (not b<number>, kept for single slots), got {label!r}")
    if any(unit.label == label for unit in units):
        raise ConfigError(path, f"{label!r} names two groups")
    return label


# ---------------------------------------------------------------------- counting and validation
def replay_all(run: Callable[[Ask], T]) -> list[T]:
    """Every result of the define-by-run ``run(ask)``, replaying it once along each branch of answers.

    ``replay_all(space.decide)`` lists a (small) space's configs; conditional questions are
    followed only where they are asked.
    """
    results, pending = [], [()]
    while pending:
        forced: tuple[int, ...] = pending.pop()
        taken: list[int] = []

        def ask(name: str, choices: tuple[Choice, ...]) -> Choice:
            if len(taken) < len(forced):
                index = forced[len(taken)]
            else:
                index = 0
                pending.extend((*taken, other) for other in range(1, len(choices)))
            taken.append(index)
            return choices[index]

        results.append(run(ask))
    return results


def _all_decisions(domain: OpDomain) -> list[tuple[Any, ...]]:
    return replay_all(lambda ask: domain.decide(lambda param: ask(param, domain.params[param])))


def _count_options(unit: Unit, slots: tuple[Slot, ...]) -> int:
    """Distinct per-slot choice tuples of ``unit``; raises naming the op whose arguments a slot rejects."""
    distinct = set()
    for op, domain in unit.domains.items():
        for decision in _all_decisions(domain):
            choices = tuple(domain.resolve(decision, slots[i]) for i in unit.slots)
            for index, choice in zip(unit.slots, choices):
                problem = _misfit(slots[index], choice)
                if problem:
                    raise ConfigError(f"{unit.ops_path}.{op}", f"{problem} (slot {slots[index].name})")
            distinct.add(choices)
    return len(distinct)


@cache
def _misfit(slot: Slot, choice: BlockChoice) -> str | None:
    try:
        realize(slot, choice)
    except ValueError as err:
        return str(err)
    return None


# ---------------------------------------------------------------------- shipped spaces
def shipped_dir() -> Path | None:
    """Where the shipped ``search_spaces/*.yaml`` are.

    A checkout or editable install reads the repository's top-level ``search_spaces/``; a wheel
    installs them as data files under ``<prefix>/share/psc-nas/search_spaces/``, and the package
    sits in ``<prefix>/lib/pythonX.Y/site-packages/`` (``<prefix>/Lib/site-packages/`` on Windows).
    """
    package = Path(__file__).resolve().parent
    if (package.parent / "pyproject.toml").is_file() and (package.parent / "search_spaces").is_dir():
        return package.parent / "search_spaces"
    for prefix in package.parents[1:4]:
        installed = prefix / "share" / "psc-nas" / "search_spaces"
        if installed.is_dir():
            return installed
    return None


def shipped_spaces() -> dict[str, Path]:
    """Shipped space names (file stems) and their files."""
    folder = shipped_dir()
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))} if folder else {}


def _locate(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_spaces()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise ConfigError(
        "", f"no search space {str(name_or_path)!r}: not a file and not a shipped space {sorted(shipped)}"
    )


def _display(path: Path) -> str:
    """Shipped files as ``search_spaces/x.yaml``, others as given."""
    folder = shipped_dir()
    return f"search_spaces/{path.name}" if folder and path.resolve().parent == folder.resolve() else str(path)

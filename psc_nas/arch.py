"""ArchConfig: the one serializable description of a network.

Sampling produces it, the cost model prices it, a trial trains it, the study stores it (JSON in
trial attributes), the dashboard shows it, export writes it (YAML/JSON) and ``build_model()``
rebuilds it. A config is a backbone name, the backbone's fixed hyper-parameters, and one
``BlockChoice`` per searchable slot of that backbone, in the backbone's slot order.

    backbone: densenet3d
    hparams: {in_channels: 1, num_classes: 4, growth_rate: 16}
    blocks:
      - {op: pmscn, m: 2, n: 2, orientations: [1x3x3, 3x1x3]}
      - {op: conv3d}
      ...

Parsing here is structural (keys, types, schema version); whether the blocks fit the backbone's
slots and each op's arguments is checked one layer up, by ``psc_nas.nets.validate(config)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from psc_nas.files import write_text_atomic

SCHEMA_VERSION = 1
Triple = tuple[int, int, int]


class ConfigError(ValueError):
    """A config that cannot describe a network; the message names the path of the bad field."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def within(self, source: str | Path) -> ConfigError:
        """The same error located in file ``source``: ``config.yaml:blocks[3]: ...``."""
        return ConfigError(f"{source}:{self.path}" if self.path else str(source), self.message)


@dataclass(frozen=True)
class Slot:
    """A searchable position of a backbone: one 3D conv, or a run of consecutive 3D convs with no
    pooling between (``convs`` > 1, e.g. a UNet double conv), from ``in_channels`` to ``out_channels``."""

    name: str
    in_channels: int
    out_channels: int
    stride: Triple = (1, 1, 1)
    convs: int = 1


def _freeze(value: Any) -> Any:
    """JSON-like value with lists turned into tuples so choices hash and compare by value."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _freeze(v) for k, v in value.items()}
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class BlockChoice:
    """The op family filling one slot, and its arguments (e.g. ``m``, ``n``, ``orientations``)."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", _freeze(self.args))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **_thaw(self.args)}

    @classmethod
    def from_dict(cls, data: Any, path: str = "block") -> BlockChoice:
        if isinstance(data, str):
            return cls(data)
        if not isinstance(data, Mapping) or "op" not in data:
            raise ConfigError(path, f"a block must be an op name or a mapping with an 'op' key, got {data!r}")
        if not isinstance(data["op"], str):
            raise ConfigError(f"{path}.op", f"must be a string, got {data['op']!r}")
        return cls(data["op"], {k: v for k, v in data.items() if k != "op"})


@dataclass(frozen=True)
class ArchConfig:
    backbone: str
    hparams: dict[str, Any]
    blocks: tuple[BlockChoice, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "hparams", _freeze(self.hparams))
        object.__setattr__(self, "blocks", tuple(self.blocks))

    def __hash__(self) -> int:
        return hash(self.hash)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "backbone": self.backbone,
            "hparams": _thaw(self.hparams),
            "blocks": [block.to_dict() for block in self.blocks],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @property
    def hash(self) -> str:
        """Stable content hash (12 hex digits): equal configs hash equal across runs and machines."""
        return hashlib.sha256(self.to_json(separators=(",", ":")).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: Any) -> ArchConfig:
        if not isinstance(data, Mapping):
            raise ConfigError("", f"an architecture config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"schema", "backbone", "hparams", "blocks"})
        if unknown:
            raise ConfigError(unknown[0], "unknown key; allowed: schema, backbone, hparams, blocks")
        if data.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            message = f"unsupported schema version {data['schema']!r} (this psc-nas reads {SCHEMA_VERSION})"
            raise ConfigError("schema", message)
        if not isinstance(data.get("backbone"), str):
            raise ConfigError("backbone", f"required, a backbone name; got {data.get('backbone')!r}")
        hparams = data.get("hparams", {})
        if not isinstance(hparams, Mapping):
            raise ConfigError("hparams", f"must be a mapping, got {hparams!r}")
        blocks = data.get("blocks")
        if not isinstance(blocks, list):
            raise ConfigError("blocks", f"required, a list with one choice per slot; got {blocks!r}")
        return cls(
            data["backbone"],
            dict(hparams),
            tuple(BlockChoice.from_dict(block, f"blocks[{i}]") for i, block in enumerate(blocks)),
        )

    @classmethod
    def from_json(cls, text: str) -> ArchConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError("", f"not valid JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, text: str) -> ArchConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError("", f"not valid YAML: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> ArchConfig:
        """Read a ``.yaml``/``.yml``/``.json`` config; errors name the file and the field."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError("", f"cannot read {path}: {err.strerror}") from None
        try:
            return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)
        except ConfigError as err:
            raise err.within(path) from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, self.to_json(indent=2) if path.suffix == ".json" else self.to_yaml())

    # ------------------------------------------------------------------ editing
    def with_blocks(self, blocks: list[BlockChoice] | tuple[BlockChoice, ...]) -> ArchConfig:
        return ArchConfig(self.backbone, dict(self.hparams), tuple(blocks))


def as_config(config: ArchConfig | str | Path | Mapping[str, Any]) -> ArchConfig:
    """An ArchConfig from itself, a YAML/JSON file path, or a plain mapping (parsed, not validated)."""
    if isinstance(config, ArchConfig):
        return config
    if isinstance(config, Mapping):
        return ArchConfig.from_dict(config)
    return ArchConfig.load(config)

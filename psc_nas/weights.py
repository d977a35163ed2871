"""Trained weights: keeping a network's state dict beside its config, and loading the network back.

    front/12.yaml       + front/12.weights.pt        a search's retrained front member (search.retrain)
    best.yaml           + best.weights.pt            the run's best network, when it was retrained
    export/trial-12.yaml + export/trial-12.weights.pt psc-export
    <psc-train run>/best.ckpt (+ config.yaml)        psc-train's best epoch, a Lightning checkpoint

A ``.weights.pt`` file is a plain ``state_dict`` of ``build_model(config)`` (``torch.save``), so
``build_model(config).load_state_dict(torch.load(path))`` reads it without psc-nas's help.
``load_model(path)`` takes any of the above (or a folder holding one of them) and returns the network
with its weights loaded strictly, in eval mode; every unusable file is one ``WeightsError`` line.
"""

from __future__ import annotations

import filecmp
import io
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from psc_nas.arch import ArchConfig
from psc_nas.files import write_bytes_atomic
from psc_nas.nets import build_model, validated

WEIGHTS_SUFFIX = ".weights.pt"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
CHECKPOINT_SUFFIX = ".ckpt"
CHECKPOINT_PREFIX = "net."  # psc_nas.train.TaskModule keeps the network as ``self.net``
FORMS = "a config (.yaml/.json) with CONFIG.weights.pt beside it, a .weights.pt, a psc-train .ckpt, or a folder of one"

State = dict[str, torch.Tensor]


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, or does not fit its network: one line."""


def weights_path(config_path: str | Path) -> Path:
    """Where the weights of the config at ``config_path`` live: ``front/12.yaml`` -> ``front/12.weights.pt``."""
    path = Path(config_path)
    return path.with_name(path.stem + WEIGHTS_SUFFIX)


def state_of(net: nn.Module) -> State:
    """A detached CPU copy of ``net``'s state dict, safe to keep while ``net`` trains on."""
    return {name: value.detach().to("cpu", copy=True) for name, value in net.state_dict().items()}


def save_weights(weights: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a module's state dict (or a state dict) to ``path`` atomically; readers never see half a file."""
    state = state_of(weights) if isinstance(weights, nn.Module) else dict(weights)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, buffer.getvalue())


def _load(path: Path, what: str) -> object:
    if not path.is_file():
        raise WeightsError(f"{path}: no such {what}" if not path.exists() else f"{path}: not a file")
    try:
        with warnings.catch_warnings():  # a stray pickle's protocol warning, before the real error below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, pickled code: all just "unreadable"
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"torch.load: {type(error).__name__}" + (f": {text[:200]}" if text else "")
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head == b"PK":  # torch.save's zip container, cut short or damaged
            reason = f"truncated or damaged; {reason}"
        elif head[:1] != b"\x80":  # neither a zip nor a pickle: never written by torch.save
            reason = f"not written by torch.save; {reason}"
        raise WeightsError(f"{path}: not a readable {what} ({reason})") from None


def _tensors(data: object) -> bool:
    return isinstance(data, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    )


def read_weights(path: str | Path) -> State:
    """The state dict saved at ``path``; ``WeightsError`` when it is missing or not a state dict."""
    path = Path(path)
    data = _load(path, "weights file")
    if not _tensors(data) or not data:
        raise WeightsError(f"{path}: holds no state dict (names -> tensors, as torch.save(model.state_dict()) writes)")
    return dict(data)  # type: ignore[arg-type]


def read_checkpoint(path: str | Path) -> tuple[ArchConfig, State]:
    """The architecture and network weights of a psc-train checkpoint (``best.ckpt``)."""
    path = Path(path)
    data = _load(path, "checkpoint")
    hparams = data.get("hyper_parameters") if isinstance(data, Mapping) else None
    state = data.get("state_dict") if isinstance(data, Mapping) else None
    if not isinstance(hparams, Mapping) or "arch" not in hparams or not _tensors(state):
        raise WeightsError(f"{path}: not a psc-train checkpoint (no architecture or no network weights in it)")
    net = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in state.items() if k.startswith(CHECKPOINT_PREFIX)}  # type: ignore[union-attr]
    if not net:
        raise WeightsError(f"{path}: not a psc-train checkpoint (no network weights in it)")
    try:
        config = validated(hparams["arch"])
    except ValueError as error:
        raise WeightsError(f"{path}: its architecture is not valid: {error}") from None
    return config, net


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Load ``state`` into ``model`` strictly; a mismatch is one line naming what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        if shapes:
            first = shapes[0]
            parts.append(
                f"{len(shapes)} of another shape ({first}: {list(state[first].shape)} in the file, "
                f"{list(own[first].shape)} in the network)"
            )
        raise WeightsError(f"{source}: the weights do not fit the network: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model


def _config_beside(weights: Path) -> Path:
    stem = weights.name[: -len(WEIGHTS_SUFFIX)]
    for suffix in CONFIG_SUFFIXES:
        if (candidate := weights.with_name(stem + suffix)).is_file():
            return candidate
    raise WeightsError(f"{weights}: no config beside it ({stem}.yaml or {stem}.json)")


def _from_folder(folder: Path) -> Path:
    """The one loadable thing in ``folder``: psc-train's best.ckpt, else the one config with weights."""
    if (folder / "best.ckpt").is_file():
        return folder / "best.ckpt"
    pairs = sorted(p for p in folder.iterdir() if p.suffix in CONFIG_SUFFIXES and weights_path(p).is_file())
    if len(pairs) == 1:
        return pairs[0]
    if pairs:
        names = ", ".join(p.name for p in pairs)
        raise WeightsError(f"{folder} holds {len(pairs)} networks with weights ({names}); give one of them")
    if (folder / "best.yaml").is_file() and (folder / "pareto.json").is_file():
        raise WeightsError(
            f"{folder}: this search run's best.yaml was not retrained, so it has no weights "
            "(psc-export RUN --retrain trains it)"
        )
    configs = [p.name for p in folder.iterdir() if p.suffix in CONFIG_SUFFIXES]
    if configs:
        raise WeightsError(
            f"{folder}: no trained weights beside {', '.join(sorted(configs))} "
            f"(expected {weights_path(sorted(configs)[0]).name}); build_model(config) gives the untrained network"
        )
    raise WeightsError(f"{folder}: nothing to load in it; expected {FORMS}")


def load_model(path: str | Path, weights: str | Path | None = None) -> nn.Module:
    """The trained network at ``path``, its weights loaded strictly, in eval mode.

    ``path``: a config (``.yaml``/``.json``) whose weights are ``<stem>.weights.pt`` beside it (or
    ``weights``), a ``.weights.pt`` whose config is beside it, a psc-train checkpoint (``best.ckpt``),
    or a folder holding exactly one of these (an export folder, a psc-train run, a search run whose
    best network was retrained). Raises ``WeightsError`` (a ``ValueError``) with one line otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if path.is_dir():
        path = _from_folder(path)
    if path.suffix == CHECKPOINT_SUFFIX:
        if weights is not None:
            raise WeightsError(f"{path}: a checkpoint carries its own weights; leave out weights=")
        config, state = read_checkpoint(path)
        source: Path = path
    else:
        if path.name.endswith(WEIGHTS_SUFFIX):
            path, weights = _config_beside(path), weights or path
        if path.suffix not in CONFIG_SUFFIXES:
            raise WeightsError(f"{path}: cannot load a network from it; expected {FORMS}")
        config = validated(path)
        source = Path(weights) if weights is not None else weights_path(path)
        if weights is None and not source.exists():
            raise WeightsError(
                f"{path}: no trained weights beside it (expected {source.name}); "
                "build_model(path) gives the untrained network"
            )
        state = read_weights(source)
    model = build_model(config)
    load_state(model, state, source)
    return model.eval()


def copy_weights(source: str | Path | None, target: str | Path) -> Path | None:
    """Make ``target`` a copy of the weights file ``source`` (atomically, only when it differs); with no
    ``source`` (or a missing one) remove ``target``, so a copy never outlives what it copied."""
    target = Path(target)
    if source is None or not Path(source).is_file():
        target.unlink(missing_ok=True)
        return None
    if target.is_file() and filecmp.cmp(source, target, shallow=True):
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copy2(source, partial)  # keeps the modification time: the shallow comparison above holds next time
    partial.replace(target)
    return target

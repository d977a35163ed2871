"""Bring your own network: any PyTorch module as a backbone whose 3x3x3 ``Conv3d`` layers are slots.

    net = from_module(monai.networks.nets.BasicUNet, spatial_dims=3, in_channels=1, out_channels=4,
                      features=(8, 8, 16, 32, 64, 8))
    net.slots                                   # one Slot per eligible conv, named by its module path
    config = net.uniform(BlockChoice("pmscn", {"m": 2, "n": 1}))   # an ArchConfig (backbone "module")
    net.cost(config, (1, 32, 32, 32))           # exact params and MACs, no forward pass of the network
    build_model(config)                         # the BasicUNet with every eligible conv replaced

    psc_nas.convert(model, op="pmscn", m=2)     # the same for a module instance, in one call

**Eligible convs.** A layer becomes a slot when it is an ``nn.Conv3d`` (or a subclass that keeps its
forward, like torchvision's ``Conv3DSimple``) with kernel 3x3x3, ``groups=1``, dilation 1 and zero
padding 1 on every side (``padding=1`` or ``"same"``), any stride. Those are exactly the convs every
op family replaces with the same output size (families pad "same" and take the stride). Others stay
as they are, each with its reason in ``ModuleNet.skipped``: grouped and depthwise convs (already a
factorised conv), dilated ones (no family dilates, the receptive field would shrink), other kernel
sizes or paddings, non-zero padding modes. A conv's bias stays: the op is followed by a learnable
per-channel bias where the original conv had one (zeros in a fresh build, the conv's own
bias in ``convert``), so the all-``conv3d`` config has
exactly the original network's parameters. Every slot is one conv (``Slot.convs == 1``).

**The rest of the network** is built by the module's own constructor and stays as it is: norms,
activations, transposed convs, attention, heads. Replaced slots start from their op's own
initialization; ``convert`` of an instance keeps the instance's weights everywhere else.

**Exact cost.** ``cost`` adds the slots' ops, priced analytically by their specs like every
backbone's slots (``OpSpec.cost_and_shape`` at the input size each slot sees), to the fixed
layers' cost: their parameters (``sum(p.numel())`` outside the slots) and their MACs from one
shape-only ``FlopCounterMode`` pass of the original network on the meta device per input size
(cached; no data, no compute; a forward that reads values runs once on the CPU instead), minus the
original convs' analytic MACs. The input's channels are the first 3D conv's (in module order). The network is traced in
eval mode, so layers used only in training (deep-supervision heads) cost parameters but no MACs.
The sum equals ``sum(p.numel())`` and ``FlopCounterMode`` FLOPs / 2 of the built network
(``tests/test_from_module.py``). No width multiplier: ``args`` size the network.

**Configs.** ``ArchConfig(backbone="module", hparams={"module": "monai.networks.nets.BasicUNet",
"args": {...}}, blocks=[...])`` round-trips through YAML/JSON and ``build_model``; a space YAML says
``backbone: {module: monai.networks.nets.BasicUNet, args: {...}}``. Building from a file imports
and calls the named object, so ``module`` must be under an allowed prefix: ``monai.networks.nets.``,
``torchvision.models.``, those in ``$PSC_NAS_MODULES`` (comma-separated) or added by
``allow_module``; ``from_module(factory)`` in Python allows its own factory for the process.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import import_module
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from psc_nas.arch import ArchConfig, BlockChoice, ConfigError, Slot
from psc_nas.costs import Cost, Spatial
from psc_nas.nets.base import Backbone
from psc_nas.nets.registry import get_backbone, register_backbone
from psc_nas.ops import Op, realize
from psc_nas.ops._conv import ConvSpec

NAME = "module"
ENV_VAR = "PSC_NAS_MODULES"
ALLOWED = ["monai.networks.nets.", "torchvision.models."]
_KEYS = ("module", "args")


def allow_module(prefix: str) -> None:
    """Let configs and spaces build modules whose import path starts with ``prefix`` (this process)."""
    if prefix not in ALLOWED:
        ALLOWED.append(prefix)


def allowed_prefixes() -> list[str]:
    extra = [p.strip() for p in os.environ.get(ENV_VAR, "").split(",") if p.strip()]
    return [*ALLOWED, *extra]


def ineligible(conv: nn.Module) -> str | None:
    """Why ``conv`` is not a slot, or None when it is (module docstring: eligible convs)."""
    if not isinstance(conv, nn.Conv3d):
        return "not a Conv3d"
    if type(conv).forward is not nn.Conv3d.forward or type(conv)._conv_forward is not nn.Conv3d._conv_forward:
        return f"{type(conv).__name__} overrides Conv3d's forward"
    if tuple(conv.kernel_size) != (3, 3, 3):
        return f"kernel {'x'.join(map(str, conv.kernel_size))}, not 3x3x3"
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise convs stay)"
    if tuple(conv.dilation) != (1, 1, 1):
        return f"dilation {tuple(conv.dilation)} (no family dilates)"
    if conv.padding not in ("same", (1, 1, 1)):
        return f"padding {conv.padding} (families pad 1 per side)"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (families pad with zeros)"
    return None


class SlotConv(nn.Module):
    """What replaces an eligible conv: the op, plus the original conv's bias if it had one."""

    def __init__(self, op: nn.Module, bias_channels: int | None) -> None:
        super().__init__()
        self.op = op
        self.bias = nn.Parameter(torch.zeros(bias_channels)) if bias_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1, 1)


@dataclass(frozen=True)
class _Conv:
    """One eligible conv of the original network: where it is and what it was."""

    names: tuple[str, ...]  # every path to it (a shared conv is replaced at all of them)
    spec: ConvSpec
    bias: bool

    @property
    def slot(self) -> Slot:
        return Slot(self.names[0], self.spec.in_channels, self.spec.out_channels, stride=self.spec.stride)


@dataclass(frozen=True)
class _Trace:
    calls: tuple[tuple[Spatial, ...], ...]  # per slot, the input size of each call in one forward
    fixed_macs: int
    out_shape: tuple[int, ...]


class ModuleNet:
    """A PyTorch network seen as a backbone: slots, configs, exact cost, builds.

    Made by ``from_module``; ``hparams`` is None when it came from an instance (no config to save).
    """

    def __init__(self, make: Callable[[], nn.Module], *, hparams: dict[str, Any] | None, label: str) -> None:
        self._make = make
        self.hparams = hparams
        self.label = label
        self._template = _on_meta(make)
        self._template.eval()
        self._convs, self.skipped = _find_convs(self._template)
        if not self._convs:
            reasons = "; ".join(f"{name}: {why}" for name, why in self.skipped[:4]) or "it has no Conv3d"
            raise ValueError(f"{label} has no eligible 3x3x3 Conv3d to search ({reasons})")
        self.slots = [conv.slot for conv in self._convs]
        slot_params = sum(conv.spec.params + (conv.spec.out_channels if conv.bias else 0) for conv in self._convs)
        self.fixed_params = sum(p.numel() for p in self._template.parameters()) - slot_params
        self.in_channels = _first_in_channels(self._template)
        self._traces: dict[Spatial, _Trace] = {}

    def __repr__(self) -> str:
        return f"ModuleNet({self.label}: {len(self.slots)} slots, {len(self.skipped)} 3D convs kept)"

    # ------------------------------------------------------------------ configs
    def config(self, blocks: Sequence[BlockChoice | str | Mapping[str, Any]]) -> ArchConfig:
        """The ArchConfig with one choice per slot (``BlockChoice``, op name or ``{op: ..., ...}``)."""
        if self.hparams is None:
            raise ValueError(
                f"{self.label} was given as an instance, which a config cannot name: "
                "pass its class (or factory) and arguments to from_module to save configs"
            )
        choices = tuple(
            BlockChoice.from_dict(b, f"blocks[{i}]") if not isinstance(b, BlockChoice) else b
            for i, b in enumerate(blocks)
        )
        config = ArchConfig(NAME, self.hparams, choices)
        BACKBONE.validate(config)
        return config

    def uniform(self, choice: BlockChoice | str, **args: Any) -> ArchConfig:
        """Every slot takes ``choice`` (``uniform("pmscn", m=2)`` or a ``BlockChoice``)."""
        choice = BlockChoice(choice, args) if isinstance(choice, str) else choice
        return self.config([choice] * len(self.slots))

    def _blocks(self, config: ArchConfig | Sequence[BlockChoice]) -> tuple[BlockChoice, ...]:
        blocks = tuple(config.blocks if isinstance(config, ArchConfig) else config)
        if len(blocks) != len(self.slots):
            given = len(blocks)
            raise ConfigError(
                "blocks", f"{self.label} has {len(self.slots)} searchable slots, the config gives {given}"
            )
        return blocks

    def _specs(self, config: ArchConfig | Sequence[BlockChoice]) -> list[list[Op]]:
        specs = []
        for index, (slot, block) in enumerate(zip(self.slots, self._blocks(config))):
            try:
                specs.append(realize(slot, block))
            except (ValueError, TypeError) as err:
                where = f"slot {slot.name}: {slot.in_channels}->{slot.out_channels}"
                raise ConfigError(f"blocks[{index}]", f"{err} ({where})") from None
        return specs

    # ------------------------------------------------------------------ networks
    def build(self, config: ArchConfig | Sequence[BlockChoice], *, fill: Any = None, base: nn.Module | None = None):
        """The network with every slot filled by its choice; ``base`` (a module of this network) is
        copied instead of constructing a fresh one, so its other layers keep their weights."""
        specs = self._specs(config)
        model = copy.deepcopy(base) if base is not None else self._make()
        for index, (conv, ops) in enumerate(zip(self._convs, specs)):
            module = fill(index, ops, _build_run) if fill else _build_run(ops)
            replacement = SlotConv(module, conv.spec.out_channels if conv.bias else None)
            if base is not None and replacement.bias is not None:  # the original's bias, as it was
                replacement.bias.data.copy_(model.get_submodule(conv.names[0]).bias.data)
            for name in conv.names:
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, replacement)
        return model

    def cost(self, config: ArchConfig | Sequence[BlockChoice], input_shape: Sequence[int]) -> Cost:
        """Exact params and MACs for one sample; ``input_shape`` ends with (D, H, W)."""
        spatial: Spatial = tuple(int(s) for s in input_shape[-3:])  # type: ignore[assignment]
        trace = self.trace(spatial)
        total = Cost(self.fixed_params, trace.fixed_macs)
        for conv, ops, calls in zip(self._convs, self._specs(config), trace.calls):
            total += Cost(params=conv.spec.out_channels if conv.bias else 0)
            for op in ops:
                total += Cost(params=op.cost(calls[0] if calls else spatial).params)
            for shape in calls:
                wanted = conv.spec.out_spatial(shape)
                for op in ops:
                    layer, shape = op.cost_and_shape(shape)
                    total += Cost(macs=layer.macs)
                if shape != wanted:  # eligibility guarantees this; a family that breaks it is a bug
                    raise ValueError(f"{conv.names[0]}: {ops[0]} gives {shape}, the conv it replaces {wanted}")
        return total

    def trace(self, spatial: Spatial) -> _Trace:
        """Slot input sizes and the fixed layers' MACs at ``spatial``, from one meta-device pass (cached)."""
        if spatial not in self._traces:
            self._traces[spatial] = self._run_trace(spatial)
        return self._traces[spatial]

    def _run_trace(self, spatial: Spatial) -> _Trace:
        try:
            return self._trace_with(self._template, spatial)
        except Exception as err:
            error = err
        if _device(self._template).type == "meta":  # a forward that needs data (not only shapes): run it for real
            try:
                return self._trace_with(self._make().eval(), spatial)
            except Exception as err:
                error = err
        line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        shape = "x".join(map(str, (self.in_channels, *spatial)))
        raise ValueError(f"{self.label}: an input of {shape} does not fit the network: {line}") from None

    def _trace_with(self, model: nn.Module, spatial: Spatial) -> _Trace:
        calls: list[list[Spatial]] = [[] for _ in self._convs]
        hooks = []
        for index, conv in enumerate(self._convs):
            module = model.get_submodule(conv.names[0])
            hooks.append(
                module.register_forward_hook(
                    lambda _m, inputs, _o, index=index: calls[index].append(tuple(inputs[0].shape[2:]))
                )
            )
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                out = model(torch.zeros(1, self.in_channels, *spatial, device=_device(model)))
        finally:
            for hook in hooks:
                hook.remove()
        conv_macs = sum(conv.spec.cost(shape)[0].macs for conv, shapes in zip(self._convs, calls) for shape in shapes)
        out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        return _Trace(tuple(map(tuple, calls)), counter.get_total_flops() // 2 - conv_macs, out_shape)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _build_run(ops: Sequence[Op]) -> nn.Module:
    return ops[0].build() if len(ops) == 1 else nn.Sequential(*(op.build() for op in ops))


def _on_meta(make: Callable[[], nn.Module]) -> nn.Module:
    """The network on the meta device (shapes only); on the CPU where its constructor needs data."""
    try:
        with torch.device("meta"):
            return make()
    except Exception:
        return make()


def _find_convs(model: nn.Module) -> tuple[list[_Conv], list[tuple[str, str]]]:
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Conv3d) and name:
            paths.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    convs, skipped = [], []
    for key, names in paths.items():
        conv = modules[key]
        reason = ineligible(conv)
        if reason:
            skipped.append((names[0], reason))
            continue
        spec = ConvSpec(conv.in_channels, conv.out_channels, (3, 3, 3), tuple(conv.stride))  # type: ignore[arg-type]
        convs.append(_Conv(tuple(names), spec, conv.bias is not None))
    return convs, skipped


def _first_in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            return module.in_channels
    raise ValueError("cannot tell the network's input channels: it has no Conv3d")


# ---------------------------------------------------------------------- import paths
def _check_path(path: Any, *, allowed: bool) -> str:
    where = "hparams.module"
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(where, f"an import path such as monai.networks.nets.BasicUNet, got {path!r}")
    if allowed and not any(path.startswith(prefix) for prefix in allowed_prefixes()):
        raise ConfigError(
            where,
            f"{path} is not under an allowed prefix {allowed_prefixes()}; "
            f"set {ENV_VAR}={path} (comma-separated) or call psc_nas.nets.allow_module to build it",
        )
    return path


def _resolve(path: str) -> Callable[..., nn.Module]:
    """The object at import path ``path`` (``package.module.Name``); ConfigError at ``hparams.module``."""
    where = "hparams.module"
    module_path, _, attr = path.rpartition(".")
    try:
        found = getattr(import_module(module_path), attr)
    except ImportError as err:
        raise ConfigError(where, f"cannot import {module_path}: {err}") from None
    except AttributeError:
        raise ConfigError(where, f"module {module_path} has no {attr!r}") from None
    if not callable(found) or (isinstance(found, type) and not issubclass(found, nn.Module)):
        raise ConfigError(where, f"{path} is not a torch.nn.Module class or a function returning one")
    return found


def _plain_args(args: Any) -> dict[str, Any]:
    """``args`` as plain JSON values (lists, not tuples); ConfigError at ``hparams.args``."""
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise ConfigError("hparams.args", f"must be a mapping of keyword arguments, got {args!r}")
    try:
        return json.loads(json.dumps(dict(args)))
    except (TypeError, ValueError) as err:
        raise ConfigError("hparams.args", f"must be plain YAML/JSON values: {err}") from None


@lru_cache(maxsize=64)
def _net(path: str, args_json: str) -> ModuleNet:
    factory = _resolve(path)
    args = json.loads(args_json)
    short = path.rpartition(".")[2]

    def make() -> nn.Module:
        model = factory(**args)
        if not isinstance(model, nn.Module):
            raise ConfigError("hparams.module", f"{path}(...) returned {type(model).__name__}, not a torch.nn.Module")
        return model

    try:
        return ModuleNet(make, hparams={"module": path, "args": args}, label=path)
    except ConfigError:
        raise
    except TypeError as err:  # an argument the constructor does not take
        raise ConfigError("hparams.args", f"{short}: {err}") from None
    except Exception as err:  # the constructor's own check of a value, or no eligible conv
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        field = "hparams.module" if "no eligible" in text else "hparams.args"
        raise ConfigError(field, f"{short}(**args) failed: {text}" if field.endswith("args") else text) from None


def _import_path(obj: Any) -> str | None:
    """``obj``'s import path when importing it gives ``obj`` back."""
    path = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    module_path, _, attr = path.rpartition(".")
    try:
        return path if "<" not in path and getattr(import_module(module_path), attr) is obj else None
    except (ImportError, AttributeError, ValueError):
        return None


# ---------------------------------------------------------------------- public entry points
def from_module(module_or_factory: nn.Module | Callable[..., nn.Module] | str, /, **args: Any) -> ModuleNet:
    """A network whose eligible 3x3x3 ``Conv3d`` layers are searchable slots.

    ``module_or_factory``: a ``torch.nn.Module`` class or function returning one (``args`` are its
    keyword arguments; configs can be saved and rebuilt), its import path as a string, or a module
    instance (built by copying it, keeping its weights outside the slots; no config to save).
    """
    if isinstance(module_or_factory, nn.Module):
        if args:
            raise TypeError("from_module(instance) takes no arguments: the instance is already built")
        instance = module_or_factory
        return ModuleNet(lambda: copy.deepcopy(instance), hparams=None, label=type(instance).__name__)
    if isinstance(module_or_factory, str):
        path = module_or_factory  # named in Python code: the caller trusts it
    else:
        path = _import_path(module_or_factory)  # type: ignore[assignment]
        if path is None:
            raise ValueError(
                f"{module_or_factory!r} cannot be imported by name, so no config could rebuild it: "
                "define it at module level, or pass an instance"
            )
    try:
        _check_path(path, allowed=False)
        allow_module(path)
        return _net(path, json.dumps(_plain_args(args), sort_keys=True))
    except ConfigError as err:
        raise ValueError(f"from_module({path}): {err}") from None


def convert(model: nn.Module, op: str = "pmscn", **args: Any) -> nn.Module:
    """A copy of ``model`` with every eligible 3x3x3 ``Conv3d`` replaced by op family ``op`` with ``args``.

    The other layers keep their weights, the replaced convs their biases; the ops start from their
    own initialization. ``from_module(model).slots`` lists what is replaced,
    ``.skipped`` what is not and why. Raises ``ValueError`` naming the slot an argument does not fit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes a torch.nn.Module, got {type(model).__name__}")
    net = from_module(model)
    choice = BlockChoice(op, args)
    try:
        return net.build([choice] * len(net.slots), base=model)
    except ConfigError as err:
        raise ValueError(f"convert: {err.message}") from None


# ---------------------------------------------------------------------- the registered backbone
class ModuleBackbone(Backbone):
    """Backbone ``module``: hparams ``{module: import.path.Name, args: {...}}`` name the network."""

    name = NAME
    defaults = {"module": None, "args": {}}

    def net(self, hparams: Mapping[str, Any]) -> ModuleNet:
        if hparams.get("width", 1) != 1:  # with_width(config, 1.0), as a super-network narrows, is a no-op
            raise ConfigError(
                "hparams.width",
                f"a network of your own has no width multiplier (its args size it); got {hparams['width']!r}",
            )
        unknown = sorted(set(hparams) - {*_KEYS, "width"})
        if unknown:
            raise ConfigError(f"hparams.{unknown[0]}", f"unknown for {NAME}; allowed: {list(_KEYS)}")
        if hparams.get("module") is None:
            raise ConfigError(
                "hparams.module", "required: the import path of the network, e.g. monai.networks.nets.BasicUNet"
            )
        path = _check_path(hparams["module"], allowed=True)
        args = _plain_args(hparams.get("args") or {})
        return _net(path, json.dumps(args, sort_keys=True))

    def hparams(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.net(given).hparams or {})

    def slots(self, hparams: Mapping[str, Any]) -> list[Slot]:
        return list(self.net(hparams).slots)

    def validate(self, config: ArchConfig) -> None:
        if config.backbone != self.name:
            raise ConfigError("backbone", f"config is for {config.backbone!r}, not {self.name!r}")
        self.net(config.hparams)._specs(config)  # slot count and every choice, errors naming the network

    def build(self, config: ArchConfig, *, fill: Any = None) -> nn.Module:
        self.validate(config)
        return self.net(config.hparams).build(config, fill=fill)

    def check_task(self, hparams: Mapping[str, Any], input_shape: Sequence[int], reference: ArchConfig) -> None:
        """Raise ``ConfigError`` unless the network takes the task's input (C, D, H, W) and gives an
        output of the shape the task's own network (``reference``) gives."""
        net = self.net(hparams)
        channels, spatial = int(input_shape[0]), tuple(int(s) for s in input_shape[1:])
        if net.in_channels != channels:
            raise ConfigError(
                "backbone", f"{net.label} takes {net.in_channels} input channels, the task gives {channels}"
            )
        with torch.device("meta"):
            wanted = tuple(get_backbone(reference.backbone).build(reference).eval()(torch.zeros(1, *input_shape)).shape)
        try:
            got = net.trace(spatial).out_shape  # type: ignore[arg-type]
        except ValueError as err:
            raise ConfigError("backbone", str(err)) from None
        if got != wanted:
            shown = "x".join(map(str, (1, *input_shape)))
            raise ConfigError(
                "backbone",
                f"{net.label} gives an output of {'x'.join(map(str, got))} for an input of {shown}; "
                f"the task needs {'x'.join(map(str, wanted))} (set the network's output channels in args)",
            )

    def cost(self, config: ArchConfig, spatial: Spatial) -> Cost:
        self.validate(config)
        return self.net(config.hparams).cost(config, spatial)


def space_backbone(raw: Mapping[str, Any], hparams: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A space's ``backbone: {module: ..., args: {...}}`` as (backbone name, hparams), errors at ``backbone.*``."""
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"backbone.{unknown[0]}", f"unknown key; allowed: {list(_KEYS)}")
    if hparams:
        raise ConfigError("hparams", "not used with backbone: {module: ..., args: ...}; put the arguments in args")
    try:
        return NAME, BACKBONE.hparams({"module": raw.get("module"), "args": raw.get("args") or {}})
    except ConfigError as err:
        path = "backbone." + err.path.removeprefix("hparams.") if err.path.startswith("hparams.") else err.path
        raise ConfigError(path, err.message) from None


BACKBONE = register_backbone(ModuleBackbone())

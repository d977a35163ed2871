"""Bring your own network: MONAI's BasicUNet and UNet as backbones, cost exact, convert, YAML round trips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import search_standin
import torch
import yaml
from _families import block_choice
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.networks.nets import BasicUNet, UNet
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import psc_nas
from psc_nas import ArchConfig, BlockChoice, ConfigError, Cost
from psc_nas.evaluators.supernet import SuperNet
from psc_nas.nets import from_module
from psc_nas.nets.budget import with_width
from psc_nas.nets.torch_module import ENV_VAR, SlotConv
from psc_nas.ops import implementation
from psc_nas.search.budget import Budget
from psc_nas.search.record import read_trials
from psc_nas.search.runner import SearchSettings, run_search
from psc_nas.space import SearchSpace
from psc_nas.tasks import get_task
from psc_nas.weights import save_weights, weights_path

BASIC = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "features": [4, 4, 8, 8, 16, 4]}
UNET = {
    "spatial_dims": 3,
    "in_channels": 2,
    "out_channels": 3,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
}
NETS = {"basicunet": (BasicUNet, BASIC, (32, 32, 32)), "unet": (UNet, UNET, (16, 16, 16))}


@pytest.fixture(autouse=True, scope="module")
def mac_exact_ops() -> Iterator[None]:
    """Networks built here run the MAC-exact convs: these tests hold FlopCounterMode to the analytic cost, and
    the default rule may run CAKES as a merge that executes more (tests/test_ops_impl.py checks that count)."""
    with implementation("reference"):
        yield


def measured(model: nn.Module, x: torch.Tensor) -> tuple[Cost, torch.Tensor]:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y = model(x)
    return Cost(sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2), y


def test_slots_are_the_3x3x3_convs_and_the_rest_is_kept_with_a_reason():
    basic = from_module(BasicUNet, **BASIC)
    assert len(basic.slots) == 18  # two convs in each of 9 blocks
    assert basic.slots[0].name == "conv_0.conv_0.conv" and basic.slots[-1].name == "upcat_1.convs.conv_1.conv"
    assert basic.skipped == [("final_conv", "kernel 1x1x1, not 3x3x3")]
    unet = from_module(UNet, **UNET)
    strided = [(s.name, s.stride) for s in unet.slots if s.stride != (1, 1, 1)]
    assert strided == [
        ("model.0.conv.unit0.conv", (2, 2, 2)),
        ("model.0.residual", (2, 2, 2)),
        ("model.1.submodule.0.conv.unit0.conv", (2, 2, 2)),
        ("model.1.submodule.0.residual", (2, 2, 2)),
    ]
    assert len(unet.slots) == 7 and unet.skipped == [
        ("model.1.submodule.1.submodule.residual", "kernel 1x1x1, not 3x3x3")
    ]
    assert unet.slots[0].in_channels == 2 and unet.slots[0].out_channels == 4


@pytest.mark.parametrize("name", sorted(NETS))
def test_all_conv3d_is_the_original_network_exactly(name):
    factory, args, spatial = NETS[name]
    net = from_module(factory, **args)
    config = net.uniform("conv3d")
    x = torch.randn(1, args["in_channels"], *spatial)
    original, _ = measured(factory(**args), x)
    built, y = measured(psc_nas.build_model(config), x)
    assert psc_nas.cost(config, x.shape) == built == original
    assert tuple(y.shape) == (1, args["out_channels"], *spatial)


@pytest.mark.parametrize("name", sorted(NETS))
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_cost_is_exact_for_random_choices_of_every_family(name, data):
    factory, args, spatial = NETS[name]
    net = from_module(factory, **args)
    config = net.config([data.draw(block_choice(slot)) for slot in net.slots])
    scale = data.draw(st.sampled_from([1, 2]))  # two input sizes: each has its own trace
    shape = (1, args["in_channels"], *(s * scale for s in spatial))
    with torch.device("meta" if scale > 1 else "cpu"):  # the meta device counts shapes without computing
        cost, y = measured(psc_nas.build_model(config), torch.randn(shape))
    assert psc_nas.cost(config, shape) == net.cost(config, shape) == cost
    assert tuple(y.shape) == (1, args["out_channels"], *shape[2:])


def test_convert_swaps_every_eligible_conv_and_keeps_the_other_weights():
    torch.manual_seed(0)
    model = UNet(**UNET)
    converted = psc_nas.convert(model, op="pmscn", m=2, n=1)
    slots = [name for name, module in converted.named_modules() if isinstance(module, SlotConv)]
    assert slots == [slot.name for slot in from_module(UNet, **UNET).slots]
    kept = [name for name, module in converted.named_modules() if type(module) is nn.Conv3d and ".op." not in name]
    assert kept == ["model.1.submodule.1.submodule.residual"]
    before, after = model.state_dict(), converted.state_dict()
    fixed = [key for key in before if key in after]
    assert "model.2.0.conv.weight" in fixed and all(torch.equal(before[k], after[k]) for k in fixed)
    assert any(isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3) for m in model.modules())  # model untouched
    x = torch.randn(1, 2, 16, 16, 16)
    cost, y = measured(converted, x)
    reference = from_module(UNet, **UNET).uniform("pmscn", m=2, n=1)
    assert cost == psc_nas.cost(reference, x.shape) and tuple(y.shape) == (1, 3, 16, 16, 16)
    with pytest.raises(
        ValueError,
        match=r"^convert: pmscn: m must be one of \[1, 2, 3\], got 7 \(slot model.0.conv.unit0.conv: 2->4\)$",
    ):
        psc_nas.convert(model, op="pmscn", m=7)
    with pytest.raises(ValueError, match=r"^convert: op must be one of \['cakes', .*got 'nope' \(slot model.0.conv"):
        psc_nas.convert(model, op="nope")


def test_convert_with_conv3d_and_copied_weights_is_the_same_function():
    """A converted module's parameters load from a state dict: conv weights moved, biases kept."""
    torch.manual_seed(0)
    model = BasicUNet(**BASIC).eval()
    converted = psc_nas.convert(model, op="conv3d").eval()
    state = converted.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv3d) and module.kernel_size == (3, 3, 3):
            (weight,) = [k for k in state if k.startswith(f"{name}.op.") and k.endswith("weight")]
            state[weight] = module.weight.detach().clone()
            state[f"{name}.bias"] = module.bias.detach().clone()
    converted.load_state_dict(state)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


def test_config_round_trips_through_yaml_to_the_same_network(tmp_path: Path):
    net = from_module(BasicUNet, **BASIC)
    blocks = [BlockChoice("pmscn", {"m": 2, "n": 2}), BlockChoice("cakes"), BlockChoice("csn_ip")] * 6
    config = net.config(blocks)
    path = config.save(tmp_path / "byo.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["backbone"] == "module"
    assert data["hparams"] == {"module": "monai.networks.nets.basic_unet.BasicUNet", "args": BASIC}
    loaded = ArchConfig.load(path)
    assert loaded == config and loaded.hash == config.hash
    torch.manual_seed(1)
    first = psc_nas.build_model(path)
    torch.manual_seed(1)
    second = psc_nas.build_model(config)
    x = torch.randn(1, 1, 32, 32, 32)
    assert measured(first, x)[0] == measured(second, x)[0] == psc_nas.cost(path, x.shape)
    assert first.state_dict().keys() == second.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def write_space(tmp_path: Path, backbone: object, **extra: object) -> Path:
    ops = {"conv3d": {}, "pmscn": {"m": [1, 2], "n": [1, 2]}, "cakes": {"step": "1/2"}, "csn_ir": {}}
    groups = [{"name": "encoder", "slots": ["conv_0.*", "down_*"]}, {"slots": "*", "share": False}]
    space = {"task": "ibsr", "backbone": backbone, "blocks": {"share": True, "ops": ops, "groups": groups}, **extra}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_space_yaml_names_a_monai_network_and_samples_priced_configs(tmp_path: Path):
    path = write_space(tmp_path, {"module": "monai.networks.nets.BasicUNet", "args": BASIC})
    space = SearchSpace.load(path)
    assert space.backbone == "module" and len(space.slots) == 18
    assert len(space.units) == 1 + 8  # the encoder's 10 slots decide once, the 8 decoder slots each
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    x = torch.randn(1, 1, 32, 32, 32)
    for _ in range(2):
        config = space.sample(study.ask())
        saved = ArchConfig.load(config.save(tmp_path / f"{config.hash}.yaml"))
        assert saved == config
        assert measured(psc_nas.build_model(saved), x)[0] == psc_nas.cost(config, x.shape)
    presets = space.presets()
    assert {"conv3d", "csn_ir", "p2sc2"} <= set(presets)
    assert psc_nas.cost(presets["conv3d"], x.shape) == measured(BasicUNet(**BASIC), x)[0]


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        (
            {"module": "monai.networks.nets.NoSuchNet", "args": {}},
            r"backbone.module: module monai.networks.nets has no",
        ),
        ({"module": "os.system", "args": {"command": "true"}}, r"backbone.module: os.system is not under an allowed"),
        (
            {"module": "monai.networks.nets.BasicUNet", "args": {**BASIC, "depth": 3}},
            r"backbone.args: BasicUNet: .*depth",
        ),
        ({"module": "monai.networks.nets.BasicUNet", "args": {**BASIC, "features": [4]}}, r"backbone.args: BasicUNet"),
        ({"module": "monai.networks.nets.BasicUNet", "args": [1]}, r"backbone.args: must be a mapping"),
        ({"module": "monai.networks.nets.BasicUNet", "argz": {}}, r"backbone.argz: unknown key"),
        ({"module": "BasicUNet"}, r"backbone.module: an import path"),
        (
            {
                "module": "monai.networks.nets.AutoEncoder",
                "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [4], "strides": [2]},
            },
            r"backbone.module: .*no eligible 3x3x3 Conv3d",
        ),
    ],
)
def test_space_errors_name_the_backbone_field(tmp_path: Path, backbone, message):
    path = write_space(tmp_path, backbone)
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        SearchSpace.load(path)


def test_config_errors_name_the_field_and_input_sizes_the_network_refuses(tmp_path: Path):
    config = from_module(BasicUNet, **BASIC).uniform("conv3d").to_dict()
    config["hparams"]["module"] = "subprocess.run"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"^{path}:hparams.module: subprocess.run is not under an allowed prefix"):
        psc_nas.build_model(path)
    good = from_module(BasicUNet, **BASIC).uniform("conv3d")
    with pytest.raises(ConfigError, match="^blocks: .*BasicUNet has 18 searchable slots, the config gives 17"):
        psc_nas.validate(good.with_blocks(good.blocks[:-1]))
    # 16^3 pools to one voxel, which BasicUNet's instance norm refuses: its own words, in one line
    with pytest.raises(
        ValueError, match=r"^monai.*BasicUNet: an input of 1x16x16x16 does not fit the network: Expected"
    ):
        psc_nas.cost(good, (1, 16, 16, 16))
    with pytest.raises(ValueError, match="given as an instance"):
        from_module(BasicUNet(**BASIC)).uniform("conv3d")


class OddNet(nn.Module):
    """Convs a backbone must keep (depthwise, dilated, reflect-padded), one shared conv called twice,
    and one used only in training."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, channels, 3, padding=1)
        self.depthwise = nn.Conv3d(channels, channels, 3, padding=1, groups=channels)
        self.dilated = nn.Conv3d(channels, channels, 3, padding=2, dilation=2)
        self.reflect = nn.Conv3d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.shared = nn.Conv3d(channels, channels, 3, padding="same", bias=False)
        self.alias = self.shared
        self.down = nn.Conv3d(channels, channels, 3, stride=2, padding=1)
        self.aux = nn.Conv3d(channels, 2, 3, padding=1)
        self.head = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.reflect(self.dilated(self.depthwise(torch.relu(self.stem(x)))))
        h = self.down(self.alias(self.shared(h)))
        if self.training:
            h = h + self.aux(h).mean()
        return self.head(h.mean(dim=(2, 3, 4)))


def test_a_module_of_its_own_keeps_ineligible_convs_and_prices_shared_and_unused_ones(monkeypatch):
    path = f"{__name__}.OddNet"
    config = {"backbone": "module", "hparams": {"module": path, "args": {"channels": 6}}, "blocks": ["cakes"] * 4}
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match=rf"^hparams.module: {path} is not under an allowed prefix .*{ENV_VAR}"):
        psc_nas.build_model(config)
    monkeypatch.setenv(ENV_VAR, f"{__name__}.")
    net = psc_nas.nets.get_backbone("module").net(config["hparams"])
    assert [s.name for s in net.slots] == ["stem", "shared", "down", "aux"]
    assert [name for name, _ in net.skipped] == ["depthwise", "dilated", "reflect"]
    model = psc_nas.build_model(config)
    assert model.shared is model.alias and isinstance(model.shared, SlotConv) and model.shared.bias is None
    for spatial in [(8, 8, 8), (5, 7, 9)]:
        cost, y = measured(model, torch.randn(1, 1, *spatial))
        assert psc_nas.cost(config, spatial) == cost and tuple(y.shape) == (1, 2)


def test_a_task_takes_a_network_of_the_users_own_only_with_its_input_and_output(tmp_path: Path):
    task = get_task("ibsr")
    task.check_space(
        SearchSpace.load(write_space(tmp_path, {"module": "monai.networks.nets.BasicUNet", "args": BASIC}))
    )
    wrong = {**BASIC, "out_channels": 3}
    path = write_space(tmp_path, {"module": "monai.networks.nets.BasicUNet", "args": wrong})
    message = (
        rf"^{path}: backbone: monai.networks.nets.BasicUNet gives an output of 1x3x32x32x32 for an input of "
        r"1x1x32x32x32; the task needs 1x4x32x32x32 \(set the network's output channels in args\)$"
    )
    with pytest.raises(ConfigError, match=message):
        task.check_space(SearchSpace.load(path))
    path = write_space(tmp_path, {"module": "monai.networks.nets.BasicUNet", "args": {**BASIC, "in_channels": 2}})
    with pytest.raises(ConfigError, match=r"takes 2 input channels, the task gives 1$"):
        task.check_space(SearchSpace.load(path))


def test_a_search_over_a_monai_network_records_exact_costs_and_exports_a_rebuildable_best(tmp_path: Path):
    space = write_space(tmp_path, {"module": "monai.networks.nets.BasicUNet", "args": BASIC})
    out = tmp_path / "run"
    settings = SearchSettings(
        task="ibsr", budget=Budget(params=40_000), trials=4, out=out, retrain=False, space=str(space), prescreen="none"
    )
    run_search(settings, evaluator=search_standin.StandinEvaluator(), console=Console(quiet=True))
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    records = [r for r in read_trials(study) if r.arch is not None]
    assert len(records) == 4 and {r.arch["backbone"] for r in records} == {"module"}
    for record in records:
        expected = psc_nas.cost(ArchConfig.from_dict(record.arch), (32, 32, 32))
        assert (record.params, record.macs) == (expected.params, expected.macs)
    best = ArchConfig.load(out / "best.yaml")
    x = torch.randn(1, 1, 32, 32, 32)
    assert measured(psc_nas.build_model(best), x)[0] == psc_nas.cost(best, x.shape)


def test_a_super_network_switches_the_slots_of_a_monai_network_and_width_is_refused(tmp_path: Path):
    space = SearchSpace.load(write_space(tmp_path, {"module": "monai.networks.nets.BasicUNet", "args": BASIC}))
    supernet = SuperNet(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(2):
        supernet.activate(space.sample(study.ask()))
        assert tuple(supernet.net(torch.randn(1, 1, 32, 32, 32)).shape) == (1, 4, 32, 32, 32)
    config = space.decide(lambda name, choices: choices[0])
    with pytest.raises(ConfigError, match=r"^hparams.width: a network of your own has no width multiplier"):
        with_width(config, 0.5)


def test_torchvision_video_resnets_where_installed():
    """Not run where torchvision is missing (this repository's venv); r2plus1d_18 is (2+1)D already."""
    video = pytest.importorskip("torchvision.models.video")
    net = from_module(video.r3d_18, num_classes=5)
    assert len(net.slots) == 16 and net.in_channels == 3  # 4 stages x 2 blocks x 2 convs; stem and shortcuts kept
    config = net.uniform("pmscn", m=2, n=1)
    with torch.device("meta"):
        cost, y = measured(psc_nas.build_model(config), torch.zeros(1, 3, 8, 32, 32))
    assert psc_nas.cost(config, (3, 8, 32, 32)) == cost and tuple(y.shape) == (1, 5)
    with pytest.raises(ValueError, match="no eligible 3x3x3 Conv3d"):
        from_module(video.r2plus1d_18)


def test_psc_space_shows_the_network_and_psc_search_refuses_a_mismatched_one_in_one_line(tmp_path: Path):
    from typer.testing import CliRunner

    from psc_nas.cli import search_app, space_app

    path = write_space(tmp_path, {"module": "monai.networks.nets.BasicUNet", "args": BASIC})
    result = CliRunner().invoke(space_app, [str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "BasicUNet" in result.stdout and "down_4.convs.conv_1.conv" in result.stdout
    conv3d = psc_nas.cost(from_module(BasicUNet, **BASIC).uniform("conv3d"), (32, 32, 32))
    assert psc_nas.format_count(conv3d.params) in result.stdout
    bad = write_space(tmp_path, {"module": "monai.networks.nets.BasicUNet", "args": {**BASIC, "out_channels": 2}})
    out = tmp_path / "run"
    result = CliRunner().invoke(search_app, ["--task", "ibsr", "--space", str(bad), "--trials", "1", "--out", str(out)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "gives an output of 1x2x32x32x32" in result.stderr
    assert not out.exists()


class DataDependentNet(nn.Module):
    """A forward that reads values, which a shape-only (meta-device) pass cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.other = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.other(h) if bool(h.abs().sum() >= 0) else h


def test_a_forward_that_reads_values_is_traced_on_the_cpu_and_still_priced_exactly():
    net = from_module(DataDependentNet)
    config = net.uniform("cakes")
    cost, _ = measured(psc_nas.build_model(config), torch.randn(1, 1, 6, 7, 8))
    assert net.cost(config, (6, 7, 8)) == cost and cost.macs > 0


def test_load_model_reads_a_module_network_with_its_weights(tmp_path: Path):
    config = from_module(UNet, **UNET).uniform("pmscn", m=2, n=1)
    path = config.save(tmp_path / "unet.yaml")
    trained = psc_nas.build_model(config).eval()
    save_weights(trained, weights_path(path))
    loaded = psc_nas.load_model(path)
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)

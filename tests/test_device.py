import torch

from psc_nas.device import compute_device, to_device


def test_to_device_moves_every_tensor_of_a_batch_and_keeps_the_rest():
    batch = {"image": torch.ones(2, 1, 4, 4, 4), "label": torch.zeros(2, 4, 4, 4, dtype=torch.long), "name": ["a", "b"]}
    moved = to_device(batch, torch.device("meta"))
    assert moved["image"].device.type == "meta" and moved["label"].device.type == "meta"
    assert moved["label"].dtype == torch.long and moved["name"] == ["a", "b"]
    assert batch["image"].device.type == "cpu"  # the caller's batch is not changed


def test_compute_device_is_the_gpu_exactly_when_torch_sees_one():
    assert compute_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_place_on_the_cpu_puts_5d_weights_channels_last_and_keeps_values_and_outputs():
    import psc_nas
    from psc_nas.device import CPU_LAYOUT, place
    from psc_nas.presets import preset_config

    torch.manual_seed(0)
    net = psc_nas.build_model(preset_config("csn_ip", "densenet3d", width=0.25)).eval()
    extra = torch.nn.Conv2d(2, 3, 3)  # a 4-D weight: left as it is
    net.add_module("extra", extra)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net(x)
    params = list(net.parameters())
    assert place(net, torch.device("cpu")) is net
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]  # an optimizer's references stay valid
    five_d = [p for p in net.parameters() if p.dim() == 5]
    # the strides themselves: a 1x1x1 kernel's NCDHW strides pass is_contiguous(channels_last_3d) as well
    assert five_d and all(p.stride() == torch.empty(p.shape, memory_format=CPU_LAYOUT).stride() for p in five_d)
    assert extra.weight.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        got = net(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    fresh = psc_nas.build_model(preset_config("csn_ip", "densenet3d", width=0.25))
    fresh.add_module("extra", torch.nn.Conv2d(2, 3, 3))
    fresh.load_state_dict(net.state_dict())  # a state_dict saved from either layout loads into the other
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_place_elsewhere_only_moves():
    from psc_nas.device import place

    conv = torch.nn.Conv3d(2, 4, 3)
    place(conv, torch.device("meta"))
    assert conv.weight.device.type == "meta" and conv.weight.is_contiguous()

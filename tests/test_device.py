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

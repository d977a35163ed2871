"""Zero-cost proxies on real (tiny) networks and a real batch of the IBSR training data."""

from __future__ import annotations

import math

import pytest
import torch

from psc_nas.evaluators.zero_cost import PROXIES, proxy_score, proxy_scores, training_batch
from psc_nas.presets import preset_config
from psc_nas.tasks.ibsr import IBSRTask

TINY = {"width": 0.25, "num_blocks": 3, "layers_per_block": 2}


class SmallPatchIBSR(IBSRTask):
    input_shape = (1, 16, 16, 16)

    def datamodule(self, data_dir=None, *, seed=0, **options):
        return super().datamodule(data_dir, seed=seed, **{**options, "spacing": 4.0})


@pytest.fixture(scope="module")
def task():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SmallPatchIBSR()
    torch.set_num_threads(threads)  # the tests after this module's run at the machine's thread count


@pytest.fixture(scope="module")
def batch(task):
    return training_batch(task, seed=0)


def config(task, name):
    return preset_config(name, task.backbone, **task.backbone_hparams, **TINY)


def test_every_proxy_is_finite_repeatable_and_tells_architectures_apart(task, batch):
    first = proxy_scores(config(task, "p1sc1"), task, seed=0, batch=batch)
    assert set(first) == set(PROXIES)
    assert all(math.isfinite(value) for value in first.values()), first
    assert proxy_scores(config(task, "p1sc1"), task, seed=0, batch=batch) == first
    for name in ("grad_norm", "snip"):  # computed together by proxy_scores, alone by proxy_score
        assert proxy_score(name, config(task, "p1sc1"), task, seed=0, batch=batch) == pytest.approx(first[name])
    other = proxy_scores(config(task, "csn_ip"), task, seed=0, batch=batch)
    assert all(other[name] != first[name] for name in PROXIES)


def test_the_seed_changes_the_initialisation(task, batch):
    net = config(task, "conv3d")
    assert proxy_score("snip", net, task, seed=0, batch=batch) != proxy_score("snip", net, task, seed=1, batch=batch)


def test_more_weights_more_synflow(task, batch):
    narrow = preset_config("conv3d", task.backbone, **task.backbone_hparams, **{**TINY, "width": 0.125})
    assert proxy_score("synflow", config(task, "conv3d"), task, batch=batch) > proxy_score(
        "synflow", narrow, task, batch=batch
    )


def test_unknown_proxy(task, batch):
    with pytest.raises(ValueError, match="unknown zero-cost proxy 'jacob'; known: grad_norm"):
        proxy_score("jacob", config(task, "conv3d"), task, batch=batch)


def test_the_random_control_is_fixed_by_architecture_and_seed_and_knows_nothing_else(task, batch):
    conv, csn = config(task, "conv3d"), config(task, "csn_ir")
    score = proxy_score("random", conv, task, seed=0, batch=batch)
    assert 0.0 <= score < 1.0 and proxy_score("random", conv, task, seed=0, batch=batch) == score
    assert proxy_score("random", conv, task, seed=1, batch=batch) != score
    assert proxy_score("random", csn, task, seed=0, batch=batch) != score
    scores = [proxy_score("random", conv, task, seed=s, batch=batch) for s in range(200)]
    assert 0.4 < sum(scores) / len(scores) < 0.6 and len(set(scores)) == 200  # uniform-looking, no repeats


def test_zico_is_its_definition_over_the_two_half_batches(task, batch):
    """zico's one-pass form equals Σ_layers log Σ_w mean|g_w| / std g_w (torch.std, Bessel) of the two
    half-batches' gradients, on a real network and batch."""
    from psc_nas.evaluators.zero_cost import _loss_grads, zico
    from psc_nas.nets import build_model

    arch = config(task, "csn_ip")
    halves = [
        {k: v[s] if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for s in (slice(0, 2), slice(2, 4))
    ]
    torch.manual_seed(0)
    net = build_model(arch).train()
    grads = [_loss_grads(net, task, half) for half in halves]
    expected = 0.0
    for pair in zip(*grads):
        stacked = torch.stack([g.flatten() for g in pair]).double()
        std, mean_abs = stacked.std(dim=0), stacked.abs().mean(dim=0)
        value = float((mean_abs[std > 0] / std[std > 0]).sum())
        expected += math.log(value) if value > 0 else 0.0
    torch.manual_seed(0)
    assert zico(build_model(arch).train(), task, batch) == pytest.approx(expected, rel=1e-6)

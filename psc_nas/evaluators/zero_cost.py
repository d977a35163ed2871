"""Zero-cost proxies: a score for an untrained network from one or two batches, no training.

The proxies of the zero-cost NAS literature, adapted to any task (the task's loss, input and data):

    grad_norm  Σ ‖∂L/∂W‖ over conv and linear weights (Abdelfattah et al. 2021)
    snip       Σ |W ⊙ ∂L/∂W| (Lee et al. 2019, as a network score in Abdelfattah et al.)
    synflow    Σ W ⊙ ∂R/∂W with R = Σ f(1) of the network with |W|, in float64, BN in eval mode (Tanaka et al. 2020)
    naswot     log|K_H|, K_H the Hamming-agreement kernel of the ReLU on/off codes of a batch (Mellor et al. 2021)
    zico       Σ_layers log(Σ_w mean|g_w| / std g_w) over per-batch gradients of two batches (Li et al. 2023)

and one control that is no proxy: ``random``, a number in [0, 1) fixed by the architecture's hash and the seed and
unrelated to its quality, computed without building the network: what a proxy, or a pre-screen built on one, must
beat.

Each is a ranking signal, larger = predicted better. Whether it ranks architectures of a space better than
their parameter count does is measured, not assumed: benchmarks/fidelity.py (docs/benchmarks/fidelity.md).
The weights are initialised from ``seed``; the batch comes from the task's training data with that seed. The
network and batch go where the search trains (``psc_nas.device.compute_device``: a GPU when there is one).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from psc_nas.arch import ArchConfig
from psc_nas.device import compute_device, place, to_device
from psc_nas.nets import build_model
from psc_nas.tasks import Batch, Task, get_task

PROXIES = ("grad_norm", "snip", "synflow", "naswot", "zico")
CONTROLS = ("random",)  # scored like a proxy, knowing nothing
BATCH = 4  # samples in the scoring batch (two halves of 2 for zico)


def training_batch(task: Task, *, seed: int, batch_size: int = BATCH, data_dir: Any = None, **options: Any) -> Batch:
    """One batch of the task's training data, fixed by ``seed``; ``options`` are more of the task's data options
    (e.g. IBSR's ``patch_size``)."""
    datamodule = task.datamodule(
        data_dir=data_dir, seed=seed, samples_per_epoch=batch_size, batch_size=batch_size, **options
    )
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def _weights(net: nn.Module) -> list[nn.Parameter]:
    return [
        m.weight
        for m in net.modules()
        if isinstance(m, (nn.Conv3d, nn.Conv2d, nn.Conv1d, nn.Linear)) and m.weight.requires_grad
    ]


def _loss_grads(net: nn.Module, task: Task, batch: Batch) -> list[torch.Tensor]:
    net.zero_grad(set_to_none=True)
    task.loss()(net(batch[task.input_key]), batch).backward()
    return [w.grad if w.grad is not None else torch.zeros_like(w) for w in _weights(net)]


def grad_norm(net: nn.Module, task: Task, batch: Batch) -> float:
    return float(sum(g.norm() for g in _loss_grads(net, task, batch)))


def snip(net: nn.Module, task: Task, batch: Batch) -> float:
    grads = _loss_grads(net, task, batch)
    return float(sum((w.detach() * g).abs().sum() for w, g in zip(_weights(net), grads)))


@torch.no_grad()
def _signs_to_abs(net: nn.Module) -> dict[str, torch.Tensor]:
    signs = {}
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point():
            signs[name] = torch.sign(tensor)
            tensor.abs_()
    return signs


def synflow(net: nn.Module, task: Task, batch: Batch) -> float:
    net = net.double().eval()  # eval: BN uses its initial statistics (an affine map), as in the reference code
    _signs_to_abs(net)
    inputs = batch[task.input_key]
    net.zero_grad(set_to_none=True)
    net(torch.ones((1, *inputs.shape[1:]), dtype=torch.float64, device=inputs.device)).sum().backward()
    total = sum(float((w.detach() * w.grad).sum()) for w in _weights(net) if w.grad is not None)
    return math.log(total) if total > 0 else float("-inf")


@torch.no_grad()
def naswot(net: nn.Module, task: Task, batch: Batch) -> float:
    inputs = batch[task.input_key]
    n = inputs.shape[0]
    kernel = torch.zeros((n, n), dtype=torch.float64, device=inputs.device)

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        codes = (output.reshape(n, -1) > 0).to(torch.float64)
        kernel.add_(codes @ codes.T + (1 - codes) @ (1 - codes).T)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    try:
        net(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return float(torch.linalg.slogdet(kernel)[1])


def zico(net: nn.Module, task: Task, batch: Batch) -> float:
    inputs = batch[task.input_key]
    half = inputs.shape[0] // 2
    if half < 1:
        raise ValueError("zico needs at least 2 samples")
    parts = [
        {k: (v[:half] if i == 0 else v[half:]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for i in range(2)
    ]
    first, second = (_loss_grads(net, task, part) for part in parts)
    score = 0.0
    for a, b in zip(first, second):
        value = _mean_abs_over_std(a, b)
        if value > 0:
            score += math.log(value)
    return score


def _mean_abs_over_std(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ_w mean(|a_w|, |b_w|) / std(a_w, b_w) over the weights whose two gradients differ (std with Bessel's
    correction, as ``torch.std``): for two samples that is (|a| + |b|) / (√2 |a − b|), elementwise — torch's
    ``std(dim=0)`` of the stacked pair took 60% of a 16³ screen. Weights whose gradients agree add 0."""
    spread = (a - b).abs_()
    ratio = (a.abs() + b.abs()).div_(spread)
    return float(ratio.masked_fill_(spread == 0, 0.0).sum()) / math.sqrt(2)


SCORERS: dict[str, Callable[[nn.Module, Task, Batch], float]] = {
    "grad_norm": grad_norm,
    "snip": snip,
    "synflow": synflow,
    "naswot": naswot,
    "zico": zico,
}


def random_control(config: ArchConfig, seed: int) -> float:
    """The ``random`` control: a number in [0, 1) fixed by the architecture and the seed."""
    return random.Random(f"{config.hash}:{seed}").random()


def proxy_scores(
    config: ArchConfig,
    task: Task | str,
    *,
    seed: int = 0,
    batch: Batch | None = None,
    data_dir: Any = None,
    proxies: tuple[str, ...] = PROXIES,
) -> dict[str, float]:
    """Every proxy in ``proxies`` of ``config``, each on a fresh initialisation from ``seed`` (one batch)."""
    task = get_task(task) if isinstance(task, str) else task
    if batch is None:
        batch = training_batch(task, seed=seed, data_dir=data_dir)
    device = compute_device()
    batch = to_device(batch, device)
    scores = {}
    if "grad_norm" in proxies and "snip" in proxies:  # one backward pass serves both
        torch.manual_seed(seed)
        net = place(build_model(config), device).train()
        grads = _loss_grads(net, task, batch)
        scores["grad_norm"] = float(sum(g.norm() for g in grads))
        scores["snip"] = float(sum((w.detach() * g).abs().sum() for w, g in zip(_weights(net), grads)))
    for name in proxies:
        if name not in scores:
            scores[name] = proxy_score(name, config, task, seed=seed, batch=batch)
    return {name: scores[name] for name in proxies}


def proxy_score(
    proxy: str, config: ArchConfig, task: Task | str, *, seed: int = 0, batch: Batch | None = None, data_dir: Any = None
) -> float:
    """``proxy`` of ``config`` initialised from ``seed`` on a batch of ``task``'s training data."""
    if proxy not in SCORERS and proxy not in CONTROLS:
        raise ValueError(f"unknown zero-cost proxy {proxy!r}; known: {', '.join((*PROXIES, *CONTROLS))}")
    if proxy in CONTROLS:
        return random_control(config, seed)
    task = get_task(task) if isinstance(task, str) else task
    if batch is None:
        batch = training_batch(task, seed=seed, data_dir=data_dir)
    torch.manual_seed(seed)  # the same initial weights on every device: built on the CPU, then moved
    device = compute_device()
    net = place(build_model(config), device).train()
    return SCORERS[proxy](net, task, to_device(batch, device))

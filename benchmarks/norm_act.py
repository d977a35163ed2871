"""BatchNorm3d ─ ReLU as one kernel (``psc_nas.ops.norm_act``) against PyTorch's two ops, at DenseNet3D's shapes.

    python benchmarks/norm_act.py                                  # DenseNet3D's channel counts, 32³ and 16³
    python benchmarks/norm_act.py --channels 68 152 --sizes 32 --repeats 9
    python benchmarks/norm_act.py --pool --channels 152 304 --sizes 32 16     # a transition's BN ─ ReLU ─ avgpool

Per shape (batch 4, channels_last_3d float32, as a training step has them), interleaved (PyTorch, fused,
PyTorch, fused, ...) and best of ``--repeats``: the training forward, its backward, and the eval forward without
gradients, in ms; the speed-up; and the fused pass's bandwidth — the bytes it must move (forward: read x twice,
write y; backward: read the gradient and x twice each, write dx; eval: read x, write y) over its time — beside a
plain copy's measured in the same process. PyTorch's ReLU is the networks' ``nn.ReLU()`` (not in place). Freed
memory stays in the process as in psc-train. Prints a markdown table with the load average before and after.

With ``--pool`` each run ends in DenseNet3D's 2x2x2 average pool (``nets._layers.AvgPool2``), a third run is the
kernel that pools as it normalises (``norm_act.norm_act_pool``), the speed-ups are against it, and its bytes are
x twice and an eighth written (forward), x twice, the pooled gradient's eighth twice and dx written (backward), x
and the eighth (eval).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psc_nas.memory import keep_freed_memory  # noqa: E402
from psc_nas.nets._layers import AvgPool2  # noqa: E402
from psc_nas.ops import norm_act  # noqa: E402

# DenseNet3D's BN widths at width 1: block inputs 40 + 28k at 32³, the transition/side widths, and the head's 120.
CHANNELS = [40, 68, 96, 120, 124, 152, 180, 208, 236, 264]


def copy_bandwidth(numel: int, repeats: int) -> float:
    """GB/s of ``copy_`` (read + write) on a tensor of ``numel`` floats: the memory system's practical rate."""
    a, b = torch.randn(numel), torch.empty(numel)
    best = min(timed(lambda: b.copy_(a)) for _ in range(repeats))
    return 2 * 4 * numel / best / 1e9


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(channels: int, size: int, batch: int, repeats: int, pool: bool = False) -> dict[str, float]:
    generator = torch.Generator().manual_seed(channels)
    shape = (batch, channels, size, size, size)
    x = torch.randn(shape, generator=generator).to(memory_format=torch.channels_last_3d).requires_grad_()
    out = (batch, channels, *[size // 2] * 3) if pool else shape
    grad = torch.randn(out, generator=generator).to(memory_format=torch.channels_last_3d)
    norm, act, avg = nn.BatchNorm3d(channels), nn.ReLU(), AvgPool2()
    runs = {
        "pytorch": lambda: act(norm(x)),
        "fused": lambda: norm_act.batch_norm_relu(x, norm),
    }
    if pool:
        runs = {name: lambda run=run: avg(run()) for name, run in runs.items()}
        runs["pooled"] = lambda: norm_act.norm_act_pool(norm, act, avg, x)
    best: dict[str, float] = {}
    for round_ in range(repeats + 1):  # round 0 warms up and is not kept
        for name, run in runs.items():
            norm.train()
            started = time.perf_counter()
            y = run()
            forward = time.perf_counter() - started
            started = time.perf_counter()
            y.backward(grad)
            backward = time.perf_counter() - started
            x.grad = norm.weight.grad = norm.bias.grad = None
            del y
            norm.eval()
            with torch.no_grad():
                evaluation = timed(run)
            if round_:
                for part, seconds in (("fwd", forward), ("bwd", backward), ("eval", evaluation)):
                    best[f"{name}_{part}"] = min(best.get(f"{name}_{part}", float("inf")), seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=CHANNELS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pool", action="store_true", help="each run ends in a 2x2x2 average pool (module docstring)")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    if not norm_act.KERNEL.available():
        raise SystemExit(f"the BatchNorm-ReLU kernel is unavailable: {norm_act.KERNEL.unavailable_reason()}")
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, best of {args.repeats}")
    print(f"copy bandwidth (64 MiB): {copy_bandwidth(16 << 20, args.repeats):.1f} GB/s\n")
    names = ["pytorch", "fused", "pooled"] if args.pool else ["pytorch", "fused"]
    last = names[-1]
    arrow = " → ".join({"pytorch": "PyTorch", "fused": "fused", "pooled": "pooled"}[name] for name in names)
    against = " / ".join(f"{name} ÷ {last}" for name in names[:-1])
    print(
        f"| C | size | train fwd ms: {arrow} | bwd ms | eval fwd ms | speed-up fwd / bwd / eval ({against}) "
        f"| {last} GB/s fwd / bwd / eval |"
    )
    print("|---:|---:|---|---|---|---|---|")
    # tensor-sized reads and writes of the last run (module docstring)
    moved = {"fwd": 2.125, "bwd": 3.25, "eval": 1.125} if args.pool else {"fwd": 3, "bwd": 5, "eval": 2}
    for size in args.sizes:
        for channels in args.channels:
            best = measure(channels, size, args.batch, args.repeats, args.pool)
            tensor_bytes = args.batch * channels * size**3 * 4
            parts = list(moved)
            cells = [" → ".join(f"{best[f'{name}_{p}'] * 1e3:.2f}" for name in names) for p in parts]
            ratios = " ; ".join(
                " / ".join(f"{best[f'{name}_{p}'] / best[f'{last}_{p}']:.2f}×" for p in parts) for name in names[:-1]
            )
            rates = " / ".join(f"{moved[p] * tensor_bytes / best[f'{last}_{p}'] / 1e9:.0f}" for p in parts)
            print(f"| {channels} | {size}³ | {' | '.join(cells)} | {ratios} | {rates} |")
    print(f"\nload average {load:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()

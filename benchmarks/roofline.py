"""Roofline of this machine, and every depthwise 3x3x3 conv path measured against it.

    python benchmarks/roofline.py                         # writes docs/benchmarks/roofline.md (+ .json)
    python benchmarks/roofline.py --quick --out -         # C=16 at 32³ only, to stdout

Compute peak: the best GF/s of a dense float32 ``torch.mm`` (n = 2048) at 1 and 2 threads. Memory
bandwidth: the best of copying a float32 tensor into another (bytes read + bytes written, STREAM's
"copy" count), for 256 MiB (DRAM) and, per shape, for a tensor the size of the conv's input: this
machine's 480 MiB L3 holds every activation measured here, so the activation-sized copy is the
bandwidth a depthwise conv can actually get. A kernel of arithmetic intensity I (flops per byte it
must move) can reach at most ``min(peak, I · bandwidth)``; "% of roofline" is achieved GF/s over
that bound, with the activation-sized bandwidth.

A depthwise 3x3x3 conv does 27 MACs per output element and must at least read its input and
write its output: I = 2·27 / 8 = 6.75 flop/byte in float32 (stride 1) for the forward. Forward +
backward moves six activation-sized tensors (forward: x in, y out; input gradient: dy in, dx
out; weight gradient: x and dy in) for three times the forward's flops: the same 6.75.

Paths (batch 2, channels C in = out, cube side S, ``--threads`` threads, each the best of ``--repeats``
calls after one warm-up):

- ``onednn NCDHW``: ``F.conv3d(groups=C)`` on a contiguous tensor;
- ``onednn channels_last``: the same on channels_last_3d (what ``csn_ir`` ran before this kernel);
- ``unfold``: 27 shifted views of the zero-padded channels_last input times per-channel weights,
  summed (autograd does the backward); measured at the smallest C only (54 elementwise passes:
  seconds per call, 50-500x the others);
- ``kernel``: psc-nas's C++ kernel for the forward, the input gradient and the weight gradient;
- ``op``: ``depthwise.depthwise_conv3d``, what the ``depthwise`` implementation runs: oneDNN's
  channels_last forward, the input gradient as that forward on the flipped kernel, the kernel's
  weight gradient. The kernel's build/load time is printed separately, never inside a timed call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import best_seconds  # benchmarks/timing.py, beside this script

from psc_nas.ops import depthwise

BATCH = 2
TAPS = 27


def gemm_peak(threads: int, repeats: int, n: int = 2048) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b, out=out), repeats) / 1e9


def copy_bandwidth(threads: int, repeats: int, mib: int = 256) -> float:
    torch.set_num_threads(threads)
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src), repeats) / 1e9


def unfold_depthwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    depth, height, width = x.shape[2:]
    padded = F.pad(x, (1, 1, 1, 1, 1, 1))
    taps = weight.reshape(weight.shape[0], TAPS)
    y = None
    for tap in range(TAPS):
        a, b, k = tap // 9, tap // 3 % 3, tap % 3
        term = padded[:, :, a : a + depth, b : b + height, k : k + width] * taps[:, tap].view(1, -1, 1, 1, 1)
        y = term if y is None else y + term
    return y


class KernelOnly(torch.autograd.Function):
    """Forward, input and weight gradient all by the C++ kernel (stride 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return depthwise.KERNEL.module().dw_forward(x, depthwise.taps_weight(weight), [3, 3, 3], [1, 1, 1])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        kernel = depthwise.KERNEL.module()
        grad_x = kernel.dw_input_grad(grad_y, depthwise.taps_weight(weight), list(x.shape), [3, 3, 3], [1, 1, 1])
        return grad_x, depthwise.weight_grad(x, grad_y, weight.shape, [1, 1, 1])


def paths(with_unfold: bool) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    found = {
        "onednn NCDHW": lambda x, w: F.conv3d(x.contiguous(), w, None, 1, 1, 1, w.shape[0]),
        "onednn channels_last": lambda x, w: F.conv3d(
            x.contiguous(memory_format=torch.channels_last_3d), w, None, 1, 1, 1, w.shape[0]
        ),
    }
    if with_unfold:
        found["unfold"] = lambda x, w: unfold_depthwise(x.contiguous(memory_format=torch.channels_last_3d), w)
    if depthwise.KERNEL.available():
        found["kernel"] = KernelOnly.apply
        found["op"] = lambda x, w: depthwise.depthwise_conv3d(x, w, [1, 1, 1])
    return found


def measure_shape(channels: int, size: int, repeats: int, peak: float, with_unfold: bool, threads: int) -> dict:
    torch.set_num_threads(threads)
    x = torch.randn(BATCH, channels, size, size, size).contiguous(memory_format=torch.channels_last_3d)
    copy = torch.empty_like(x)
    bandwidth = 2 * x.numel() * 4 / best_seconds(lambda: copy.copy_(x), repeats) / 1e9
    weight = torch.randn(channels, 1, 3, 3, 3)
    elements = x.numel()
    flops_forward = 2 * TAPS * elements
    intensity = flops_forward / (2 * elements * 4)  # read x, write y
    bound = min(peak, intensity * bandwidth)
    rows = []
    for name, run in paths(with_unfold).items():

        def forward(run=run) -> None:
            with torch.no_grad():
                run(x, weight)

        def training(run=run) -> None:
            xg, wg = x.detach().requires_grad_(), weight.detach().requires_grad_()
            y = run(xg, wg)
            y.backward(torch.ones_like(y))

        for mode, step, flops in (("fwd", forward, flops_forward), ("fwd+bwd", training, 3 * flops_forward)):
            seconds = best_seconds(step, repeats)
            gflops = flops / seconds / 1e9
            rows.append({"path": name, "mode": mode, "ms": seconds * 1e3, "gflops": gflops, "roofline": gflops / bound})
    return {
        "channels": channels,
        "size": size,
        "intensity": intensity,
        "bandwidth": bandwidth,
        "bound": bound,
        "load": os.getloadavg()[0],
        "rows": rows,
    }


def render(run: dict) -> str:
    lines = [
        "# Roofline and depthwise 3x3x3",
        "",
        f"`{run['command']}`, {run['date']}, torch {run['torch']}, load average {run['load_before']:.1f} before, "
        f"{run['load_after']:.1f} after (2 cores shared with other jobs: absolute numbers are a lower bound).",
        "",
        "| resource | 1 thread | 2 threads |",
        "|---|---:|---:|",
        f"| dense GEMM (torch.mm 2048², fp32) GF/s | {run['peak'][0]:.0f} | {run['peak'][1]:.0f} |",
        f"| copy bandwidth (256 MiB, read+write) GB/s | {run['bandwidth'][0]:.1f} | {run['bandwidth'][1]:.1f} |",
        "",
        f"Per shape below ({run['threads']} thread(s)): the copy bandwidth of an activation-sized tensor (in "
        "cache) and the roofline bound min(peak, 6.75 flop/byte x that bandwidth) the % column divides by.",
        "",
        f"Ridge point (2 threads, DRAM): {run['peak'][1] / run['bandwidth'][1]:.1f} flop/byte; a depthwise "
        "3x3x3 conv has 6.75: memory-bound from DRAM. Kernel build/load: "
        + (f"{run['kernel_load_s']:.1f} s (outside every timed call)." if run["kernel_load_s"] else "not available."),
        "",
        "| C | S³ | copy GB/s | bound GF/s | mode | path | ms | GF/s | % of roofline | load |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for shape in run["shapes"]:
        for row in shape["rows"]:
            lines.append(
                f"| {shape['channels']} | {shape['size']} | {shape['bandwidth']:.0f} | {shape['bound']:.0f} | "
                f"{row['mode']} | {row['path']} | {row['ms']:.2f} | "
                f"{row['gflops']:.1f} | {100 * row['roofline']:.0f}% | {shape['load']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=2, choices=[1, 2], help="threads for the depthwise paths (default 2)"
    )
    parser.add_argument("--quick", action="store_true", help="C=16 at 32³, 3 repeats")
    parser.add_argument("--out", default="docs/benchmarks/roofline.md", help="markdown path, or - for stdout")
    args = parser.parse_args(argv)
    if args.quick:
        args.channels, args.sizes, args.repeats = [16], [32], 3
    started = time.perf_counter()
    depthwise.KERNEL.available()
    run = {
        "command": " ".join(["python benchmarks/roofline.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "load_before": os.getloadavg()[0],
        "threads": args.threads,
        "kernel_load_s": depthwise.KERNEL.load_seconds(),
        "peak": [gemm_peak(t, args.repeats) for t in (1, 2)],
        "bandwidth": [copy_bandwidth(t, args.repeats) for t in (1, 2)],
        "shapes": [],
    }
    for size in args.sizes:
        for channels in args.channels:
            smallest = channels == min(args.channels) and size == min(args.sizes)
            run["shapes"].append(
                measure_shape(channels, size, args.repeats, run["peak"][args.threads - 1], smallest, args.threads)
            )
            print(f"C={channels} {size}³ done after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    run["load_after"] = os.getloadavg()[0]
    text = render(run)
    if args.out == "-":
        print(text)
        return
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(run, indent=1))


if __name__ == "__main__":
    main()

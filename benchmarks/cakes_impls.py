"""Every CAKES implementation on one allocation, timed interleaved in one process: the evidence for the rule
(``CakesSpec.fast_impl`` / ``merged_impl`` in ``psc_nas/ops/cakes.py``).

    python benchmarks/cakes_impls.py                                     # the default allocations
    python benchmarks/cakes_impls.py --cases "64|3x3x3=32,1x3x3=32|32|2|1" "124|uniform28|32|4|1" --repeats 5

A case is ``C_in|allocation|side|batch|stride``, the allocation ``shape=count,...`` or ``uniformC`` (C output channels
spread over the seven shapes). For each case: ``masked``, ``planes``, ``channels_last`` (the exact per-shape convs)
and ``taps`` (``TapCakesConv``: the tap-conv kernel; at other strides ``merged_impl``'s pick, and below 16³ positions
the exact convs unless the groups are thin) on the same weights, a training pass (forward + backward) and an
inference forward, each the best of ``--repeats`` single calls taken in turn, so every implementation meets the
machine in the same state. Printed: the executed/analytic MAC ratio of ``masked``,
the padded ratio of the per-shape convs (oneDNN's blocks of 16 output channels), the rule's pick, the fastest, and
the rule's pick over the fastest (1.00 = the rule picked the fastest).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from psc_nas.memory import keep_freed_memory  # noqa: E402
from psc_nas.ops import make_spec  # noqa: E402

IMPLS = ("masked", "planes", "channels_last", "taps")
DEFAULT_CASES = [
    # uniform allocations (DenseNet3D's slots: 28 channels, groups of 4) at the three resolutions of a 32³ patch
    "124|uniform28|32|4|1",
    "208|uniform28|8|4|1",
    "64|uniform64|32|2|1",
    # groups of whole blocks of 16 channels, in 1D, 2D and mixed shapes, stride 1 and 2
    "32|1x1x3=16,1x3x1=16|32|2|1",
    "32|3x3x3=16,1x3x3=16|32|2|1",
    "64|3x3x3=32,1x3x3=32|32|2|1",
    "64|3x3x3=48,1x1x3=16|32|2|1",
    "64|1x3x3=32,1x1x3=32|32|2|1",
    "64|3x3x3=16,1x3x3=16,3x1x3=16,3x3x1=16|32|2|1",
    "112|uniform112|32|2|1",
    "32|1x3x3=16,3x3x1=16|32|2|2",
    "64|3x3x3=32,1x3x3=32|32|2|2",
    # DenseNet3D's half-and-half allocations: 14 + 14 (oneDNN pads 14 to 16)
    "124|3x3x3=14,1x3x3=14|32|4|1",
    "124|1x3x3=14,3x3x1=14|32|4|1",
    "208|3x3x3=14,1x3x3=14|8|4|1",
    # groups of 7-21 channels below 16³ (the kernel's blocks half padding there) and at 16³
    "180|3x3x3=21,1x1x3=7|8|4|1",
    "180|1x3x3=14,3x1x3=7,3x3x1=7|8|4|1",
    "96|3x3x3=7,1x3x3=7,3x1x3=7,3x3x1=7|16|4|1",
    # wide but ragged groups, a full cube
    "48|3x3x3=24,1x3x3=24|32|2|1",
    "64|3x3x3=40,1x1x3=24|32|2|1",
    "64|1x3x3=22,3x1x3=21,3x3x1=21|32|2|1",
    "96|3x3x3=28|16|4|1",
]


def parse(case: str) -> tuple[int, dict[str, int] | int, int, int, int]:
    cin, allocation, side, batch, stride = case.split("|")
    if allocation.startswith("uniform"):
        parsed: dict[str, int] | int = int(allocation[len("uniform") :])
    else:
        parsed = {shape: int(count) for shape, count in (item.split("=") for item in allocation.split(","))}
    return int(cin), parsed, int(side), int(batch), int(stride)


def once_ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="CIN|ALLOCATION|SIDE|BATCH|STRIDE")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, best of {args.repeats} interleaved calls, ms; load {os.getloadavg()[0]:.2f}")
    head = " | ".join(IMPLS)
    print(
        f"| case | masked ratio | padded ratio | rule | training: {head} | fastest | rule / fastest "
        f"| forward: {head} | fastest | rule / fastest |"
    )
    print("|---|---:|---:|---|" + "---:|" * len(IMPLS) + "---|---:|" + "---:|" * len(IMPLS) + "---|---:|")
    for case in args.cases:
        cin, allocation, side, batch, stride = parse(case)
        if isinstance(allocation, int):
            spec = make_spec("cakes", cin, allocation, stride=stride)
        else:
            spec = make_spec("cakes", cin, sum(allocation.values()), stride=stride, allocation=allocation)
        modules = {impl: spec.build(impl) for impl in IMPLS}
        state = modules["masked"].state_dict()
        for module in modules.values():
            module.load_state_dict(state)
        x = torch.randn(batch, cin, side, side, side).contiguous(memory_format=torch.channels_last_3d)
        x.requires_grad_()
        out = -(-side // stride)
        grad = torch.randn(batch, spec.out_channels, out, out, out).contiguous(memory_format=torch.channels_last_3d)
        times = {impl: [float("inf"), float("inf")] for impl in IMPLS}
        for module in modules.values():
            module(x).backward(grad)  # warm-up (and the kernel's build, once)
        for _ in range(args.repeats):
            for impl, module in modules.items():
                times[impl][0] = min(times[impl][0], once_ms(lambda: module(x).backward(grad)))
                with torch.no_grad():
                    times[impl][1] = min(times[impl][1], once_ms(lambda: module(x)))
        rule = spec.fast_impl()
        label = ",".join(f"{shape}={count}" for shape, count in spec.allocation.items())
        if isinstance(allocation, int):
            label = f"uniform {allocation}"
        cells = [f"{cin} → {label}, {side}³, batch {batch}, stride {stride}"]
        cells += [f"{spec.executed_ratio('masked'):.2f}", f"{spec.padded_ratio():.2f}", rule]
        for part in (0, 1):
            fastest = min(IMPLS, key=lambda impl: times[impl][part])
            cells += [f"{times[impl][part]:.1f}" for impl in IMPLS]
            cells += [fastest, f"{times[rule][part] / times[fastest][part]:.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

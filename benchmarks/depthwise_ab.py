"""Two versions of the depthwise C++ kernel, timed in one process, interleaved: the weight gradient alone and the
training pass of ``depthwise.depthwise_conv3d`` (oneDNN forward, flipped-kernel input gradient, kernel weight gradient).

    python benchmarks/depthwise_ab.py before=HEAD after=psc_nas/ops/depthwise.py
    python benchmarks/depthwise_ab.py old=c92c92c new=HEAD --repeats 31
    python benchmarks/depthwise_ab.py before=HEAD after=psc_nas/ops/depthwise.py --channels 28 --sizes 32 16 --batch 4

Each ``TAG=SOURCE`` names a version: a git revision (its ``psc_nas/ops/depthwise.py``) or a path to such a file. Its
``SOURCE`` string is built under its own extension name (cached like the real one). Separate processes, or
separate runs of ``benchmarks/ops.py``, differed by up to 15-20% on the same code (docs/benchmarks/ops.md), more than
a kernel change moves a whole op; here every repeat times each version once, in turn, on the same tensors, so the
machine's state is shared and the ratio compares like with like. Default batch 2, C = 16/32/64, 32³ and 64³
(DenseNet3D's CSN layers: C = 28, 32³ down to 2³, batch 4), stride 1, channels_last_3d float32; outputs of every
version are checked against the first. Best and median in ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from psc_nas import native  # noqa: E402
from psc_nas.memory import keep_freed_memory  # noqa: E402


def kernel_source(ref: str, module: str = "psc_nas/ops/depthwise.py") -> str:
    """The ``SOURCE`` string of a kernel's module: the file ``ref``, or ``module`` at the git revision ``ref``."""
    path = Path(ref)
    if path.suffix == ".py" and path.exists():
        text = path.read_text()
    else:
        text = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{ref}:{module}"], text=True)
    start = text.index('SOURCE = r"""') + len('SOURCE = r"""')
    return text[start : text.index('"""', start)]


def build(tag: str, source: str):
    return cpp_extension.load_inline(
        name=f"psc_nas_depthwise_ab_{tag}",
        cpp_sources=source,
        functions=["dw_weight_grad"],
        extra_cflags=native.build_flags(),
        extra_ldflags=["-fopenmp"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", metavar="TAG=SOURCE")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="cube sides")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    kernels = {}
    for version in args.versions:
        tag, _, ref = version.partition("=")
        kernels[tag] = build(tag, kernel_source(ref))
    tags = list(kernels)
    load = os.getloadavg()[0]
    print(f"{args.threads} threads, best / median of {args.repeats} interleaved repeats, ms; load {load:.2f}")
    print(f"| shape | part | {' | '.join(tags)} | {tags[0]} / {tags[-1]} | load |")
    print(f"|---|---|{'---:|' * len(tags)}---:|---:|")
    for size in args.sizes:
        for channels in args.channels:
            x = torch.randn(args.batch, channels, size, size, size).contiguous(memory_format=torch.channels_last_3d)
            weight = torch.randn(channels, 1, 3, 3, 3)
            flipped = weight.flip(2, 3, 4)
            dy = torch.randn_like(x)
            first = kernels[tags[0]].dw_weight_grad(x, dy, [3, 3, 3], [1, 1, 1])
            for tag in tags[1:]:
                other = kernels[tag].dw_weight_grad(x, dy, [3, 3, 3], [1, 1, 1])
                torch.testing.assert_close(other, first, rtol=1e-3, atol=1e-2 * first.abs().max().item())

            def weight_grad(kernel):
                kernel.dw_weight_grad(x, dy, [3, 3, 3], [1, 1, 1])

            def training_pass(kernel):
                y = F.conv3d(x, weight, None, 1, 1, 1, channels)
                grad_y = torch.ones_like(y)
                F.conv3d(grad_y, flipped, None, 1, 1, 1, channels)
                kernel.dw_weight_grad(x, grad_y, [3, 3, 3], [1, 1, 1])

            for part, step in (("weight gradient", weight_grad), ("training pass", training_pass)):
                times: dict[str, list[float]] = {tag: [] for tag in tags}
                for tag in tags:
                    step(kernels[tag])
                for _ in range(args.repeats):
                    for tag in tags:
                        started = time.perf_counter()
                        step(kernels[tag])
                        times[tag].append(1e3 * (time.perf_counter() - started))
                cells = " | ".join(f"{min(times[t]):.2f} / {statistics.median(times[t]):.2f}" for t in tags)
                ratio = min(times[tags[0]]) / min(times[tags[-1]])
                print(
                    f"| C={channels}, {size}³ | {part} | {cells} | {ratio:.2f}x | {os.getloadavg()[0]:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

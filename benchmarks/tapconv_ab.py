"""Two versions of the tap-conv C++ kernel (``psc_nas/ops/tapconv.py``), timed in one process, interleaved: the
packs of x and dy, the forward conv, the input-gradient conv, the weight gradient, and their sum (one training pass
without the autograd bookkeeping).

    python benchmarks/tapconv_ab.py before=HEAD after=psc_nas/ops/tapconv.py
    python benchmarks/tapconv_ab.py old=2b612d2 new=HEAD --repeats 9 --cases 124:28:32:4 124:28:32:4:4

Each ``TAG=SOURCE`` names a version: a git revision (its ``psc_nas/ops/tapconv.py``) or a path to such a file; its
``SOURCE`` string is built under its own extension name (cached like the real one). Every version runs the plan of
the current ``tap_plan``, so versions must share the kernel's interface (``pack``, ``conv``, ``weight_grad``); a
version whose kernel takes narrower chunks gets a plan of those: ``--widest TAG=CONV:WEIGHT`` (the most channels in a
forward/input-gradient chunk and in a weight-gradient chunk: 6:6 before version 15, 9:6 for versions 15-16;
``--narrow TAG`` is ``TAG=6:6``). A case
is ``C_in:C_out:side:batch[:groups]``: a uniform CAKES allocation of C_out over a cube of that side, or with groups
a thin grouped 3x3x3 conv (csn_ir's). Default: CAKES C = 16/32/64 at 32³ and 64³ (batch 2, as ``benchmarks/ops.py``)
and DenseNet3D's slots 40 → 28 and 124 → 28 at 32³ (batch 4), the last also as csn_ir's grouped conv (groups 4).
Outputs of every version are checked against the first. A repeat calls each part of each version three times in a
row (warm caches, as a part meets its operands after the previous one); the table gives the best over ``--repeats``
in ms, with GF/s of the analytic MACs (a pack: GB/s read and written).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from depthwise_ab import kernel_source  # noqa: E402  (benchmarks/depthwise_ab.py: a kernel's SOURCE at a revision)
from timing import best_seconds  # noqa: E402

from psc_nas import native  # noqa: E402
from psc_nas.memory import keep_freed_memory  # noqa: E402
from psc_nas.ops import tapconv  # noqa: E402
from psc_nas.ops.cakes import shape_mask, uniform_allocation  # noqa: E402

DEFAULT_CASES = ["16:16:32:2", "32:32:32:2", "64:64:32:2", "16:16:64:2", "32:32:64:2", "64:64:64:2"]
DEFAULT_CASES += ["40:28:32:4", "124:28:32:4", "124:28:32:4:4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", metavar="TAG=SOURCE")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="CIN:COUT:SIDE:BATCH[:GROUPS]")
    parser.add_argument("--narrow", nargs="*", default=[], metavar="TAG", help="versions with chunks of at most 6")
    parser.add_argument("--widest", nargs="*", default=[], metavar="TAG=CONV:WEIGHT", help="a version's widest chunks")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    kernels = {}
    for version in args.versions:
        tag, _, ref = version.partition("=")
        functions = ["pack", "conv", "weight_grad"]
        kernels[tag] = native.Extension(
            f"tapconv_ab_{tag}", 1, kernel_source(ref, "psc_nas/ops/tapconv.py"), functions, tag
        )
        if kernels[tag].module() is None:
            raise SystemExit(f"{tag}: {kernels[tag].unavailable_reason()}")
    tags = list(kernels)
    widest = {tag: (tapconv.WIDEST, tapconv.WEIGHT_WIDEST) for tag in tags} | {tag: (6, 6) for tag in args.narrow}
    for spec in args.widest:
        tag, _, sizes = spec.partition("=")
        widest[tag] = tuple(int(v) for v in sizes.split(":"))
    load = os.getloadavg()[0]
    print(f"{args.threads} threads, best of {args.repeats} interleaved repeats, ms (GF/s); load {load:.2f}")
    print(f"| case | part | {' | '.join(tags)} | {tags[0]} / {tags[-1]} |")
    print(f"|---|---|{'---:|' * len(tags)}---:|")
    for case in args.cases:
        cin, cout, side, batch, *rest = (int(v) for v in case.split(":"))
        groups = rest[0] if rest else 1
        if groups > 1:
            counts, masks, label = [cout], [tapconv.CUBE], f"{cin} → {cout}, groups {groups}"
        else:
            allocation = uniform_allocation(cout)
            counts, masks = list(allocation.values()), [shape_mask(shape) for shape in allocation]
            label = f"CAKES uniform {cin} → {cout}"
        label += f", {side}³, batch {batch}"
        spatial = (side, side, side)
        macs = batch * side**3 * cin // groups * sum(c * bin(m).count("1") for c, m in zip(counts, masks))
        x = torch.randn(batch, cin, *spatial).contiguous(memory_format=torch.channels_last_3d)
        dy = torch.randn(batch, cout, *spatial).contiguous(memory_format=torch.channels_last_3d)
        weight = torch.randn(cout, cin // groups, 3, 3, 3)
        y, dx = torch.empty_like(dy), torch.empty_like(x)

        def parts(tag):
            module = kernels[tag].module()
            plan = tapconv.tap_plan(tapconv.tap_groups(counts, masks), cin, spatial, groups, *widest[tag])
            w_forward = weight.reshape(-1)[plan.forward_index].contiguous()
            w_backward = weight.reshape(-1)[plan.backward_index].contiguous()
            packed_x, packed_dy = module.pack(x, plan.volume), module.pack(dy, plan.volume)
            size = plan.weight_index.numel()
            fns = {
                "pack x": lambda: module.pack(x, plan.volume),
                "pack dy": lambda: module.pack(dy, plan.volume),
                "forward": lambda: module.conv(packed_x, w_forward, *plan.forward, y),
                "input grad": lambda: module.conv(packed_dy, w_backward, *plan.backward, dx),
                "weight grad": lambda: module.weight_grad(packed_x, packed_dy, *plan.weight, size, *spatial),
            }
            fns["forward"]()
            fns["input grad"]()
            grad = weight.new_zeros(weight.numel()).index_put_((plan.weight_index,), fns["weight grad"]())
            return fns, (packed_x, y.clone(), dx.clone(), grad)

        results, reference, calls = {}, None, {}
        for tag in tags:  # check every version's outputs against the first
            calls[tag], out = parts(tag)
            if reference is None:
                reference = out
            for got, want in zip(out, reference):
                if (got - want).abs().max() > 1e-4 * want.abs().max():
                    raise SystemExit(f"{tag} differs from {tags[0]} on {case}")
        for fns in calls.values():
            for fn in fns.values():
                fn()  # warm-up
        for _ in range(args.repeats):
            for tag in tags:
                for part, fn in calls[tag].items():
                    results.setdefault((tag, part), []).append(1e3 * best_seconds(fn, 3, warmup=0))
        for part in [*calls[tags[0]], "pass"]:
            if part == "pass":
                times = {tag: sum(min(results[tag, p]) for p in calls[tag]) for tag in tags}
            else:
                times = {tag: min(results[tag, part]) for tag in tags}
            if part.startswith("pack"):
                moved = 2 * 4 * (x if part == "pack x" else dy).numel()
                rate = {tag: f"{moved / t / 1e6:.0f} GB/s" for tag, t in times.items()}
            else:
                flops = 2 * macs * (3 if part == "pass" else 1)
                rate = {tag: f"{flops / t / 1e6:.0f}" for tag, t in times.items()}
            cells = " | ".join(f"{times[tag]:.2f} ({rate[tag]})" for tag in tags)
            print(f"| {label} | {part} | {cells} | {times[tags[0]] / times[tags[-1]]:.2f}× |", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Operator speed on CPU: forward+backward of every family and implementation, written as markdown.

    python benchmarks/ops.py                      # full run, writes docs/benchmarks/ops.md
    python benchmarks/ops.py --quick --out -      # one small shape, to stdout

For each shape (channels C in = out, cube side S, batch 2) every (family, implementation) pair
runs once to warm up, then ``--repeats`` rounds that each time every pair once, in a fresh
random order, so load from other processes on a shared machine hits all variants alike. Ratios
and GF/s use each variant's fastest repeat, the least disturbed by other jobs (with two oneDNN
threads on an oversubscribed machine one descheduled thread stalls the other, so disturbed
times scatter by up to 30x); the median is shown beside it. The efficiency ratio is
(op time / Conv3d time) ÷ (op MACs / Conv3d MACs):
1.0 means the op's MAC savings turn fully into time savings.

Each round also times every variant's forward alone (``torch.no_grad``, inference), so training
and inference ratios come from the same run. "executed/analytic" is ``FlopCounterMode``'s count
of one forward over ``spec.cost()`` (above 1 for CAKES' ``masked`` and ``planes``); below each shape's table,
what oneDNN executes beyond that where an op's convs have output channels that do not fill its blocks of 16
(``ConvGraph.blocked_ratio``: PmSCn's thin streams, CAKES' per-shape groups). The
roofline columns divide GF/s by ``min(peak, I · bandwidth)``: peak = the best dense ``torch.mm``
(n = 2048, 2 threads), bandwidth = copying an input-sized tensor (in cache here), I = the op's
flops over the bytes it must at least move (input and output once per pass, weights; forward:
x and y; forward+backward: x, y, dy, dx and x, dy again), as in ``benchmarks/roofline.py``.

Freed memory stays in the process (``psc_nas.memory.keep_freed_memory``), as in psc-search and psc-train:
with glibc's defaults every output buffer above its mmap threshold is mapped afresh and page-faulted in at
every call, which at 64³ took longer than the op itself (``--fresh-memory`` measures that way).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from psc_nas.memory import keep_freed_memory
from psc_nas.ops import EXACT_IMPLS, families, impl_names, make_spec
from psc_nas.ops.cakes import SHAPES
from psc_nas.ops.fast import has_depthwise_conv, has_folding_conv
from psc_nas.ops.pmscn import ORIENTATIONS

BATCH = 2
FAMILIES: dict[str, tuple[str, dict]] = {
    "conv3d": ("conv3d", {}),
    "p3d (1x3x3)": ("p3d", {}),
    "pmscn m1 n1 3x3x1": ("pmscn", {"m": 1, "n": 1, "orientations": ["3x3x1"]}),
    "pmscn m2 n1": ("pmscn", {"m": 2, "n": 1}),
    "pmscn m3 n1": ("pmscn", {"m": 3, "n": 1}),
    "pmscn m2 n2": ("pmscn", {"m": 2, "n": 2}),
    "cakes uniform": ("cakes", {}),
    "csn_ip": ("csn_ip", {}),
    "csn_ir": ("csn_ir", {}),
}


@dataclass
class Variant:
    family: str
    impl: str
    module: torch.nn.Module
    macs: int
    params: int
    times: list[float]
    forward_times: list[float] = field(default_factory=list)
    executed: float = 1.0  # executed MACs / analytic MACs


def variants_for(channels: int, size: int) -> list[Variant]:
    found = []
    for family, (op, args) in FAMILIES.items():
        spec = make_spec(op, channels, channels, **args)
        cost = spec.cost((size,) * 3)
        impls = list(EXACT_IMPLS) + list(type(spec).impls)
        if not has_folding_conv(spec):
            impls.remove("folded")  # nothing to fold: it would run exactly channels_last
        if not has_depthwise_conv(spec):
            impls.remove("depthwise")  # no depthwise conv: it would run exactly folded
        found += [Variant(family, impl, spec.build(impl), cost.macs, cost.params, []) for impl in impls]
    return found


def forward_backward(module: torch.nn.Module, x: torch.Tensor) -> None:
    y = module(x.requires_grad_())
    y.backward(torch.ones_like(y))
    module.zero_grad(set_to_none=True)
    x.grad = None


def forward_only(module: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        module(x)


def executed_share(variant: Variant, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        variant.module(x)
    return counter.get_total_flops() / 2 / (variant.macs * x.shape[0])


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(
    channels: int, size: int, repeats: int, rng: random.Random, layout: torch.memory_format = torch.contiguous_format
) -> tuple[list[Variant], float, float]:
    """Times of every variant, the fastest conversion of x to channels_last_3d and the copy bandwidth (GB/s)."""
    x = torch.randn(BATCH, channels, size, size, size).contiguous(memory_format=layout)
    copy = torch.empty_like(x)
    variants = variants_for(channels, size)
    conversion: list[float] = []
    copies: list[float] = []
    warm_up = torch.randn(BATCH, channels, 8, 8, 8)
    for variant in variants:  # first calls initialize oneDNN; a real shape's own set-up shows in one repeat only
        forward_backward(variant.module, warm_up)
        variant.executed = executed_share(variant, x)
    for _ in range(repeats):
        rng.shuffle(variants)
        for variant in variants:
            variant.times.append(timed(lambda v=variant: forward_backward(v.module, x)))
            variant.forward_times.append(timed(lambda v=variant: forward_only(v.module, x)))
        conversion.append(timed(lambda: x.contiguous(memory_format=torch.channels_last_3d)))
        copies.append(timed(lambda: copy.copy_(x)))
    return variants, min(conversion), 2 * x.numel() * 4 / min(copies) / 1e9


def gemm_peak(repeats: int = 3, n: int = 2048) -> float:
    """GF/s of the best dense float32 ``torch.mm`` at the current thread count."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)
    return 2 * n**3 / min(timed(lambda: torch.mm(a, b, out=out)) for _ in range(repeats)) / 1e9


def roofline_share(row: dict, channels: int, size: int, gflops: float, shape: dict, training: bool) -> float:
    """Achieved GF/s over min(peak, intensity · bandwidth) (see the module docstring)."""
    elements = BATCH * channels * size**3  # in = out here: C in = out, stride 1
    passes = 3 if training else 1
    moved = 4 * ((6 if training else 2) * elements + passes * row["params"])
    intensity = passes * 2 * row["macs"] * BATCH / moved
    return gflops / min(shape["peak"], intensity * shape["bandwidth"])


def pricing_rate(seconds: float = 1.0) -> float:
    """Candidates per second that ``make_spec(...).cost(...)`` prices, over every family."""
    rng = random.Random(0)
    priced, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        op = rng.choice(sorted(families()))
        args = {
            "pmscn": lambda: {"m": 2, "n": rng.randint(1, 3), "orientations": rng.sample(ORIENTATIONS, 2)},
            "cakes": lambda: {"allocation": {rng.choice(SHAPES): 64}},
        }.get(op, dict)()
        make_spec(op, rng.choice([16, 32, 64]), 64, stride=rng.choice([1, 2]), **args).cost((32, 32, 32))
        priced += 1
    return priced / (time.perf_counter() - start)


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def shape_table(shape: dict) -> list[str]:
    """Markdown rows for one measured shape, marking what each family's ``fast_impl()`` rule picks."""
    channels, size, rows_in = shape["channels"], shape["size"], shape["variants"]
    best = {(r["family"], r["impl"]): min(r["times"]) for r in rows_in}
    conv3d_macs = next(r["macs"] for r in rows_in if r["family"] == "conv3d")
    forward = {(r["family"], r["impl"]): min(r.get("forward_times") or [float("nan")]) for r in rows_in}
    conv3d_reference = best[("conv3d", "reference")]
    conv3d_best = min(t for (family, _), t in best.items() if family == "conv3d")
    forward_best = min(t for (family, _), t in forward.items() if family == "conv3d")
    has_forward = "peak" in shape
    rows = [
        f"### C={channels}, {size}³, batch {BATCH}",
        "",
        f"Converting the NCDHW input to channels_last_3d: {shape['conversion'] * 1e3:.1f} ms "
        f"(inside every non-reference time). Load average while measuring: {shape['load']}.",
        *(
            [
                "",
                f"Roofline: GEMM peak {shape['peak']:.0f} GF/s, input-sized copy {shape['bandwidth']:.0f} GB/s.",
            ]
            if has_forward
            else []
        ),
        "",
        "| family | impl | params | MACs/sample | best ms | median ms | GF/s | ratio vs ref Conv3d "
        "| ratio vs best Conv3d | chosen |"
        + (
            " executed/analytic | % roofline | fwd ms | fwd ratio vs best Conv3d | fwd % roofline |"
            if has_forward
            else ""
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|" + ("---:|---:|---:|---:|---:|" if has_forward else ""),
    ]
    for family, (op, args) in FAMILIES.items():
        chosen = make_spec(op, channels, channels, **args).fast_impl()
        order = impl_names()
        for r in sorted((r for r in rows_in if r["family"] == family), key=lambda r: order.index(r["impl"])):
            seconds = best[(family, r["impl"])]
            flops = 3 * 2 * r["macs"] * BATCH  # forward, input grad and weight grad each cost the forward MACs
            mac_share = r["macs"] / conv3d_macs
            rows.append(
                f"| {family} | {r['impl']} | {r['params']:,} | {r['macs'] / 1e6:,.1f}M | {seconds * 1e3:,.1f} | "
                f"{statistics.median(r['times']) * 1e3:,.1f} | "
                f"{flops / seconds / 1e9:.1f} | {seconds / conv3d_reference / mac_share:.2f} | "
                f"{seconds / conv3d_best / mac_share:.2f} | {'✓' if r['impl'] == chosen else ''} |"
            )
            if has_forward:
                ahead = forward[(family, r["impl"])]
                trained = roofline_share(r, channels, size, flops / seconds / 1e9, shape, True)
                rows[-1] += (
                    f" {r['executed']:.2f} | {100 * trained:.0f}%"
                    f" | {ahead * 1e3:,.2f} | {ahead / forward_best / mac_share:.2f} | "
                    f"{100 * roofline_share(r, channels, size, flops / 3 / ahead / 1e9, shape, False):.0f}% |"
                )
    blocked = []
    for family, (op, args) in FAMILIES.items():
        ratio = make_spec(op, channels, channels, **args).graph().blocked_ratio((size,) * 3)
        if ratio > 1.005:
            blocked.append(f"{family} {ratio:.2f}")
    if blocked:
        rows += [
            "",
            "MACs oneDNN executes over the analytic ones where a conv's output channels (per group) do not fill its "
            "blocks of 16 (`ConvGraph.blocked_ratio`; the `reference`, `channels_last` and `folded` rows run every "
            "conv of the op on oneDNN; every other family 1.00): " + ", ".join(blocked) + ".",
        ]
    return [*rows, ""]


def render(run: dict) -> str:
    header = [
        "## Measured run",
        "",
        f"- command: `{run['command']}` ({run['repeats']} interleaved repeats after a warm-up; best and median)",
        *(
            [
                "- input: channels_last_3d (as inside a network of fast ops): no NCDHW conversion of x, nor of "
                "the input gradient autograd keeps for the leaf x, in any time below"
            ]
            if run.get("input") == "channels_last_3d"
            else []
        ),
        f"- date: {run['date']}, torch {run['torch']}, CPU: {run['cpu']}, {run['threads']} threads, "
        f"oneDNN {run['onednn']}",
        "- the load average while each shape ran is given with it: on a shared machine absolute times are noisy; "
        "interleaving spreads other jobs' load over all variants, but a disturbed repeat can be 30x slow",
        *(
            [
                "- memory: freed blocks stay in the process (`psc_nas.memory.keep_freed_memory`, as in psc-search "
                "and psc-train): no time below includes page-faulting a fresh output buffer in"
            ]
            if run.get("keep_freed_memory")
            else [
                "- memory: glibc's defaults (`--fresh-memory`, or a run before that option existed): buffers above "
                "its mmap threshold are mapped and page-faulted in at every call, inside the times below"
            ]
        ),
        f"- pricing: `make_spec(...).cost(...)` priced {run['priced_per_second']:,.0f} candidates per second",
        f"- whole run: {run['seconds']:.0f} s for the shapes below",
        *(
            [f"- depthwise C++ kernel build/load before timing: {run['kernel_load_s']:.1f} s"]
            if run.get("kernel_load_s") is not None
            else []
        ),
        "",
    ]
    return "\n".join(header + [line for shape in run["shapes"] for line in shape_table(shape)])


def kernel_load_seconds() -> float | None:
    """Build or load the depthwise C++ kernel before anything is timed; its seconds, None if unavailable."""
    from psc_nas.ops import depthwise

    return depthwise.KERNEL.load_seconds() if depthwise.KERNEL.available() else None


def run_all(args: argparse.Namespace, command: str, save: Callable[[dict], None]) -> dict:
    """Measure every shape, calling ``save`` after each so a cut-short run keeps what it measured."""
    torch.set_num_threads(args.threads)
    kept = False if args.fresh_memory else keep_freed_memory()
    torch.manual_seed(0)
    rng = random.Random(0)
    started = time.perf_counter()
    run = {
        "command": command,
        "repeats": args.repeats,
        "input": "channels_last_3d" if args.channels_last_input else "NCDHW",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "onednn": "on" if torch.backends.mkldnn.enabled else "off",
        "keep_freed_memory": kept,
        "priced_per_second": pricing_rate(),
        "peak": gemm_peak(),
        "kernel_load_s": kernel_load_seconds(),
        "shapes": [],
    }
    for size in args.sizes:
        for channels in args.channels:
            load_before = os.getloadavg()[0]
            layout = torch.channels_last_3d if args.channels_last_input else torch.contiguous_format
            variants, conversion, bandwidth = measure(channels, size, args.repeats, rng, layout)
            rows = [
                {
                    "family": v.family,
                    "impl": v.impl,
                    "macs": v.macs,
                    "params": v.params,
                    "executed": v.executed,
                    "times": v.times,
                    "forward_times": v.forward_times,
                }
                for v in variants
            ]
            load = "{:.1f}-{:.1f}".format(*sorted([load_before, os.getloadavg()[0]]))
            shape = {
                "channels": channels,
                "size": size,
                "conversion": conversion,
                "load": load,
                "peak": run["peak"],
                "bandwidth": bandwidth,
                "variants": rows,
            }
            run["shapes"].append(shape)
            run["seconds"] = time.perf_counter() - started
            save(run)
            print(f"C={channels} {size}³ done after {run['seconds']:.0f} s", file=sys.stderr)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--channels-last-input",
        action="store_true",
        help="feed channels_last_3d inputs, as inside a network of fast ops: no conversion of x or of its grad",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the issue's setting)")
    parser.add_argument("--families", nargs="+", help=f"only these rows (always with conv3d); of {list(FAMILIES)}")
    parser.add_argument("--quick", action="store_true", help="C=16 at 32³, 3 repeats")
    parser.add_argument(
        "--fresh-memory",
        action="store_true",
        help="leave glibc's malloc defaults (large buffers page-faulted in at every call) instead of keeping freed "
        "memory as psc-search and psc-train do",
    )
    parser.add_argument("--out", default="docs/benchmarks/ops.md", help="markdown path, or - for stdout")
    parser.add_argument(
        "--render", action="store_true", help="re-render the markdown from the raw times saved next to it"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.channels, args.sizes, args.repeats = [16], [32], 3
    if args.families:
        unknown = sorted(set(args.families) - set(FAMILIES))
        if unknown:
            parser.error(f"unknown --families {unknown}; choose from {list(FAMILIES)}")
        for name in [name for name in FAMILIES if name != "conv3d" and name not in args.families]:
            del FAMILIES[name]
    if args.out == "-":
        print(render(run_all(args, command_line(argv), save=lambda run: None)))
        return
    markdown = Path(args.out)
    raw = markdown.with_suffix(".json")

    def save(run: dict) -> None:
        raw.write_text(json.dumps(run, indent=1))
        intro = markdown.read_text().split("## Measured run")[0] if markdown.exists() else "# Operator speed\n\n"
        markdown.write_text(intro + render(run))

    if args.render:
        save(json.loads(raw.read_text()))
    else:
        run_all(args, command_line(argv), save)


def command_line(argv: list[str] | None) -> str:
    return " ".join(["python benchmarks/ops.py", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    main()

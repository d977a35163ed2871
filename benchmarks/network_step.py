"""Wall time of one training step of whole networks: the presets of a backbone, forward + backward.

    python benchmarks/network_step.py                          # every preset on densenet3d (IBSR), 32³, batch 4
    python benchmarks/network_step.py --presets cakes_uniform conv3d --threads 2 --repeats 5
    python benchmarks/network_step.py --latency                # and psc-search's latency objective per preset

Each preset's network is built with the default implementation rule (``impl="auto"``) and placed on the CPU as
psc-search and psc-train place it (``psc_nas.device.place``: weights in channels_last_3d), warmed up by two
steps, then timed ``--repeats`` times; best and median are printed with the
load average; with ``--latency`` also the latency objective psc-search records
(``search.latency.forward_latency_ms``: the median of 9 inference forwards of one sample). Freed memory stays in the
process as in psc-train. To compare two versions of the rule, run
this file from each checkout (``git worktree add``) on the same machine, one after the other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from psc_nas.device import place
from psc_nas.memory import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="densenet3d")
    parser.add_argument("--presets", nargs="+", help="default: every preset that builds on the backbone")
    parser.add_argument("--size", type=int, default=32, help="cube side of the input (default 32, IBSR's patch)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency", action="store_true", help="also time psc-search's latency objective")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    import psc_nas
    from psc_nas.presets import preset_config, presets
    from psc_nas.search.latency import forward_latency_ms

    latency = " latency ms |" if args.latency else ""
    print(
        f"| preset | params | best ms | median ms |{latency} load |  ({args.backbone}, {args.size}³, "
        f"batch {args.batch}, {args.threads} threads, {args.repeats} repeats)"
    )
    print("|---|---|---|---|---|" + ("---|" if args.latency else ""))
    for name in args.presets or sorted(presets()):
        config = preset_config(name, args.backbone)
        model = place(psc_nas.build_model(config), torch.device("cpu")).train()
        x = torch.randn(args.batch, config.hparams["in_channels"], *(args.size,) * 3)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(x).float().mean().backward()

        step()
        step()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        params = sum(p.numel() for p in model.parameters())
        if args.latency:
            shape = (config.hparams["in_channels"], *(args.size,) * 3)
            latency = f" {forward_latency_ms(config, shape, repeats=9):.1f} |"
        print(
            f"| {name} | {params:,} | {min(times) * 1e3:.0f} | {statistics.median(times) * 1e3:.0f} |{latency} "
            f"{os.getloadavg()[0]:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Speed of the ``supernet`` evaluator on IBSR: SPOS seconds per step and seconds per scored candidate.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/supernet_speed.py '{"steps": 30, "train_size": 16}' OUT_DIR

Prints wall and process-CPU seconds (CPU: what the work costs one core, whatever else loads the
machine) with the load average, for the training and for 4 candidates drawn from the space.
Results: docs/benchmarks/supernet.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from psc_nas.evaluators import EvaluatorSetup, make_evaluator
from psc_nas.space import SearchSpace
from psc_nas.tasks import get_task


def main() -> None:
    options = json.loads(sys.argv[1])
    out = Path(sys.argv[2])
    evaluator = make_evaluator(
        "supernet", EvaluatorSetup(get_task("ibsr"), seed=0, space=SearchSpace.load("ibsr_densenet3d"), options=options)
    )
    wall, cpu = time.perf_counter(), time.process_time()
    evaluator.prepare(out, seconds_left=None)
    print(
        f"prepare: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU; "
        f"training {evaluator.steps} steps: {evaluator.train_seconds / evaluator.steps:.2f} s wall/step, "
        f"{evaluator.train_cpu_seconds / evaluator.steps:.3f} s CPU/step; load {os.getloadavg()[0]:.1f}"
    )
    draw = evaluator.supernet.sampler(5)
    for _ in range(4):
        cpu = time.process_time()
        result = evaluator.evaluate(draw(), evaluator.levels()[-1], seconds_left=None)
        print(
            f"{result.fidelity.words}: dice_mean {result.metrics['dice_mean']:.3f}, {result.wall_s:.2f} s wall, "
            f"{time.process_time() - cpu:.2f} s CPU; load {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()

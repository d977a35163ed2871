"""A zero-cost pre-screen: many architectures ranked at initialisation before any is trained.

``psc-search --prescreen zico+macs --prescreen-size 100``: when the study is created, ``size`` distinct
architectures are drawn within the budget (each decision uniform among the answers that can still fit, as the
restricted sampler asks them), each is scored by one proxy of ``psc_nas.evaluators.zero_cost`` (the network the
search prices — or, with ``--prescreen-width W`` below 1, its copy at width multiplier W: the same choices,
``nets.budget.with_width``, W² of the compute — at initialisation from the run's seed, on one batch of the task's
training data, with the task's ``screen_data_options``) — or, for ``<proxy>+macs``, by the proxy's rank plus the
full network's MAC count's rank among the architectures screened (two predictors that each rank the fidelity
panel and agree with each other only partly, equally weighted; docs/benchmarks/fidelity.md) — and the queue's
free entries (those the presets leave) get the best of them instead of the sampler's picks: successive
non-dominated fronts of (proxy, cost), so that the cheap end of the cost range is screened as well as the large
end, the last front thinned by NSGA-II's crowding distance. Those are trained like any other candidate; the
proxy never enters the front, which stays in the task's metric.

What the screen saw is kept in the study (user attribute ``prescreen``: every row) and written to the run
folder as prescreen.csv. Whether a proxy ranks architectures better than their parameter count is measured,
not assumed: docs/benchmarks/fidelity.md.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from psc_nas.arch import ArchConfig
from psc_nas.evaluators.zero_cost import CONTROLS, PROXIES, proxy_score, training_batch
from psc_nas.files import write_text_atomic
from psc_nas.nets.budget import with_width
from psc_nas.pareto import crowding_distances, non_dominated_ranks
from psc_nas.search.catalog import Answers
from psc_nas.search.pricing import Pricing
from psc_nas.search.record import PRESCREEN

log = logging.getLogger("psc_nas.search")

DEFAULT_SIZE = 100
DEFAULT_WIDTH = 1.0  # the network the search prices; IBSR's quick profile scores width 0.25 (fidelity.md)
WITH_MACS = "+macs"  # "<proxy>+macs": the proxy's rank plus the MAC count's rank among the screened
CHOICES = tuple(p + suffix for suffix in ("", WITH_MACS) for p in (*PROXIES, *CONTROLS))
SCREEN_COSTS = ("params", "macs")  # the costs a screen trades its proxy against, as the front's cost objectives


@dataclass(frozen=True)
class Prescreen:
    """What ``--prescreen`` asks: score ``size`` architectures by ``proxy`` before any training (the run's seed
    initialises the networks and picks the batch; ``data_dir`` is the run's data), each network at width
    multiplier ``width`` (its costs stay the full network's)."""

    proxy: str
    size: int = DEFAULT_SIZE
    seed: int = 0
    data_dir: Any = None
    asked: bool = True  # --prescreen asked for it; False: the profile's default (skipping it is no news)
    width: float = DEFAULT_WIDTH

    def __post_init__(self) -> None:
        if self.proxy not in CHOICES:
            raise ValueError(f"unknown --prescreen proxy {self.proxy!r}; choose from {', '.join(CHOICES)}")
        if self.size < 1:
            raise ValueError(f"--prescreen-size must be at least 1, got {self.size}")
        if not 0.0 < self.width <= 1.0:
            raise ValueError(f"--prescreen-width must be in (0, 1], got {self.width:g}")

    def scored(self, config: ArchConfig) -> ArchConfig:
        """The network the proxy scores for ``config``: itself, or its copy at ``width``."""
        return config if self.width == 1.0 else with_width(config, self.width)

    @property
    def zero_cost(self) -> str:
        """The zero-cost proxy computed per network (``zico`` of ``zico+macs``)."""
        return self.proxy.removesuffix(WITH_MACS)

    @property
    def with_macs(self) -> bool:
        return self.proxy.endswith(WITH_MACS)


@dataclass(frozen=True)
class Screened:
    """One architecture the screen scored."""

    arch_hash: str
    params: int
    macs: int
    score: float  # what ranks: the proxy (or its rank + the MACs' rank), larger = predicted better; -inf: failed
    answers: Answers
    queued: bool = False
    proxy_value: float | None = None  # the zero-cost proxy itself, where ``score`` combines it with the MACs

    def row(self) -> dict[str, Any]:
        return {
            "arch_hash": self.arch_hash,
            "params": self.params,
            "macs": self.macs,
            "score": _finite(self.score),
            **({"proxy_value": _finite(self.proxy_value)} if self.proxy_value is not None else {}),
            "queued": self.queued,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def ranks_with_macs(values: Sequence[float], macs: Sequence[int]) -> list[float]:
    """Each finite value's rank (1 = lowest, ties averaged) plus its MAC count's rank among the same rows; a value
    that is not finite stays -inf."""
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]
    total = (
        pd.Series([values[i] for i in finite], dtype=float).rank()
        + pd.Series([macs[i] for i in finite], dtype=float).rank()
    )
    scores = [-math.inf] * len(values)
    for i, score in zip(finite, total.tolist()):
        scores[i] = score
    return scores


def draw(pricing: Pricing, count: int, *, seed: int, avoid: set[str]) -> list[ArchConfig]:
    """Up to ``count`` distinct architectures within the budget, none of ``avoid`` (hashes): fewer only where the
    space under the budget holds fewer."""
    rng = random.Random(seed)
    found: dict[str, ArchConfig] = {}
    misses = 0
    while len(found) < count and misses < 20 * count:
        config, _ = pricing.feasibility.decide(lambda name, choices, admissible: rng.choice(admissible))
        if config.hash in found or config.hash in avoid or not pricing.fits(config):
            misses += 1
            continue
        found[config.hash] = config
    return list(found.values())


def choose(rows: Sequence[Screened], keep: int, costs: Sequence[str] = ("params",)) -> list[int]:
    """Indices of the ``keep`` rows to train: whole non-dominated fronts of (score ↑, ``costs`` ↓) in turn, the
    front that does not fit whole thinned by crowding distance (its extremes first). Rows whose score is not
    finite come last."""
    finite = [i for i, r in enumerate(rows) if math.isfinite(r.score)]
    points = [(-rows[i].score, *(float(getattr(rows[i], c)) for c in costs)) for i in finite]
    ranks = non_dominated_ranks(points) if points else []
    chosen: list[int] = []
    for rank in sorted(set(ranks)):
        room = keep - len(chosen)
        if room <= 0:
            break
        front = [j for j, r in enumerate(ranks) if r == rank]
        if len(front) > room:
            distance = crowding_distances([points[j] for j in front])
            front = [front[k] for k in sorted(range(len(front)), key=lambda k: (-distance[k], k))[:room]]
        chosen += sorted(finite[j] for j in front)
    rest = sorted((i for i, r in enumerate(rows) if not math.isfinite(r.score)), key=lambda i: rows[i].params)
    chosen += rest[: max(0, keep - len(chosen))]
    return chosen


def screen(
    prescreen: Prescreen,
    pricing: Pricing,
    task: Any,
    *,
    keep: int,
    avoid: set[str] | None = None,
    costs: Sequence[str] = ("params",),
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[list[Screened], float, str]:
    """Draw, score and choose: every row scored (``queued`` marks the ``keep`` chosen), the seconds it took and
    the batch scored on, in words. ``progress(done, total)`` hears of every architecture scored."""
    started = time.monotonic()
    configs = draw(pricing, prescreen.size, seed=prescreen.seed, avoid=avoid or set())
    batch = screening_batch(prescreen, task)
    proxy = prescreen.zero_cost
    rows: list[Screened] = []
    for config in configs:
        try:
            score = proxy_score(proxy, prescreen.scored(config), task, seed=prescreen.seed, batch=batch)
        except Exception as error:  # one network's failure (out of memory, a NaN) ranks it last, no more
            log.warning("pre-screen: %s of %s failed (%s); ranked last", proxy, config.hash[:8], error)
            score = -math.inf
        price = pricing.price(config)
        answers = pricing.catalog.answers_for(config)
        assert answers is not None  # drawn from the catalog's own space
        rows.append(
            Screened(config.hash, price.params, price.macs, score if math.isfinite(score) else -math.inf, answers)
        )
        progress(len(rows), len(configs))
    if prescreen.with_macs:
        combined = ranks_with_macs([r.score for r in rows], [r.macs for r in rows])
        rows = [replace(r, score=c, proxy_value=r.score) for r, c in zip(rows, combined)]
    queued = set(choose(rows, keep, costs))
    rows = [replace(r, queued=i in queued) for i, r in enumerate(rows)]
    return rows, time.monotonic() - started, describe_batch(batch, task)


def screening_batch(prescreen: Prescreen, task: Any) -> Any:
    """The one batch every architecture is scored on: the task's training data with its ``screen_data_options``,
    fixed by the run's seed."""
    return training_batch(task, seed=prescreen.seed, data_dir=prescreen.data_dir, **task.screen_data_options)


def describe_batch(batch: Any, task: Any) -> str:
    """``4 samples of 1x16x16x16``: what the proxy saw."""
    shape = tuple(batch[task.input_key].shape)
    return f"{shape[0]} samples of {'x'.join(map(str, shape[1:]))}"


def record(
    study: optuna.Study, prescreen: Prescreen, rows: Sequence[Screened], seconds: float, batch: str = ""
) -> dict[str, Any]:
    """Keep the screen in the study (what the outputs read back); returns what it kept. ``batch``: what the proxy
    was computed on, in words (``describe_batch``)."""
    data = {
        "proxy": prescreen.proxy,
        "size": prescreen.size,
        "seed": prescreen.seed,
        "batch": batch,
        "width": prescreen.width,
        "scored": len(rows),
        "queued": sum(r.queued for r in rows),
        "seconds": round(seconds, 1),
        "rows": [r.row() for r in rows],
    }
    study.set_user_attr(PRESCREEN, data)
    return data


def describe(data: dict[str, Any]) -> str:
    """One line for the log and the display."""
    on = f"{_at_width(data)} on {data['batch']}" if data.get("batch") else _at_width(data)
    return (
        f"pre-screen: ranked {data['scored']} architectures by {data['proxy']} at initialisation{on} in "
        f"{data['seconds']:.0f} s; queued the best {data['queued']} for training"
    )


CSV = "prescreen.csv"


def write_csv(out_dir: Path, data: dict[str, Any]) -> None:
    """The run folder's prescreen.csv: every architecture scored, best first, ``queued`` marking those trained."""
    combined = data["proxy"].endswith(WITH_MACS)
    columns = ["arch_hash", "params", "macs", *(["proxy_value"] if combined else []), "score", "queued"]
    table = pd.DataFrame(data["rows"], columns=columns)
    names = {"score": data["proxy"], "proxy_value": data["proxy"].removesuffix(WITH_MACS)}
    table = table.rename(columns=names).sort_values(data["proxy"], ascending=False)
    write_text_atomic(out_dir / CSV, table.to_csv(index=False))


def summary(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """pareto.json's "prescreen" section: the screen without its rows (those are in prescreen.csv)."""
    if data is None:
        return None
    return {
        **{k: v for k, v in data.items() if k != "rows"},
        "file": CSV,
        "what": f"{data['scored']} architectures drawn within the budget were scored by {_words(data['proxy'])} "
        f"at initialisation (no training){_at_width(data)}{' on ' + data['batch'] if data.get('batch') else ''} "
        "before the search; "
        f"the {data['queued']} non-dominated in (score, cost) were queued for training after the presets. The score "
        "ranks; it is never a trial's value.",
    }


def _at_width(data: dict[str, Any]) -> str:
    """`` of each network's copy at width 0.25`` where the screen scored reduced copies (older studies: none)."""
    width = data.get("width", DEFAULT_WIDTH)
    return "" if width == 1.0 else f" of each network's copy at width {width:g} (its costs the full network's)"


def _words(proxy: str) -> str:
    if proxy.endswith(WITH_MACS):
        return f"the zero-cost proxy {proxy.removesuffix(WITH_MACS)}'s rank plus the MAC count's rank"
    return f"the zero-cost proxy {proxy}"

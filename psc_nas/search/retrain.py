"""After the search loop: retrain the front's knee and its neighbours from scratch, longer.

A search ranks candidates cheaply (a few epochs on a few patches, or weight sharing); the numbers it
ends with are noisy and low. The network a user gets deserves a real training, so the search ends by
training the knee of its front and its neighbours on the front again, from scratch, at full width
with ``psc_nas.train.fit`` (the same ``fit`` as ``psc-train``), for the longest schedule that fits
the time left:

    members = knee, then its neighbours on the front by cost, up to ``policy.count``;
    those already retrained in this study (a resume) are skipped
    ─► one epoch of the costliest of them, timed (the probe): its epoch time and its set-up time
    ─► epochs = the most, up to ``policy.epochs``, that let every member (set-up + epochs) train
       within the time left
    ─► each member: fit(epochs) ─► front/<trial>.weights.pt (its final weights, the ones scored)
                                ─► record.Retrained (study attribute ``retrained:<arch_hash>``, naming that file)

Every member trains the same schedule with the same seed, so their retrained scores compare. When
only one epoch fits, the probe is the costliest member's result and the others train one epoch while
time lasts. The knee of the retrained scores (``Front.best``) becomes best.yaml.

Several workers on one study each retrain after their loop; a member another worker already
finished is skipped, but two workers that end together may both train the same one (no claim yet).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, Timer

from psc_nas.evaluators.base import Evaluation, Fidelity, failure_reason
from psc_nas.search.front import Front
from psc_nas.search.profiles import RetrainPolicy
from psc_nas.search.record import Retrained, TrialRecord
from psc_nas.train import fit, optimizer_class
from psc_nas.weights import WEIGHTS_SUFFIX, save_weights, state_of

log = logging.getLogger("psc_nas.search")
EVALUATOR = "retrain"


@dataclass(frozen=True)
class RetrainJob:
    """What retraining needs besides the front: the policy, the task and its data, the seed, and the
    run folder that keeps each retrained network's weights (``front/<trial>.weights.pt``; None: not kept)."""

    policy: RetrainPolicy
    task: object
    seed: int = 0
    data_dir: Path | None = None
    out_dir: Path | None = None


WEIGHTS_DIR = "front"


def weights_file(number: int) -> str:
    """Where a retrained trial's weights go, relative to the run folder: beside its ``front/<n>.yaml``."""
    return f"{WEIGHTS_DIR}/{number}{WEIGHTS_SUFFIX}"


class FinalWeights(Callback):
    """Keeps the network's weights as training ends: the weights its last validation scored."""

    def __init__(self) -> None:
        self.state: dict | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = state_of(pl_module.net)  # type: ignore[arg-type]


def choose_members(front: Front, count: int) -> list[TrialRecord]:
    """The knee, then its neighbours on the front ordered by cost (nearest first, the cheaper side
    first on ties), up to ``count``; one per architecture."""
    if front.knee is None:
        return []
    ordered = sorted(front.members, key=lambda r: (tuple(r.values[1:]), r.number))  # type: ignore[index]
    at = next(i for i, r in enumerate(ordered) if r.number == front.knee.number)
    by_distance = sorted(range(len(ordered)), key=lambda i: (abs(i - at), i))
    chosen: list[TrialRecord] = []
    hashes: set[str | None] = set()
    for index in by_distance:
        record = ordered[index]
        if record.arch_hash in hashes:
            continue
        hashes.add(record.arch_hash)
        chosen.append(record)
        if len(chosen) == count:
            break
    return chosen


def fidelity_words(policy: RetrainPolicy, epochs: int) -> str:
    """How a member was retrained, in words: its schedule and optimiser (the one ``fit`` builds), so that runs of
    other recipes do not read alike."""
    schedule = {"onecycle": ", one-cycle", "constant": ""}.get(policy.lr_schedule, f", {policy.lr_schedule}")
    optimiser = f"{optimizer_class(policy.weight_decay).__name__} lr {policy.lr:g}"
    if policy.weight_decay:
        optimiser += f" (weight decay {policy.weight_decay:g})"
    return (
        f"retrained: {epochs} epoch{'s' if epochs != 1 else ''} × {policy.samples_per_epoch} samples"
        f"{schedule}, {optimiser}, full width"
    )


def train_member(job: RetrainJob, record: TrialRecord, epochs: int, *, seconds_left: float | None) -> Retrained:
    """Train ``record``'s architecture from scratch for ``epochs``; the result as a ``Retrained``.
    Past ``seconds_left`` the training stops at an epoch end and reports the epochs it finished.
    With ``job.out_dir``, the final weights (those the recorded metrics score) are saved there first."""
    policy = job.policy
    deadline = [Timer(duration=timedelta(seconds=seconds_left), interval="epoch")] if seconds_left else []
    final = FinalWeights()
    result = fit(
        record.config(),
        job.task,
        epochs=epochs,
        seed=job.seed,
        data_dir=job.data_dir,  # type: ignore[arg-type]
        lr=policy.lr,
        weight_decay=policy.weight_decay,
        lr_schedule=policy.lr_schedule,
        data_options=policy.data_options(),
        callbacks=[*deadline, final],
    )
    weights = None
    if job.out_dir is not None and final.state is not None:
        weights = weights_file(record.number)
        save_weights(final.state, Path(job.out_dir) / weights)
    evaluation = Evaluation(
        EVALUATOR,
        Fidelity(result.epochs, fidelity_words(policy, result.epochs)),
        result.metrics,
        result.curve,
        result.wall_seconds,
        result.fwd_bwd_seconds,
        evaluated_by=record.number,
    )
    return Retrained(record.arch_hash or record.config().hash, evaluation, job.seed, record.number, weights)


@dataclass(frozen=True)
class Plan:
    members: tuple[TrialRecord, ...]
    epochs: int
    # each member's probe: (one epoch, training + validation; the rest of its wall time: data, model, first-call
    # warm-up) in seconds; empty when the schedule was not timed
    timings: tuple[tuple[float, float], ...] = ()

    @property
    def probe_s(self) -> float | None:
        """One epoch, the members' mean; None when not timed."""
        return sum(t[0] for t in self.timings) / len(self.timings) if self.timings else None

    @property
    def setup_s(self) -> float:
        """A probe's set-up, the members' mean."""
        return sum(t[1] for t in self.timings) / len(self.timings) if self.timings else 0.0

    def member_s(self, index: int) -> float:
        """Expected seconds of the retraining of ``members[index]`` (a timed plan)."""
        epoch, setup = self.timings[index]
        return setup + epoch * self.epochs


def probe_timing(wall_s: float, curve: Sequence[dict[str, float]] | None) -> tuple[float, float]:
    """(seconds of one epoch, seconds of everything else) of a one-epoch probe, from its wall time and its
    learning curve. The epoch's own time comes from the curve (``epoch_s``, training + validation); the set-up
    (data, model, the first calls' warm-up) is paid once per training, not per epoch, so an epoch count from the
    whole wall time would under-use the time left. Without a timed curve, the whole wall time is an epoch."""
    wall = max(wall_s, 1e-3)
    epoch = curve[-1].get("epoch_s") if curve else None
    if not epoch or epoch <= 0 or epoch > wall:
        return wall, 0.0
    return epoch, wall - epoch


def epochs_that_fit(seconds: float, epoch_s: float, setup_s: float, most: int) -> int:
    """The most epochs, up to ``most``, of one training (its set-up, then epochs of ``epoch_s``) within
    ``seconds``; 0 or less when not even one fits. Both engines' retraining schedules are sized by it."""
    return min(most, math.floor((seconds - setup_s) / epoch_s))


def retrain_front(
    front: Front,
    job: RetrainJob,
    *,
    done: Callable[[], set[str]],
    seconds_left: Callable[[], float | None],
    save: Callable[[Retrained], None],
    on_plan: Callable[[Plan], None] = lambda plan: None,
    train: Callable[..., Retrained] | None = None,
) -> list[Retrained]:
    """Retrain the members ``choose_members`` picks that ``done()`` (hashes already retrained) lacks,
    within ``seconds_left()`` (None: no limit, ``policy.epochs``); ``save`` stores each result as it
    comes. ``train`` replaces ``train_member``. Returns the new results; a member whose training fails
    is logged and skipped. With a time limit, one epoch of each member (a probe) times the schedule: every
    member then trains the longest schedule whose sum over the members fits; where only one epoch fits, the
    probes are the results."""
    train = train or train_member
    members = [m for m in choose_members(front, job.policy.count) if m.arch_hash not in done()]
    if not members:
        return []
    left = seconds_left()
    probes: list[Retrained] = []
    if left is None:
        plan = Plan(tuple(members), job.policy.epochs)
    else:
        costliest = max(members, key=lambda m: (m.macs or 0, m.params or 0))
        if left < search_epoch_s(costliest):  # not even the search's shorter epoch fits: no probe either
            log.info("no time left to retrain the front (%.0f s left)", left)
            return []
        # One epoch of every member, the costliest first, times the schedule: members of the same schedule differ
        # in speed (on a 2-core Xeon csn_ip's retraining took 0.67 of csn_ir's), and sizing every member like the
        # costliest left the cheaper members' difference unused (the default run there ended 2:13 before its
        # retraining deadline, at 26 epochs; docs/benchmarks/search.md 2m).
        by_member: dict[int, Retrained] = {}
        for member in sorted(members, key=lambda m: m is not costliest):
            if by_member and (seconds_left() or 0.0) <= 0.0:
                break
            probe = _attempt(train, job, member, 1, None)
            if probe is not None:
                by_member[member.number] = probe
        members = [m for m in members if m.number in by_member]  # in their order: the knee first
        probes = [by_member[m.number] for m in members]
        if not probes:
            return []
        timings = [probe_timing(p.evaluation.wall_s, p.evaluation.curve) for p in probes]
        epoch_sum, setup_sum = sum(t[0] for t in timings), sum(t[1] for t in timings)
        epochs = epochs_that_fit(seconds_left() or 0.0, epoch_sum, setup_sum, job.policy.epochs)
        if epochs > 1:
            for probe in probes:
                _discard_weights(job, probe)
            probes = []  # timings only: every member trains the longer schedule from scratch
        else:  # one epoch fits: the probes are the members' results
            epochs = 1
        plan = Plan(tuple(members), epochs, tuple(timings))
    on_plan(plan)
    results: list[Retrained] = []
    for probe in probes:
        save(probe)
        results.append(probe)
    if probes:
        return results
    for index, member in enumerate(plan.members):
        left = seconds_left()
        if left is not None and plan.probe_s is not None and left < plan.member_s(index) * 0.5:
            log.info("no time left to retrain trial %d (%d epochs)", member.number, plan.epochs)
            continue
        result = _attempt(train, job, member, plan.epochs, left)
        if result is not None:
            save(result)
            results.append(result)
    return results


def search_epoch_s(record: TrialRecord) -> float:
    """Seconds per unit of fidelity of the trial's own top result: for the ``train`` evaluator one
    search epoch, on fewer samples than a retraining epoch, so a lower bound of one; 0 when unknown."""
    result = record.result
    return result.wall_s / max(result.fidelity.key, 1) if result is not None else 0.0


def _attempt(
    train: Callable[..., Retrained], job: RetrainJob, member: TrialRecord, epochs: int, seconds_left: float | None
) -> Retrained | None:
    """One retraining; a failure (divergence, out of memory, a bug) is logged and skips this member only."""
    try:
        return train(job, member, epochs, seconds_left=seconds_left)
    except Exception as error:
        log.warning("retraining trial %d failed: %s", member.number, failure_reason(error))
        return None


def _discard_weights(job: RetrainJob, result: Retrained) -> None:
    """A probe's weights are no result: its member trains again (and may fail), so they go."""
    if job.out_dir is not None and result.weights:
        (Path(job.out_dir) / result.weights).unlink(missing_ok=True)


def retrained_hashes(records: Sequence[TrialRecord]) -> set[str]:
    return {r.retrained.arch_hash for r in records if r.retrained is not None}

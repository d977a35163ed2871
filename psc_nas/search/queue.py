"""The study's queue: the architectures a search is to evaluate, shared by every worker.

``trials`` entries are enqueued once, when the study is created (the papers' presets that fit the
budget first, each marked with its name; they climb the fidelities by the same rule as every
candidate), and workers only ever take entries from it. That makes ``--trials`` the study's total,
exact with any number of workers, and a re-run of the same command a resume: it finds the entries
left, plus retries of trials a dead worker held. An over-budget candidate gets a replacement entry,
so ``--trials`` counts evaluated architectures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import optuna

from psc_nas.search.catalog import Answers
from psc_nas.search.optuna_adapter import claim_waiting
from psc_nas.search.record import StudyRecord, enqueue, set_planned_trials

log = logging.getLogger("psc_nas.search")

MAX_REPLACEMENTS_PER_ENTRY = 20  # over-budget samples replaced before the sampler is deemed lost


class StudyQueue:
    def __init__(self, study: optuna.Study, trials: int) -> None:
        self.study = study
        self.trials = trials
        self.planned = trials  # the study's total, once filled: more when an earlier run planned more

    def fill(self, presets: Mapping[str, Answers], screened: Sequence[tuple[Answers, str]] = ()) -> None:
        """Enqueue ``presets`` and a pre-screen's picks (``screened``: answers and how each ranked), only when
        creating the study, then blank entries up to ``trials``."""
        planned = StudyRecord.read(self.study).planned_trials or 0
        for name, answers in presets.items():
            if planned < self.trials:
                enqueue(self.study, answers, preset=name)
                planned += 1
        for answers, why in screened:
            if planned < self.trials:
                enqueue(self.study, answers, why=why)
                planned += 1
        for _ in range(self.trials - planned):
            enqueue(self.study, {})
        self.planned = max(planned, self.trials)
        set_planned_trials(self.study, self.planned)

    def claim(self) -> optuna.Trial | None:
        return claim_waiting(self.study)

    def replace(self, over_budget: int) -> None:
        """Queue a replacement for an over-budget sample, unless the sampler keeps missing the budget."""
        if over_budget <= MAX_REPLACEMENTS_PER_ENTRY * self.trials:
            enqueue(self.study, {})
        else:
            log.warning(
                "%d over-budget samples so far; not replacing more (is the budget near the space's minimum?)",
                over_budget,
            )

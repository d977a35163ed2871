"""A plugin for the CLI tests (``PSC_NAS_PLUGINS=quick_schedules``): the em and ucf101 tasks' quick search
schedules cut to a few steps per candidate, through the same ``Task.profile_overrides`` the tasks use, so a
real ``psc-search`` on their embedded data takes seconds per trial (their own schedules take minutes)."""

from __future__ import annotations

from psc_nas.tasks.em import EMTask
from psc_nas.tasks.ucf101 import UCF101Task

SHORT = {"epochs": (1, 2), "data_options": {"samples_per_epoch": 8, "batch_size": 4}}

for task in (EMTask, UCF101Task):
    task.profile_overrides = {"quick": {**task.profile_overrides["quick"], **SHORT}}

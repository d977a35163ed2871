"""Extensions from outside the package: op families, backbones and tasks that register themselves.

A plugin is a module that registers what it defines when it is imported (an op family, a backbone, a
task). psc-nas imports plugins once, the first time one of its registries is read:

- the modules named in ``$PSC_NAS_PLUGINS`` (comma-separated import names, e.g. ``mylab.ghostconv``),
  for a one-off experiment or a test;
- the entry points of the group ``psc_nas.plugins`` of installed distributions, for a package::

      [project.entry-points."psc_nas.plugins"]
      ghost = "mylab.ghostconv"

A plugin that cannot be imported is a user error: one line naming it, never a silently missing op.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

ENV_VAR = "PSC_NAS_PLUGINS"
ENTRY_POINT_GROUP = "psc_nas.plugins"

_state = "unloaded"  # "loading" while plugins import (they read registries themselves), then "loaded"


class PluginError(ValueError):
    """A plugin that cannot be imported; the message names it and where it was asked for."""


def plugin_modules() -> list[str]:
    return [name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip()]


def load_plugins() -> None:
    """Import every plugin once; registries call this before they are read."""
    global _state
    if _state != "unloaded":
        return
    _state = "loading"
    try:
        for name in plugin_modules():
            try:
                importlib.import_module(name)
            except Exception as err:  # any error inside a plugin is the plugin's, reported in one line
                raise PluginError(f"${ENV_VAR}: cannot import plugin {name!r}: {type(err).__name__}: {err}") from None
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()
            except Exception as err:
                raise PluginError(
                    f"entry point {entry.name!r} ({entry.value}) of group {ENTRY_POINT_GROUP}: cannot import: "
                    f"{type(err).__name__}: {err}"
                ) from None
    except BaseException:
        _state = "unloaded"  # a fixed environment gets another try; the error reaches the user now
        raise
    _state = "loaded"

"""Backbones built from an ArchConfig; every 3D conv slot is searchable.

Every module of this package is imported here, so each backbone module registers itself
(``registry.py``) without a hand-kept list; third-party backbones register through ``psc_nas.plugins``.
"""

import pkgutil
from importlib import import_module

from psc_nas.nets.base import Backbone
from psc_nas.nets.budget import fit_to_budget
from psc_nas.nets.build import build_model, cost, validate, validated
from psc_nas.nets.registry import BACKBONES, backbones, get_backbone, register_backbone
from psc_nas.nets.torch_module import ModuleNet, allow_module, convert, from_module

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BACKBONES",
    "Backbone",
    "ModuleNet",
    "allow_module",
    "backbones",
    "build_model",
    "convert",
    "cost",
    "fit_to_budget",
    "from_module",
    "get_backbone",
    "register_backbone",
    "validate",
    "validated",
]

"""Operator families that can fill a 3D conv slot, with exact analytic cost.

Every module of this package is imported here, so each family module registers its ``OpFamily``
record (``registry.py``) without a hand-kept list; third-party families register through
``psc_nas.plugins``. Nothing outside a family's module names the family.

>>> from psc_nas.ops import create_op, make_spec
>>> make_spec("pmscn", 32, 64, m=2, n=1).cost((16, 16, 16))  # doctest: +SKIP
"""

import pkgutil
from importlib import import_module

from psc_nas.ops.base import ENV_VAR, Op, OpSpec, PlainConv, create_op, impl_names, implementation, make_spec
from psc_nas.ops.blocks import label, realize, rescale, summary
from psc_nas.ops.domain import Choice, OpDomain, Pick, parse_domain
from psc_nas.ops.fast import EXACT_IMPLS, FastGraphConv
from psc_nas.ops.graph import INPUT, ConvGraph, GraphConv, Node
from psc_nas.ops.registry import OpFamily, families, get_family, register_family

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ENV_VAR",
    "EXACT_IMPLS",
    "INPUT",
    "Choice",
    "ConvGraph",
    "FastGraphConv",
    "GraphConv",
    "Node",
    "Op",
    "OpDomain",
    "OpFamily",
    "OpSpec",
    "Pick",
    "PlainConv",
    "create_op",
    "families",
    "get_family",
    "impl_names",
    "implementation",
    "label",
    "make_spec",
    "parse_domain",
    "realize",
    "register_family",
    "rescale",
    "summary",
]

"""A SearchSpace as NNI 3 mutables (``pip install 'psc-nas[nni]'``); imported only by ``to_nni()``.

NNI's mutables have no conditions, so every parameter of every op is a ``Categorical``, labelled
as in Optuna (``b3.pmscn.m``); ``freeze`` runs the space's own define-by-run ``decide`` on the
sample, which reads only the parameters of the chosen ops and ignores the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nni.mutable import Categorical, MutableDict

from psc_nas.arch import ArchConfig

if TYPE_CHECKING:
    from psc_nas.space import SearchSpace


class NniArchSpace(MutableDict):
    def __init__(self, space: SearchSpace) -> None:
        super().__init__({name: Categorical(list(choices), label=name) for name, choices in space.parameters().items()})
        self.arch_space = space

    def freeze(self, sample: dict[str, Any]) -> ArchConfig:  # type: ignore[override]
        self.validate(sample)
        return self.arch_space.decide(lambda name, choices: sample[name])

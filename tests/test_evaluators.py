"""Evaluators: the registry, and the ``train`` evaluator on a real (tiny) training of the embedded IBSR cohort."""

from __future__ import annotations

import pytest
import torch
from test_train import TINY, TINY_DATA, SmallPatchIBSR

from psc_nas.evaluators import EvaluatorSetup, Fidelity, evaluator_names, make_evaluator, register_evaluator
from psc_nas.evaluators.train import TrainEvaluator
from psc_nas.nets import cost
from psc_nas.presets import preset_config


def test_train_evaluator_offers_the_profile_s_epochs_in_words():
    evaluator = make_evaluator("train", EvaluatorSetup(SmallPatchIBSR(), epochs=(1, 3), data_options=TINY_DATA))
    assert isinstance(evaluator, TrainEvaluator) and evaluator.name == "train"
    assert evaluator.levels() == (Fidelity(1, "1 epoch × 4 samples"), Fidelity(3, "3 epochs × 4 samples"))
    assert TrainEvaluator(EvaluatorSetup(SmallPatchIBSR(), epochs=(2,))).levels() == (Fidelity(2, "2 epochs"),)


def test_train_evaluator_trains_from_scratch_and_reports_what_it_reached():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps on a shared 2-core machine: see tests/test_train.py
    try:
        task = SmallPatchIBSR()
        evaluator = TrainEvaluator(EvaluatorSetup(task, epochs=(1,), data_options=TINY_DATA))
        config = preset_config("p1sc1", task.backbone, **task.backbone_hparams, **TINY)
        result = evaluator.evaluate(config, evaluator.levels()[0], seconds_left=None)
    finally:
        torch.set_num_threads(threads)
    assert result.evaluator == "train" and result.fidelity == Fidelity(1, "1 epoch × 4 samples")
    assert 0 <= result.metrics["dice_mean"] <= 1 and len(result.curve) == 1
    assert result.wall_s > result.fwd_bwd_s > 0 and result.val_forward_s > 0
    assert result.evaluated_by is None  # the search fills in which trial it was


def test_registry_names_evaluators_and_refuses_unknown_or_twice_registered_ones():
    assert "train" in evaluator_names()
    with pytest.raises(ValueError, match="unknown evaluator 'nope'; known: .*train"):
        make_evaluator("nope", EvaluatorSetup(SmallPatchIBSR()))
    with pytest.raises(ValueError, match="evaluator 'train' is already registered"):
        register_evaluator("train", TrainEvaluator)


def test_train_evaluator_options_reduced_width_and_schedule():
    setup = EvaluatorSetup(
        SmallPatchIBSR(),
        epochs=(1,),
        data_options=TINY_DATA,
        options={"width": 0.5, "lr_schedule": "onecycle", "lr": 2e-3},
    )
    evaluator = make_evaluator("train", setup)
    assert evaluator.levels()[0].words.endswith(", width 0.5, lr 0.002, onecycle")  # how candidates are trained
    task = SmallPatchIBSR()
    config = preset_config("cakes_uniform", task.backbone, **task.backbone_hparams, **TINY)
    proxy = evaluator.network(config)
    assert [b.op for b in proxy.blocks] == [b.op for b in config.blocks]
    assert proxy.hparams["width"] == pytest.approx(0.5 * config.hparams["width"])
    assert cost(proxy, (16, 16, 16)).params < cost(config, (16, 16, 16)).params
    with pytest.raises(ValueError, match="unknown option.*depth.*known: width"):
        make_evaluator("train", EvaluatorSetup(SmallPatchIBSR(), options={"depth": 2}))
    with pytest.raises(ValueError, match="width must be in"):
        make_evaluator("train", EvaluatorSetup(SmallPatchIBSR(), options={"width": 2}))

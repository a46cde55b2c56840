"""LossSettings: every loss setting in one frozen object, checked when made, the same object from
every entry point (dpo_fast.loss, DPOLoss, TrainConfig, the op boundary)."""

import dataclasses
import math

import pytest
import torch

import dpo_fast
from dpo_fast import LossSettings
from dpo_fast.loss_settings import Component


def test_spellings_of_a_loss_parse_to_the_same_parts():
    want = (Component("sigmoid", 0.8), Component("ipo", 0.2))
    for loss_type, weights in ((("sigmoid", "ipo"), (0.8, 0.2)), ("sigmoid,ipo", "0.8,0.2"),
                               ("sigmoid*0.8+ipo*0.2", None), (["sigmoid", "ipo"], [0.8, 0.2])):
        s = LossSettings.make(loss_type=loss_type, loss_weights=weights)
        assert s.parts == want and s.spec == "sigmoid*0.8+ipo*0.2" and s.types == ("sigmoid", "ipo")
    assert LossSettings.make(loss_type="ipo").spec == "ipo" and LossSettings.make(loss_type="ipo").per_token
    assert not LossSettings.make(loss_type=("sigmoid", "ipo")).per_token  # a mixture: each type its own kind


@pytest.mark.parametrize("kw, match", [
    (dict(beta=0.0), "beta: expected > 0.0, got 0.0"), (dict(beta=math.inf), "beta: expected a finite number"),
    (dict(beta="0.1"), "beta must be a number"), (dict(label_smoothing=0.5), "label_smoothing: expected in"),
    (dict(sft_weight=-1), "sft_weight: expected >= 0.0"), (dict(loss_type="dpo"), "loss_type must be one of"),
    (dict(loss_type="sigmoid,sigmoid"), "more than once"), (dict(loss_type="a*x"), "bad weight"),
    (dict(loss_type="sigmoid,ipo", loss_weights="1"), "1 weight"), (dict(loss_weights=[-1]), ">= 0"),
    (dict(loss_type="sigmoid,ipo", average_log_prob=True), "average_log_prob applies to a single"),
    (dict(logits_memory_mb=0), "logits_memory_mb"), (dict(backend="fast"), "backend"),
])
def test_bad_settings_are_refused_when_made(kw, match):
    with pytest.raises(ValueError, match=match):
        LossSettings.make(**kw)


def test_frozen_and_the_op_boundary_round_trip():
    s = LossSettings.make(beta=torch.tensor(0.25), loss_type="sigmoid,ipo", loss_weights="0.7,0.3",
                          label_smoothing=0.1, sft_weight=0.2, logits_memory_mb=3, backend="reference")
    assert s.beta == 0.25 and isinstance(s.beta, float) and s.logits_memory_mb == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.beta = 1.0
    back = LossSettings.from_op_args(*s.op_args())
    assert back == s.replace(logits_memory_mb=None, backend="auto")  # the op takes those two as its own arguments
    with pytest.raises(ValueError, match="beta"):
        s.replace(beta=-1)


def test_dpo_loss_module_and_function_make_the_same_settings():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 6, 11, generator=g), torch.randint(0, 11, (4, 6), generator=g)
    kw = dict(beta=0.3, loss_type="robust", label_smoothing=0.1, sft_weight=0.2)
    settings = LossSettings.make(**kw)
    module = dpo_fast.DPOLoss(settings)
    assert module.settings is settings and dpo_fast.DPOLoss(**kw).settings == settings
    assert module(logits, labels).loss.item() == dpo_fast.loss(logits, labels, **kw).loss.item()
    assert repr(module) == "DPOLoss(beta=0.3, loss_type='robust', label_smoothing=0.1, sft_weight=0.2)"
    with pytest.raises(ValueError, match="not both"):
        dpo_fast.DPOLoss(settings, beta=0.2)
    with pytest.raises(TypeError, match="LossSettings"):
        dpo_fast.DPOLoss(0.1)


def test_train_config_builds_it_and_names_the_flags():
    from dpo_fast.trainer.config import TrainConfig, TrainError

    cfg = TrainConfig(model="m", data="d", output_dir="o", beta=0.2, logits_memory_mb=600, loss_type="sigmoid,ipo",
                      loss_weights="0.5,0.5")
    s = cfg.loss_settings()
    assert (s.beta, s.logits_memory_mb, s.spec) == (0.2, 600.0, "sigmoid*0.5+ipo*0.5")
    for kw, flag in ((dict(beta=-1.0), "--beta: expected > 0.0"), (dict(logits_memory_mb=-5.0), "--logits-memory-mb"),
                     (dict(label_smoothing=0.5), "--label-smoothing"), (dict(loss_weights="1,2"), "--loss-weights")):
        with pytest.raises(TrainError, match=flag):
            TrainConfig(model="m", data="d", output_dir="o", **kw).loss_settings()

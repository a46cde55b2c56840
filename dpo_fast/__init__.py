"""dpo_fast: fused DPO loss kernels that never materialise vocabulary-sized float32 buffers."""

from __future__ import annotations

__version__ = "0.1.0"

from .backends import BACKENDS, available_backends
from .functional import linear_sequence_logprobs, sequence_logprobs
from .loss import DPOLoss, DPOOutput, loss
from .loss_settings import LOSS_TYPES, LossSettings, loss_spec
from .objectives import PreferenceLossOutput, plackett_luce_loss, preference_loss
from .ranking import RankingOutput, ranking_loss, ranking_metric_names
from .tensor_parallel import VocabShard

__all__ = [
    "BACKENDS", "available_backends", "sequence_logprobs", "linear_sequence_logprobs",
    "preference_loss", "plackett_luce_loss", "PreferenceLossOutput", "LOSS_TYPES",
    "loss", "DPOLoss", "DPOOutput", "LossSettings", "VocabShard", "train", "precompute_reference", "loss_spec", "ranking_loss",
    "RankingOutput", "ranking_metric_names",
]


def __getattr__(name):
    # Imported on first use: the trainer and cache pull in transformers and datasets.
    if name == "train":
        from .trainer import train
        return train
    if name == "precompute_reference":
        from .refcache import precompute_reference
        return precompute_reference
    raise AttributeError(f"module 'dpo_fast' has no attribute {name!r}")

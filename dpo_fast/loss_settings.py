"""`LossSettings`: every setting of the DPO loss in one frozen object, checked once when it is made.

Who makes one: `dpo_fast.loss(...)` and `DPOLoss(...)` from their keywords, `TrainConfig.loss_settings()`
(`dpo-fast train` / `dpo-fast eval`), the TRL drop-in from the trainer's attributes at each step,
`preference_loss` / `ranking_loss` from theirs. It then travels as it is down to the custom ops, whose
schemas take plain scalars: `op_args()` flattens it there and `from_op_args()` rebuilds it inside.

A loss is one type or a weighted mixture (TRL's loss_type list with loss_weights): `parts`, a tuple
of (type, weight). `parse_loss_type` is the one reader of the spellings users write: a name,
a list of names, "a,b", or the canonical spec string "sigmoid*0.8+bco_pair*0.2" (`spec`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

from torch import Tensor

from .backends import check_backend_name

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm")
# Loss types defined on per-token (length-averaged) log-ratios when computed from tokens.
AVERAGED_LOSS_TYPES = ("ipo",)


class Component(NamedTuple):
    loss_type: str
    weight: float


def as_number(value, name: str) -> float:
    """A Python number, or a 0-dim real tensor (e.g. beta=torch.tensor(0.1)), as a float; else a ValueError."""
    if isinstance(value, Tensor) and value.ndim == 0 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number (or a 0-dim tensor), got {value!r}")
    return float(value)


def _split_weights(loss_weights) -> list | None:
    if loss_weights is None or isinstance(loss_weights, (list, tuple)):
        return loss_weights
    if isinstance(loss_weights, str):
        try:
            return [float(w) for w in loss_weights.split(",")]
        except ValueError:
            raise ValueError(f"loss_weights must be numbers separated by commas, got {loss_weights!r}") from None
    if isinstance(loss_weights, numbers.Real) and not isinstance(loss_weights, bool):
        return [loss_weights]
    raise ValueError(f"loss_weights must be a list of numbers, one per loss type, got {loss_weights!r}")


def parse_loss_type(loss_type, loss_weights=None) -> tuple[Component, ...]:
    """The (type, weight) parts of what a user wrote: a name, a list of names or "a,b" (with
    loss_weights, default 1 each), or a spec "a*0.8+b*0.2" (which carries its weights). Only the
    spelling is read here; LossSettings checks the names and weights."""
    if isinstance(loss_type, tuple) and loss_type and all(isinstance(c, Component) for c in loss_type):
        names, weights = [c.loss_type for c in loss_type], [c.weight for c in loss_type]
    elif isinstance(loss_type, str) and ("*" in loss_type or "+" in loss_type):
        if loss_weights is not None:
            raise ValueError(f"loss_type {loss_type!r} already carries its weights; leave loss_weights unset")
        names, weights = [], []
        for item in loss_type.split("+"):
            name, _, weight = item.partition("*")
            try:
                weights.append(float(weight) if weight else 1.0)
            except ValueError:
                raise ValueError(f"loss_type {loss_type!r}: bad weight {weight!r}") from None
            names.append(name.strip())
    elif isinstance(loss_type, str):
        names, weights = [t.strip() for t in loss_type.split(",")], _split_weights(loss_weights)
    elif isinstance(loss_type, (list, tuple)) and loss_type and all(isinstance(t, str) for t in loss_type):
        names, weights = [t.strip() for t in loss_type], _split_weights(loss_weights)
    else:
        raise ValueError(f"loss_type must be a loss type name or a non-empty list of them, got {loss_type!r}")
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} weight(s) for {len(names)} loss type(s): give one weight "
                         "per type of loss_type, in the same order")
    return tuple(Component(n, as_number(w, "loss_weights")) for n, w in zip(names, weights))


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The settings of the DPO-family loss, checked when made (ValueError naming the setting).

    beta: KL strength (> 0). parts: the loss types and their weights (anything parse_loss_type
    reads; kept as a tuple of Component). label_smoothing: in [0, 0.5). sft_weight: weight (>= 0) of
    the chosen responses' per-token NLL (RPO). average_log_prob: per-token log-ratios (None: True
    for 'ipo' alone; a mixture computes each type on its own kind and takes None).
    logits_memory_mb: the hidden form's budget for logits (None: never hold logits; see
    dpo_fast.loss). backend: the kernel backend name ("auto" picks per device)."""

    beta: float = 0.1
    parts: tuple = (Component("sigmoid", 1.0),)
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    average_log_prob: bool | None = None
    logits_memory_mb: float | None = None
    backend: str = "auto"

    @classmethod
    def make(cls, *, loss_type="sigmoid", loss_weights=None, **settings) -> LossSettings:
        """From the keywords users write (loss_type and loss_weights as TRL's)."""
        return cls(parts=parse_loss_type(loss_type, loss_weights), **settings)

    def __post_init__(self):
        parts = self.parts if isinstance(self.parts, tuple) and all(isinstance(c, Component) for c in self.parts) \
            else parse_loss_type(self.parts)
        object.__setattr__(self, "parts", _checked_parts(parts))
        object.__setattr__(self, "beta", _in_range(self.beta, "beta", "> 0.0", lambda x: x > 0))
        object.__setattr__(self, "label_smoothing", _in_range(self.label_smoothing, "label_smoothing",
                                                              "in [0, 0.5)", lambda x: 0 <= x < 0.5))
        object.__setattr__(self, "sft_weight", _in_range(self.sft_weight, "sft_weight", ">= 0.0", lambda x: x >= 0))
        if self.average_log_prob is not None:
            if not isinstance(self.average_log_prob, bool):
                raise ValueError(f"average_log_prob must be True, False or None, got {self.average_log_prob!r}")
            if len(self.parts) > 1:
                raise ValueError("average_log_prob applies to a single loss type; in a mixture each type uses its "
                                 "own log-ratios (ipo per token, the others summed): leave it unset")
        mb = self.logits_memory_mb
        if mb is not None:
            if isinstance(mb, bool) or not isinstance(mb, numbers.Real) or not (math.isfinite(mb) and mb > 0):
                raise ValueError(f"logits_memory_mb must be a positive finite number of megabytes (10^6 bytes) or "
                                 f"None, got {mb!r}")
            object.__setattr__(self, "logits_memory_mb", float(mb))
        check_backend_name(self.backend)

    # -- views

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(c.loss_type for c in self.parts)

    @property
    def spec(self) -> str:
        """The canonical spelling: "sigmoid", or "sigmoid*0.8+bco_pair*0.2"."""
        if len(self.parts) == 1 and self.parts[0].weight == 1.0:
            return self.parts[0].loss_type
        return "+".join(f"{c.loss_type}*{c.weight!r}" for c in self.parts)

    @property
    def per_token(self) -> bool:
        """average_log_prob as it applies: per-token log-ratios when every type is defined on them."""
        if self.average_log_prob is not None:
            return self.average_log_prob
        return all(t in AVERAGED_LOSS_TYPES for t in self.types)

    def replace(self, **changes) -> LossSettings:
        return dataclasses.replace(self, **changes)

    # -- the op boundary

    def op_args(self) -> tuple:
        """The objective's settings as the custom ops' schemas take them (no list of strings there):
        (beta, "type,type", [weight, weight], label_smoothing, sft_weight, per_token)."""
        return (self.beta, ",".join(self.types), [c.weight for c in self.parts], self.label_smoothing,
                self.sft_weight, self.per_token)

    @classmethod
    def from_op_args(cls, beta, loss_types, loss_weights, label_smoothing, sft_weight, per_token) -> LossSettings:
        """Inside an op: the inverse of op_args (logits_memory_mb and backend are the op's own arguments)."""
        parts = tuple(Component(t, w) for t, w in zip(loss_types.split(","), loss_weights))
        return cls(beta, parts, label_smoothing, sft_weight, per_token if len(parts) == 1 else None)


def _in_range(value, name: str, rule: str, ok) -> float:
    value = as_number(value, name)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if not ok(value):
        raise ValueError(f"{name}: expected {rule}, got {value!r}")
    return value


def _checked_parts(parts: tuple[Component, ...]) -> tuple[Component, ...]:
    names = [c.loss_type for c in parts]
    unknown = [t for t in names if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {unknown[0]!r}")
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise ValueError(f"loss_type lists {repeated[0]!r} more than once")
    bad = [c.weight for c in parts if not (math.isfinite(c.weight) and c.weight >= 0)]
    if bad:
        raise ValueError(f"loss_weights must be finite numbers >= 0, got {bad[0]!r}")
    if not any(c.weight for c in parts):
        raise ValueError("loss_weights are all 0: the loss would be 0")
    return tuple(Component(c.loss_type, float(c.weight)) for c in parts)


def loss_spec(loss_type, loss_weights=None) -> str:
    """The canonical spec of a loss: a type name, or a list of them (or "a,b") with loss_weights
    (default 1 each) -> "sigmoid" or "sigmoid*0.8+bco_pair*0.2" (checked)."""
    return LossSettings.make(loss_type=loss_type, loss_weights=loss_weights).spec

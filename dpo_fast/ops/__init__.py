"""The torch.library ops (namespace dpo_fast): importing this package registers them all."""

from . import dpo_loss, linear, linear_loss, logprobs, vocab_parallel  # noqa: F401  (registration side effects)

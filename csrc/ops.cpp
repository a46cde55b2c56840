// Schemas of the dpo_fast_C operators. Implementations: csrc/cpu/token_ops_cpu.cpp (CPU) and
// csrc/cuda_glue.cpp (CUDA, only in CUDA builds). Fake (meta) kernels and autograd are
// registered in Python (the fakes in dpo_fast/ops/logprobs.py). See csrc/README.md for the contract.
#include <torch/library.h>

TORCH_LIBRARY(dpo_fast_C, m) {
  // Per row (s, t) with targets[s, t] >= 0: lse = logsumexp(logits[s, t, :]),
  // target_logit = logits[s, t, targets[s, t]], logit_sum = sum(logits[s, t, :]);
  // rows with a negative target: all three are 0 and the row is not read.
  m.def(
      "token_stats(Tensor logits, Tensor targets) -> "
      "(Tensor lse, Tensor target_logit, Tensor logit_sum)");
  // grad[s, t, :] = g_token[s, t] * (onehot(targets[s, t]) - exp(logits[s, t, :] - lse[s, t]))
  // for scored rows, exact zeros for unscored rows. grad may be logits itself (in-place).
  m.def(
      "token_grad(Tensor logits, Tensor targets, Tensor lse, Tensor g_token, "
      "Tensor(a!) grad) -> ()");
}

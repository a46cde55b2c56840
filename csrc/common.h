// Argument checks shared by the CPU and CUDA implementations of the dpo_fast_C ops.
// (Torch headers: included by .cpp files only, never by the .cu kernels.)
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>

namespace dpo_fast {

// Capability the CPU kernels were compiled for: "avx512", "avx2" or "default".
const char* cpu_kernels_capability();

inline bool is_supported_logits_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// lse / target_logit / logit_sum / g_token dtype for a logits dtype.
inline at::ScalarType stats_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_logits_layout(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.dim() == 3, "dpo_fast_C::", op, ": ", name, " must be 3-D (S, T, V), got ",
              x.dim(), "-D");
  TORCH_CHECK(is_supported_logits_dtype(x.scalar_type()), "dpo_fast_C::", op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, "dpo_fast_C::", op, ": ", name,
              " must have stride(2) == 1 (vocab contiguous), got strides ", x.strides());
}

inline void check_rows_tensor(const at::Tensor& x, const at::Tensor& logits, at::ScalarType dtype,
                              const char* name, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == logits.size(0) && x.size(1) == logits.size(1),
              "dpo_fast_C::", op, ": ", name, " must have shape (S, T) = (", logits.size(0), ", ",
              logits.size(1), "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, "dpo_fast_C::", op, ": ", name, " must be ", dtype,
              ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == logits.device(), "dpo_fast_C::", op, ": ", name,
              " must be on the logits' device ", logits.device(), ", got ", x.device());
}

inline void check_token_stats_args(const at::Tensor& logits, const at::Tensor& targets,
                                   const char* /*backend*/) {
  check_logits_layout(logits, "logits", "token_stats");
  check_rows_tensor(targets, logits, at::kLong, "targets", "token_stats");
}

// Byte range [lo, hi) spanned by a strided tensor (strides are non-negative in torch).
inline void byte_span(const at::Tensor& x, uintptr_t& lo, uintptr_t& hi) {
  lo = reinterpret_cast<uintptr_t>(x.data_ptr());
  uintptr_t last = 0;
  for (int64_t d = 0; d < x.dim(); ++d) {
    last += static_cast<uintptr_t>(x.size(d) - 1) * static_cast<uintptr_t>(x.stride(d));
  }
  hi = lo + (last + 1) * static_cast<uintptr_t>(x.element_size());
}

inline void check_token_grad_args(const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse, const at::Tensor& g_token,
                                  const at::Tensor& grad, const char* /*backend*/) {
  const char* op = "token_grad";
  check_logits_layout(logits, "logits", op);
  check_rows_tensor(targets, logits, at::kLong, "targets", op);
  const auto sd = stats_dtype(logits.scalar_type());
  check_rows_tensor(lse, logits, sd, "lse", op);
  check_rows_tensor(g_token, logits, sd, "g_token", op);
  TORCH_CHECK(grad.sizes() == logits.sizes(), "dpo_fast_C::token_grad: grad must have the logits' shape ",
              logits.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type(),
              "dpo_fast_C::token_grad: grad must have the logits' dtype ", logits.scalar_type(),
              ", got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == logits.device(),
              "dpo_fast_C::token_grad: grad must be on the logits' device");
  TORCH_CHECK(grad.size(2) <= 1 || grad.stride(2) == 1,
              "dpo_fast_C::token_grad: grad must have stride(2) == 1, got strides ", grad.strides());
  if (grad.numel() == 0) {
    return;
  }
  TORCH_CHECK(at::has_internal_overlap(grad) != at::MemOverlap::Yes,
              "dpo_fast_C::token_grad: grad has internally overlapping memory (e.g. an expanded "
              "tensor); pass a tensor with distinct elements");
  // grad is either logits itself (same start and strides: in-place backward) or disjoint from it.
  const bool identical =
      grad.data_ptr() == logits.data_ptr() && grad.strides() == logits.strides();
  if (!identical) {
    uintptr_t alo, ahi, blo, bhi;
    byte_span(logits, alo, ahi);
    byte_span(grad, blo, bhi);
    TORCH_CHECK(ahi <= blo || bhi <= alo,
                "dpo_fast_C::token_grad: grad partially overlaps logits; it must be the logits "
                "tensor itself (in-place) or not share memory with it");
  }
}

}  // namespace dpo_fast

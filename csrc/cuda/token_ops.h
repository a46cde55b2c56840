// CUDA kernels of dpo_fast_C::token_stats / token_grad: plain CUDA, no torch headers.
// The torch glue (csrc/cuda_glue.cpp) checks the tensors, fills these structs and calls the
// launchers on the current stream. See csrc/README.md for the contract.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dpo_fast {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// Element type of lse / target_logit / logit_sum / g_token: float, or double for kFloat64.
struct TokenStatsParams {
  const void* logits = nullptr;       // (S, T, V), element strides (stride_s, stride_t, 1)
  const int64_t* targets = nullptr;   // (S, T) contiguous; < 0 = unscored, >= V = invalid
  void* lse = nullptr;                // (S, T) contiguous outputs
  void* target_logit = nullptr;
  void* logit_sum = nullptr;
  DType dtype = DType::kFloat32;
  int64_t S = 0, T = 0, V = 0;
  int64_t stride_s = 0, stride_t = 0;  // in elements
};

struct TokenGradParams {
  const void* logits = nullptr;       // (S, T, V), element strides (stride_s, stride_t, 1)
  const int64_t* targets = nullptr;   // (S, T) contiguous
  const void* lse = nullptr;          // (S, T) contiguous, float (double for kFloat64)
  const void* g_token = nullptr;      // (S, T) contiguous, float (double for kFloat64)
  void* grad = nullptr;               // (S, T, V), strides (grad_stride_s, grad_stride_t, 1);
                                      // may equal logits (same pointer and strides)
  DType dtype = DType::kFloat32;
  int64_t S = 0, T = 0, V = 0;
  int64_t stride_s = 0, stride_t = 0;            // logits, in elements
  int64_t grad_stride_s = 0, grad_stride_t = 0;  // grad, in elements
};

// Enqueue the kernel on `stream`. Returns cudaSuccess, cudaErrorInvalidValue for parameters the
// kernels cannot handle (e.g. V too large for the grid), or the launch error.
cudaError_t launch_token_stats(const TokenStatsParams& p, cudaStream_t stream);
cudaError_t launch_token_grad(const TokenGradParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace dpo_fast

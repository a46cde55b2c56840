// Torch glue of the CUDA kernels (csrc/cuda/token_ops.cu): argument checks, output allocation,
// the params structs, the current stream, launch-error checks, and the CUDA registrations.
// Compiled only in CUDA builds (setup.py with a CUDA torch + nvcc, or CMake -DDPO_FAST_CUDA=ON).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (= at::cuda::...)
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cuda/token_ops.h"

namespace dpo_fast {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kDouble:
      return cuda::DType::kFloat64;
    default:
      TORCH_CHECK(false, "dpo_fast_C (CUDA): unsupported logits dtype ", t);
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "dpo_fast_C::", op, " (CUDA): kernel launch failed: ",
              cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_stats_cuda(const at::Tensor& logits,
                                                                 const at::Tensor& targets_in) {
  check_token_stats_args(logits, targets_in, "cuda");
  TORCH_CHECK(logits.is_cuda(), "dpo_fast_C::token_stats (CUDA): logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const at::Tensor targets = targets_in.contiguous();
  const auto opts = logits.options().dtype(stats_dtype(logits.scalar_type()));
  const int64_t S = logits.size(0), T = logits.size(1), V = logits.size(2);
  // Every row is written by the kernel (zeros for unscored rows), so no zero-fill here.
  at::Tensor lse = at::empty({S, T}, opts);
  at::Tensor tl = at::empty({S, T}, opts);
  at::Tensor lsum = at::empty({S, T}, opts);
  if (lse.numel() == 0) {
    return {lse, tl, lsum};
  }
  cuda::TokenStatsParams p;
  p.logits = logits.const_data_ptr();
  p.targets = targets.const_data_ptr<int64_t>();
  p.lse = lse.data_ptr();
  p.target_logit = tl.data_ptr();
  p.logit_sum = lsum.data_ptr();
  p.dtype = to_kernel_dtype(logits.scalar_type());
  p.S = S;
  p.T = T;
  p.V = V;
  p.stride_s = logits.stride(0);
  p.stride_t = logits.stride(1);
  check_launch(cuda::launch_token_stats(p, c10::cuda::getCurrentCUDAStream()), "token_stats");
  return {lse, tl, lsum};
}

void token_grad_cuda(const at::Tensor& logits, const at::Tensor& targets_in,
                     const at::Tensor& lse_in, const at::Tensor& g_in, const at::Tensor& grad) {
  check_token_grad_args(logits, targets_in, lse_in, g_in, grad, "cuda");
  TORCH_CHECK(logits.is_cuda(), "dpo_fast_C::token_grad (CUDA): logits must be a CUDA tensor");
  if (grad.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor g_token = g_in.contiguous();
  cuda::TokenGradParams p;
  p.logits = logits.const_data_ptr();
  p.targets = targets.const_data_ptr<int64_t>();
  p.lse = lse.const_data_ptr();
  p.g_token = g_token.const_data_ptr();
  p.grad = grad.data_ptr();
  p.dtype = to_kernel_dtype(logits.scalar_type());
  p.S = logits.size(0);
  p.T = logits.size(1);
  p.V = logits.size(2);
  p.stride_s = logits.stride(0);
  p.stride_t = logits.stride(1);
  p.grad_stride_s = grad.stride(0);
  p.grad_stride_t = grad.stride(1);
  check_launch(cuda::launch_token_grad(p, c10::cuda::getCurrentCUDAStream()), "token_grad");
}

}  // namespace

TORCH_LIBRARY_IMPL(dpo_fast_C, CUDA, m) {
  m.impl("token_stats", &token_stats_cuda);
  m.impl("token_grad", &token_grad_cuda);
}

}  // namespace dpo_fast

// CUDA kernels of dpo_fast_C::token_stats / token_grad (no torch headers; see token_ops.h).
//
// token_stats: a team of TPR threads per row (a warp for small V, a whole block for large V).
//   Each thread reads 16-byte packs of the row (after a scalar head that reaches 16-byte
//   alignment: rows of a view can start anywhere), keeps an online (max, sum-exp, sum, nan)
//   state, rescaling at most once per pack; teams reduce with warp shuffles, then shared memory.
//   Unscored rows (target < 0) write zeros and return before reading; target >= V writes NaN.
// token_grad: grid (row teams) x (vocab chunks) so that large V spreads over the SMs. Each thread
//   loads its U packs, then computes g * (onehot - exp(x - lse)) and stores them; every element
//   is read and written by the same thread, so grad may alias logits (in-place backward).
//   16-byte stores when logits and grad rows have the same alignment phase, scalar otherwise.
// Arithmetic in float (double for float64); bf16 / f16 are converted on load and on store.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "token_ops.h"

namespace dpo_fast {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Element types

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Store<double> {
  static __device__ __forceinline__ double from(double x) { return x; }
};
template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Store<__half> {
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }  // ignores NaN
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }

template <typename A>
__device__ __forceinline__ A acc_inf();
template <>
__device__ __forceinline__ float acc_inf<float>() { return CUDART_INF_F; }
template <>
__device__ __forceinline__ double acc_inf<double>() { return CUDART_INF; }
template <typename A>
__device__ __forceinline__ A acc_nan();
template <>
__device__ __forceinline__ float acc_nan<float>() { return CUDART_NAN_F; }
template <>
__device__ __forceinline__ double acc_nan<double>() { return CUDART_NAN; }

// 16 bytes of elements.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / static_cast<int>(sizeof(T));
  T v[N];
};

constexpr int kUnroll = 4;  // packs per thread per grad chunk / per stats loop iteration
// Blocks per SM that token_grad's register budget is sized for (__launch_bounds__): 4 (64 registers)
// keeps 32 warps resident; double needs more than 64 registers or it spills (ptxas -v, sm_90a).
template <typename T>
constexpr int kGradMinBlocks = sizeof(T) == 8 ? 2 : 4;

// Elements before the first 16-byte aligned address of a row (element-aligned pointer).
template <typename T>
__device__ __forceinline__ int64_t aligned_head(const void* p, int64_t V) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const int64_t head = static_cast<int64_t>(((16u - (a & 15u)) & 15u) / sizeof(T));
  return head < V ? head : V;
}

// ------------------------------------------------------------------------------------------------
// Online log-sum-exp state

template <typename A>
struct LseState {
  A m;    // running max (NaN ignored)
  A s;    // sum of exp(x - m); meaningless when m is +-inf
  A sum;  // sum of x
  int nan;
};

template <typename A>
__device__ __forceinline__ LseState<A> lse_identity() {
  return LseState<A>{-acc_inf<A>(), A(0), A(0), 0};
}

// Absorb K values: at most one rescale, K exps.
template <typename A, int K>
__device__ __forceinline__ void absorb(LseState<A>& st, const A (&v)[K]) {
  A lm = -acc_inf<A>();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    st.nan |= (v[k] != v[k]);
    lm = acc_max(lm, v[k]);
    st.sum += v[k];
  }
  const A nm = acc_max(st.m, lm);
  if (nm == -acc_inf<A>() || nm == acc_inf<A>()) {
    st.m = nm;  // nothing finite yet (s stays 0), or lse = +inf from now on
    return;
  }
  // Rescale only when the max moved (st.m = -inf gives exp(-inf) = 0, never inf - inf).
  A acc = nm == st.m ? st.s : st.s * acc_exp(st.m - nm);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    acc += acc_exp(v[k] - nm);
  }
  st.s = acc;
  st.m = nm;
}

template <typename A>
__device__ __forceinline__ LseState<A> merge(const LseState<A>& a, const LseState<A>& b) {
  LseState<A> r;
  r.nan = a.nan | b.nan;
  r.sum = a.sum + b.sum;
  r.m = acc_max(a.m, b.m);
  if (r.m == -acc_inf<A>() || r.m == acc_inf<A>()) {
    r.s = A(0);
  } else {
    r.s = a.s * acc_exp(a.m - r.m) + b.s * acc_exp(b.m - r.m);
  }
  return r;
}

template <typename A>
__device__ __forceinline__ LseState<A> warp_reduce(LseState<A> st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState<A> o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.sum = __shfl_xor_sync(0xffffffffu, st.sum, off);
    o.nan = __shfl_xor_sync(0xffffffffu, st.nan, off);
    st = merge(st, o);
  }
  return st;
}

template <typename A>
__device__ __forceinline__ A finish_lse(const LseState<A>& st) {
  if (st.nan) return acc_nan<A>();
  if (st.m == acc_inf<A>()) return acc_inf<A>();
  if (st.m == -acc_inf<A>()) return -acc_inf<A>();  // all logits -inf
  return st.m + acc_log(st.s);
}

// ------------------------------------------------------------------------------------------------
// token_stats

template <typename T, int TPR, int BLOCK>
__global__ void __launch_bounds__(BLOCK) token_stats_kernel(const TokenStatsParams p) {
  static_assert(TPR % 32 == 0 && BLOCK % TPR == 0, "bad team shape");
  using A = typename AccOf<T>::type;
  constexpr int N = Pack<T>::N;
  constexpr int ROWS = BLOCK / TPR;
  constexpr int WARPS = TPR / 32;

  const int team = static_cast<int>(threadIdx.x) / TPR;
  const int lane = static_cast<int>(threadIdx.x) % TPR;
  const int64_t n_rows = p.S * p.T;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * ROWS + team;
  if (r >= n_rows) return;  // per team: a warp, or the whole block (no barrier is skipped)

  A* lse = static_cast<A*>(p.lse);
  A* tl = static_cast<A*>(p.target_logit);
  A* lsum = static_cast<A*>(p.logit_sum);
  const int64_t V = p.V;
  const int64_t tgt = p.targets[r];
  if (tgt < 0) {  // unscored: zeros, the row is not read
    if (lane == 0) {
      lse[r] = A(0);
      tl[r] = A(0);
      lsum[r] = A(0);
    }
    return;
  }
  if (tgt >= V) {  // invalid target: NaN, never read out of bounds
    if (lane == 0) {
      lse[r] = acc_nan<A>();
      tl[r] = acc_nan<A>();
      lsum[r] = acc_nan<A>();
    }
    return;
  }

  const T* x = static_cast<const T*>(p.logits) + (r / p.T) * p.stride_s + (r % p.T) * p.stride_t;
  LseState<A> st = lse_identity<A>();

  const int64_t head = aligned_head<T>(x, V);
  for (int64_t i = lane; i < head; i += TPR) {
    const A v[1] = {to_acc(x[i])};
    absorb(st, v);
  }
  const int64_t npacks = (V - head) / N;
  const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(x + head);
  int64_t j = lane;
  for (; j + (kUnroll - 1) * TPR < npacks; j += kUnroll * TPR) {
    Pack<T> pk[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) pk[u] = xp[j + u * TPR];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      A v[N];
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] = to_acc(pk[u].v[k]);
      absorb(st, v);
    }
  }
  for (; j < npacks; j += TPR) {
    const Pack<T> pk = xp[j];
    A v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = to_acc(pk.v[k]);
    absorb(st, v);
  }
  for (int64_t i = head + npacks * N + lane; i < V; i += TPR) {
    const A v[1] = {to_acc(x[i])};
    absorb(st, v);
  }

  st = warp_reduce(st);
  if constexpr (WARPS > 1) {
    __shared__ LseState<A> part[WARPS];
    const int w = lane / 32, wl = lane % 32;
    if (wl == 0) part[w] = st;
    __syncthreads();
    if (w == 0) {
      st = wl < WARPS ? part[wl] : lse_identity<A>();
      st = warp_reduce(st);
    }
  }
  if (lane == 0) {
    lse[r] = finish_lse(st);
    lsum[r] = st.sum;
    tl[r] = to_acc(x[tgt]);
  }
}

// ------------------------------------------------------------------------------------------------
// token_grad

template <typename T, int TPR, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kGradMinBlocks<T>) token_grad_kernel(const TokenGradParams p) {
  static_assert(TPR % 32 == 0 && BLOCK % TPR == 0, "bad team shape");
  using A = typename AccOf<T>::type;
  constexpr int N = Pack<T>::N;
  constexpr int ROWS = BLOCK / TPR;
  constexpr int64_t PPC = static_cast<int64_t>(TPR) * kUnroll;  // packs per chunk
  constexpr int64_t CHUNK = PPC * N;                             // elements per chunk

  const int team = static_cast<int>(threadIdx.x) / TPR;
  const int lane = static_cast<int>(threadIdx.x) % TPR;
  const int64_t n_rows = p.S * p.T;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * ROWS + team;
  if (r >= n_rows) return;
  const int64_t c = blockIdx.y;
  const bool last_chunk = c == static_cast<int64_t>(gridDim.y) - 1;
  const int64_t V = p.V;
  const int64_t s = r / p.T, t = r % p.T;
  const T* x = static_cast<const T*>(p.logits) + s * p.stride_s + t * p.stride_t;
  T* out = static_cast<T*>(p.grad) + s * p.grad_stride_s + t * p.grad_stride_t;
  const int64_t tgt = p.targets[r];

  if (tgt < 0 || tgt >= V) {
    // Unscored: exact zeros. Invalid target: NaN. The logits row is not read.
    const T val = Store<T>::from(tgt < 0 ? A(0) : acc_nan<A>());
    const int64_t head = aligned_head<T>(out, V);
    const int64_t npacks = (V - head) / N;
    if (c == 0) {
      for (int64_t i = lane; i < head; i += TPR) out[i] = val;
    }
    Pack<T> pk;
#pragma unroll
    for (int k = 0; k < N; ++k) pk.v[k] = val;
    Pack<T>* op = reinterpret_cast<Pack<T>*>(out + head);
    const int64_t p1 = (c + 1) * PPC < npacks ? (c + 1) * PPC : npacks;
    for (int64_t j = c * PPC + lane; j < p1; j += TPR) op[j] = pk;
    if (last_chunk) {
      for (int64_t i = head + npacks * N + lane; i < V; i += TPR) out[i] = val;
    }
    return;
  }

  const A l = static_cast<const A*>(p.lse)[r];
  const A g = static_cast<const A*>(p.g_token)[r];
  auto elem = [&](A xv, int64_t i) -> T {
    return Store<T>::from(g * ((i == tgt ? A(1) : A(0)) - acc_exp(xv - l)));
  };

  const uintptr_t xa = reinterpret_cast<uintptr_t>(x), oa = reinterpret_cast<uintptr_t>(out);
  if ((xa & 15u) == (oa & 15u)) {
    // Same alignment phase: scalar head, 16-byte packs, scalar tail.
    const int64_t head = aligned_head<T>(x, V);
    const int64_t npacks = (V - head) / N;
    if (c == 0) {
      for (int64_t i = lane; i < head; i += TPR) out[i] = elem(to_acc(x[i]), i);
    }
    const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(x + head);
    Pack<T>* op = reinterpret_cast<Pack<T>*>(out + head);
    const int64_t p0 = c * PPC;
    Pack<T> pk[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first (memory-level parallelism) ...
      const int64_t j = p0 + u * TPR + lane;
      if (j < npacks) pk[u] = xp[j];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // ... then compute and store the same elements
      const int64_t j = p0 + u * TPR + lane;
      if (j < npacks) {
        Pack<T> o;
        const int64_t i0 = head + j * N;
#pragma unroll
        for (int k = 0; k < N; ++k) o.v[k] = elem(to_acc(pk[u].v[k]), i0 + k);
        op[j] = o;
      }
    }
    if (last_chunk) {
      for (int64_t i = head + npacks * N + lane; i < V; i += TPR) out[i] = elem(to_acc(x[i]), i);
    }
  } else {
    // Different phases (e.g. an odd-offset view into a separate buffer): scalar, coalesced.
    const int64_t i0 = c * CHUNK;
    const int64_t i1 = i0 + CHUNK < V ? i0 + CHUNK : V;
    for (int64_t i = i0 + lane; i < i1; i += TPR) out[i] = elem(to_acc(x[i]), i);
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

template <typename T, int TPR, int BLOCK>
cudaError_t launch_stats_t(const TokenStatsParams& p, cudaStream_t stream) {
  constexpr int ROWS = BLOCK / TPR;
  const int64_t n_rows = p.S * p.T;
  const int64_t gx = (n_rows + ROWS - 1) / ROWS;
  if (gx > kMaxGridX) return cudaErrorInvalidValue;
  token_stats_kernel<T, TPR, BLOCK><<<dim3(static_cast<unsigned>(gx)), dim3(BLOCK), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_stats_dtype(const TokenStatsParams& p, cudaStream_t stream) {
  if (p.V <= 1024) return launch_stats_t<T, 32, 256>(p, stream);   // a warp per row
  if (p.V <= 8192) return launch_stats_t<T, 256, 256>(p, stream);  // a block per row
  return launch_stats_t<T, 512, 512>(p, stream);
}

template <typename T, int TPR, int BLOCK>
cudaError_t launch_grad_t(const TokenGradParams& p, cudaStream_t stream) {
  constexpr int ROWS = BLOCK / TPR;
  constexpr int64_t CHUNK = static_cast<int64_t>(TPR) * kUnroll * Pack<T>::N;
  const int64_t n_rows = p.S * p.T;
  const int64_t gx = (n_rows + ROWS - 1) / ROWS;
  const int64_t gy = p.V > 0 ? (p.V + CHUNK - 1) / CHUNK : 1;
  if (gx > kMaxGridX || gy > kMaxGridY) return cudaErrorInvalidValue;
  token_grad_kernel<T, TPR, BLOCK>
      <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(BLOCK), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad_dtype(const TokenGradParams& p, cudaStream_t stream) {
  if (p.V <= 1024) return launch_grad_t<T, 32, 256>(p, stream);  // 8 rows per block
  return launch_grad_t<T, 256, 256>(p, stream);
}

}  // namespace

cudaError_t launch_token_stats(const TokenStatsParams& p, cudaStream_t stream) {
  if (p.S < 0 || p.T < 0 || p.V < 0) return cudaErrorInvalidValue;
  if (p.S == 0 || p.T == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_stats_dtype<float>(p, stream);
    case DType::kBFloat16:
      return launch_stats_dtype<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_stats_dtype<__half>(p, stream);
    case DType::kFloat64:
      return launch_stats_dtype<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_token_grad(const TokenGradParams& p, cudaStream_t stream) {
  if (p.S < 0 || p.T < 0 || p.V < 0) return cudaErrorInvalidValue;
  if (p.S == 0 || p.T == 0 || p.V == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_grad_dtype<float>(p, stream);
    case DType::kBFloat16:
      return launch_grad_dtype<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_grad_dtype<__half>(p, stream);
    case DType::kFloat64:
      return launch_grad_dtype<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dpo_fast

// CPU kernels of dpo_fast_C::token_stats and dpo_fast_C::token_grad.
//
// Every row (s, t) of logits (S, T, V) is handled by one thread (at::parallel_for over a compacted
// list of scored rows), so results do not depend on the thread count and are bitwise
// reproducible. Inside a row the vocabulary is walked in L1-sized chunks of kChunk elements:
//   stats: pass 1 over the chunk = max and sum of x (reads memory), pass 2 over the chunk =
//          sum of exp(x - chunk_max) (reads L1), then the running (max, sum-exp) pair is
//          rescaled once per chunk, in double. One exp per element.
//   grad:  grad = g * (onehot - exp(x - lse)), chunk by chunk; a chunk is read completely before
//          it is written, and the target logit is read before the row is touched, so `grad` may
//          be `logits` itself (in-place backward). Large out-of-place outputs are written with
//          streaming stores (no read-for-ownership of the destination).
// bf16/f16 chunks are converted into a per-thread float scratch buffer (kChunk floats, on the
// stack); float32 is read in place; float64 uses a scalar path with double accumulation.
// No tokens x vocab temporaries exist.
//
// Vectorization: at::vec::Vectorized<float> is only SIMD when this file is compiled with
// -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 (or the AVX2 pair) and the matching -m flags;
// setup.py / CMakeLists.txt choose them for the build host and apply them to every C++ file.
// exp uses Vectorized<float>::exp_u20() (a polynomial, no Sleef symbols needed); it does not
// propagate NaN by itself, so NaN is handled explicitly (stats: a NaN makes the chunk's sum of x
// NaN, which triggers an exact scan; grad: a NaN-preserving blend, and a scalar std::exp path
// for rows whose lse is not finite).

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

namespace dpo_fast {

const char* cpu_kernels_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kW = fVec::size();
// Elements per chunk: 2048 floats = 8 KiB of scratch, well inside a 32-48 KiB L1d.
constexpr int64_t kChunk = 2048;
static_assert(kChunk % (4 * 16) == 0, "kChunk must be a multiple of 4 vectors");

constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr float kNanF = std::numeric_limits<float>::quiet_NaN();
constexpr double kInfD = std::numeric_limits<double>::infinity();
constexpr double kNanD = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------------
// Chunk conversion helpers (bf16 / f16 <-> float scratch); float32 needs no copy.

template <typename T>
inline const float* chunk_as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    (void)buf;
    (void)n;
    return src;
  } else {
    using rVec = at::vec::Vectorized<T>;
    constexpr int64_t RW = rVec::size();  // 2 float vectors per reduced-precision vector
    int64_t i = 0;
    for (; i + RW <= n; i += RW) {
      auto [lo, hi] = at::vec::convert_to_float<T>(rVec::loadu(src + i));
      lo.store(buf + i);
      hi.store(buf + i + RW / 2);
    }
    for (; i < n; ++i) {
      buf[i] = static_cast<float>(src[i]);
    }
    return buf;
  }
}

// ---------------------------------------------------------------------------------------------
// Stores. Out-of-place gradients of large problems are written with non-temporal (streaming)
// stores: the kernel never reads them back, and streaming avoids reading every destination line
// into the cache first (read-for-ownership), i.e. a third of the memory traffic.

#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kStreamAlign = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kStreamAlign = 32;
#else
constexpr int64_t kStreamAlign = 1;  // no vector ISA: plain stores
#endif
// Below this many gradient bytes the output may stay in cache for its consumer: plain stores.
constexpr int64_t kStreamMinBytes = int64_t(64) << 20;

inline bool is_aligned(const void* p, int64_t a) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(a) == 0;
}

inline void stream_store(float* p, const fVec& v) {  // p: kStreamAlign-aligned
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, v);
#else
  v.store(p);
#endif
}

template <typename T>
inline void stream_store(T* p, const at::vec::Vectorized<T>& v) {  // bf16 / f16, aligned
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
#else
  v.store(p);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // order the weakly-ordered streaming stores before anything that follows
#endif
}

// Zero `bytes` bytes at p (exact +0.0 in every floating dtype).
inline void zero_bytes(void* p, int64_t bytes, bool stream) {
  char* c = static_cast<char*>(p);
  if (!stream || kStreamAlign == 1) {
    std::memset(c, 0, static_cast<size_t>(bytes));
    return;
  }
  int64_t i = 0;
  while (i < bytes && !is_aligned(c + i, kStreamAlign)) c[i++] = 0;
  const fVec z(0.f);
  for (; i + kStreamAlign <= bytes; i += kStreamAlign) {
    stream_store(reinterpret_cast<float*>(c + i), z);
  }
  if (i < bytes) std::memset(c + i, 0, static_cast<size_t>(bytes - i));
  stream_fence();
}

// float scratch -> bf16 / f16 destination (round to nearest even); float needs no copy.
template <typename T>
inline void chunk_store(const float* buf, T* dst, int64_t n, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    (void)buf, (void)dst, (void)n, (void)stream;
  } else {
    if (!stream || kStreamAlign == 1) {
      at::vec::convert(buf, dst, n);  // vectorized
      return;
    }
    using rVec = at::vec::Vectorized<T>;
    constexpr int64_t RW = rVec::size();
    int64_t i = 0;
    for (; i < n && !is_aligned(dst + i, kStreamAlign); ++i) dst[i] = static_cast<T>(buf[i]);
    for (; i + RW <= n; i += RW) {
      stream_store(dst + i, at::vec::convert_from_float<T>(fVec::loadu(buf + i),
                                                           fVec::loadu(buf + i + RW / 2)));
    }
    for (; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
  }
}

inline float lanes_max(const fVec& v) {
  alignas(64) float a[kW];
  v.store(a);
  float m = a[0];
  for (int64_t k = 1; k < kW; ++k) {
    if (std::isnan(a[k]) || std::isnan(m)) {
      m = kNanF;
    } else {
      m = std::max(m, a[k]);
    }
  }
  return m;
}

inline double lanes_sum(const fVec& v) {
  alignas(64) float a[kW];
  v.store(a);
  double s = 0.0;
  for (int64_t k = 0; k < kW; ++k) {
    s += static_cast<double>(a[k]);
  }
  return s;
}

// exp(d) that propagates NaN (exp_u20 clamps NaN to a finite number).
inline fVec exp_nan(const fVec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 dv = d;
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(dv, dv, _CMP_UNORD_Q), d.exp_u20(), dv);
#else
  return fVec::blendv(d.exp_u20(), d, d.isnan());
#endif
}

// max(a, b) without NaN propagation (one instruction); NaN is detected through the sum of x.
inline fVec max_nonan(const fVec& a, const fVec& b) {
  return at::vec::clamp_min(a, b);
}

inline bool has_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Row statistics, float / bf16 / f16 (vectorized, float arithmetic inside a chunk, double merge).

struct StatsOut {
  double lse;
  double sum;
};

template <typename T>
StatsOut stats_row_vec(const T* x, int64_t V, float* buf) {
  double M = -kInfD;  // running max
  double S = 0.0;     // running sum of exp(x - M)
  double xsum = 0.0;  // running sum of x
  bool pos_inf = false;
  const fVec vninf(-kInfF);
  const fVec vzero(0.f);

  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float* xf = chunk_as_float(x + c0, n, buf);

    // Pass 1: max and sum of x. The max may drop NaN; a NaN logit always makes the sum NaN
    // (so does +inf with -inf, hence the explicit check on that rare path).
    fVec m0 = vninf, m1 = vninf, s0 = vzero, s1 = vzero;
    int64_t i = 0;
    for (; i + 2 * kW <= n; i += 2 * kW) {
      fVec a = fVec::loadu(xf + i);
      fVec b = fVec::loadu(xf + i + kW);
      m0 = max_nonan(m0, a);
      m1 = max_nonan(m1, b);
      s0 = s0 + a;
      s1 = s1 + b;
    }
    for (; i + kW <= n; i += kW) {
      fVec a = fVec::loadu(xf + i);
      m0 = max_nonan(m0, a);
      s0 = s0 + a;
    }
    if (i < n) {
      fVec a = fVec::loadu(xf + i, n - i);  // masked load, zero-filled lanes
      s0 = s0 + a;
      m0 = max_nonan(m0, fVec::set(vninf, a, n - i));
    }
    const double csum = lanes_sum(s0 + s1);
    xsum += csum;
    if (std::isnan(csum) && has_nan(xf, n)) {
      return {kNanD, kNanD};  // a NaN logit: the whole row's statistics are NaN
    }
    const float m = lanes_max(max_nonan(m0, m1));
    if (m == -kInfF) {
      continue;  // every exp in this chunk is 0
    }
    if (m == kInfF) {
      pos_inf = true;  // lse = +inf; keep going to find NaNs and finish logit_sum
      continue;
    }

    // Pass 2 (chunk is in L1): sum of exp(x - m), every term in [0, 1].
    const fVec vm(m);
    fVec e0 = vzero, e1 = vzero, e2 = vzero, e3 = vzero;
    i = 0;
    for (; i + 4 * kW <= n; i += 4 * kW) {
      e0 = e0 + (fVec::loadu(xf + i) - vm).exp_u20();
      e1 = e1 + (fVec::loadu(xf + i + kW) - vm).exp_u20();
      e2 = e2 + (fVec::loadu(xf + i + 2 * kW) - vm).exp_u20();
      e3 = e3 + (fVec::loadu(xf + i + 3 * kW) - vm).exp_u20();
    }
    for (; i + kW <= n; i += kW) {
      e0 = e0 + (fVec::loadu(xf + i) - vm).exp_u20();
    }
    if (i < n) {
      fVec e = (fVec::loadu(xf + i, n - i) - vm).exp_u20();
      e1 = e1 + fVec::set(vzero, e, n - i);
    }
    const double se = lanes_sum((e0 + e1) + (e2 + e3));
    const double md = static_cast<double>(m);
    if (md > M) {
      S = S * std::exp(M - md) + se;  // exp(-inf) = 0 on the first finite chunk
      M = md;
    } else {
      S += se * std::exp(md - M);
    }
  }
  if (pos_inf) {
    return {kInfD, xsum};
  }
  if (M == -kInfD) {
    return {-kInfD, xsum};  // all logits -inf: lse = -inf, no NaN
  }
  return {M + std::log(S), xsum};
}

// float64: scalar, same two-level scheme with double accumulation.
StatsOut stats_row_double(const double* x, int64_t V) {
  double M = -kInfD, S = 0.0, xsum = 0.0;
  bool pos_inf = false;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const double* xc = x + c0;
    double m = -kInfD;
    bool nan = false;
    for (int64_t i = 0; i < n; ++i) {
      const double v = xc[i];
      nan |= std::isnan(v);
      m = v > m ? v : m;
      xsum += v;
    }
    if (nan) {
      return {kNanD, kNanD};
    }
    if (m == -kInfD) {
      continue;
    }
    if (m == kInfD) {
      pos_inf = true;
      continue;
    }
    double se = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      se += std::exp(xc[i] - m);
    }
    if (m > M) {
      S = S * std::exp(M - m) + se;
      M = m;
    } else {
      S += se * std::exp(m - M);
    }
  }
  if (pos_inf) {
    return {kInfD, xsum};
  }
  if (M == -kInfD) {
    return {-kInfD, xsum};
  }
  return {M + std::log(S), xsum};
}

// ---------------------------------------------------------------------------------------------
// Row gradient.

// out[i] = -g * exp(x[i] - l) for i in [0, n), float32 in, float32 out (out may equal x).
inline void neg_scaled_softmax(const float* x, float* out, int64_t n, const fVec& vl,
                               const fVec& vng, bool stream) {
  int64_t i = 0;
  if (stream && kStreamAlign > 1) {
    if (!is_aligned(out, sizeof(float))) {
      stream = false;
    } else {
      const int64_t head = std::min<int64_t>(
          n, ((kStreamAlign - reinterpret_cast<uintptr_t>(out) % kStreamAlign) % kStreamAlign) /
                 static_cast<int64_t>(sizeof(float)));
      if (head > 0) {
        (exp_nan(fVec::loadu(x, head) - vl) * vng).store(out, head);
        i = head;
      }
      for (; i + 2 * kW <= n; i += 2 * kW) {
        fVec a = exp_nan(fVec::loadu(x + i) - vl) * vng;
        fVec b = exp_nan(fVec::loadu(x + i + kW) - vl) * vng;
        stream_store(out + i, a);
        stream_store(out + i + kW, b);
      }
      for (; i + kW <= n; i += kW) {
        stream_store(out + i, exp_nan(fVec::loadu(x + i) - vl) * vng);
      }
    }
  }
  if (!stream || kStreamAlign == 1) {
    for (; i + 2 * kW <= n; i += 2 * kW) {
      fVec a = exp_nan(fVec::loadu(x + i) - vl) * vng;  // load, then store the same elements:
      fVec b = exp_nan(fVec::loadu(x + i + kW) - vl) * vng;  // in-place safe
      a.store(out + i);
      b.store(out + i + kW);
    }
    for (; i + kW <= n; i += kW) {
      (exp_nan(fVec::loadu(x + i) - vl) * vng).store(out + i);
    }
  }
  if (i < n) {
    (exp_nan(fVec::loadu(x + i, n - i) - vl) * vng).store(out + i, n - i);
  }
}

// stream: out does not alias x and the output is large (see kStreamMinBytes).
template <typename T>
void grad_row_vec(const T* x, T* out, int64_t V, int64_t tgt, float l, float g, float* buf,
                  bool stream) {
  const float xt = static_cast<float>(x[tgt]);  // read before anything is written (in-place)
  if (!std::isfinite(l)) {
    // -inf / +inf / NaN lse: follow the formula with IEEE exp, element by element.
    for (int64_t v = 0; v < V; ++v) {
      const float xv = static_cast<float>(x[v]);
      out[v] = static_cast<T>(g * ((v == tgt ? 1.f : 0.f) - std::exp(xv - l)));
    }
    return;
  }
  const fVec vl(l);
  const fVec vng(-g);
  if constexpr (std::is_same_v<T, float>) {
    (void)buf;
    neg_scaled_softmax(x, out, V, vl, vng, stream);  // no scratch needed
  } else {
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, V - c0);
      const float* xf = chunk_as_float(x + c0, n, buf);  // the whole chunk is read first ...
      neg_scaled_softmax(xf, buf, n, vl, vng, false);     // ... computed in L1 ...
      chunk_store(buf, out + c0, n, stream);              // ... then written
    }
  }
  if (stream) stream_fence();
  out[tgt] = static_cast<T>(g * (1.f - std::exp(xt - l)));
}

void grad_row_double(const double* x, double* out, int64_t V, int64_t tgt, double l, double g) {
  for (int64_t v = 0; v < V; ++v) {
    const double xv = x[v];  // read, then write the same element
    out[v] = g * ((v == tgt ? 1.0 : 0.0) - std::exp(xv - l));
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers.

struct RowLists {
  std::vector<int64_t> scored;
  std::vector<int64_t> unscored;
};

RowLists split_rows(const int64_t* tg, int64_t n_rows, bool want_unscored) {
  RowLists r;
  r.scored.reserve(n_rows);
  for (int64_t i = 0; i < n_rows; ++i) {
    if (tg[i] >= 0) {
      r.scored.push_back(i);
    } else if (want_unscored) {
      r.unscored.push_back(i);
    }
  }
  return r;
}

int64_t row_grain(int64_t V) {
  // ~32k elements of work per task at least; 1 row when rows are big.
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
}

template <typename T, typename out_t>
void token_stats_impl(const at::Tensor& logits, const at::Tensor& targets, at::Tensor& lse,
                      at::Tensor& tl, at::Tensor& lsum) {
  const int64_t T_ = logits.size(1), V = logits.size(2);
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const T* base = logits.const_data_ptr<T>();
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  out_t* lse_p = lse.data_ptr<out_t>();
  out_t* tl_p = tl.data_ptr<out_t>();
  out_t* sum_p = lsum.data_ptr<out_t>();
  const int64_t n_rows = lse.numel();

  // Unscored rows: all three stats are 0 (outputs come from at::zeros); the row is never read.
  const RowLists rows = split_rows(tg, n_rows, /*want_unscored=*/false);
  const int64_t n = static_cast<int64_t>(rows.scored.size());
  at::parallel_for(0, n, row_grain(V), [&](int64_t b, int64_t e) {
    alignas(64) float buf[kChunk];
    for (int64_t k = b; k < e; ++k) {
      const int64_t r = rows.scored[k];
      const int64_t tgt = tg[r];
      if (tgt >= V) {  // never read out of bounds; the Python layer raises before this
        lse_p[r] = tl_p[r] = sum_p[r] = std::numeric_limits<out_t>::quiet_NaN();
        continue;
      }
      const T* x = base + (r / T_) * s0 + (r % T_) * s1;
      StatsOut st;
      if constexpr (std::is_same_v<T, double>) {
        (void)buf;
        st = stats_row_double(x, V);
      } else {
        st = stats_row_vec<T>(x, V, buf);
      }
      lse_p[r] = static_cast<out_t>(st.lse);
      sum_p[r] = static_cast<out_t>(st.sum);
      tl_p[r] = static_cast<out_t>(x[tgt]);
    }
  });
}

template <typename T, typename acc_t>
void token_grad_impl(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                     const at::Tensor& g_token, at::Tensor& grad) {
  const int64_t T_ = logits.size(1), V = logits.size(2);
  const int64_t xs0 = logits.stride(0), xs1 = logits.stride(1);
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  const T* xbase = logits.const_data_ptr<T>();
  T* gbase = grad.data_ptr<T>();
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const acc_t* g_p = g_token.const_data_ptr<acc_t>();
  const int64_t n_rows = lse.numel();

  const RowLists rows = split_rows(tg, n_rows, /*want_unscored=*/true);
  const int64_t grain = row_grain(V);
  const bool in_place = static_cast<const void*>(gbase) == static_cast<const void*>(xbase);
  const bool stream =
      !in_place && static_cast<int64_t>(sizeof(T)) * grad.numel() >= kStreamMinBytes;

  at::parallel_for(0, static_cast<int64_t>(rows.scored.size()), grain, [&](int64_t b, int64_t e) {
    alignas(64) float buf[kChunk];
    for (int64_t k = b; k < e; ++k) {
      const int64_t r = rows.scored[k];
      const int64_t s = r / T_, t = r % T_;
      const T* x = xbase + s * xs0 + t * xs1;
      T* out = gbase + s * gs0 + t * gs1;
      const int64_t tgt = tg[r];
      if (tgt >= V) {  // invalid target: NaN row, the logits row is not read
        std::fill(out, out + V, static_cast<T>(std::numeric_limits<acc_t>::quiet_NaN()));
        continue;
      }
      if constexpr (std::is_same_v<T, double>) {
        (void)buf;
        grad_row_double(x, out, V, tgt, lse_p[r], g_p[r]);
      } else {
        grad_row_vec<T>(x, out, V, tgt, lse_p[r], g_p[r], buf, stream);
      }
    }
  });
  // Unscored rows: exact zeros (all-zero bits are +0 in every floating dtype).
  at::parallel_for(0, static_cast<int64_t>(rows.unscored.size()), grain,
                   [&](int64_t b, int64_t e) {
                     for (int64_t k = b; k < e; ++k) {
                       const int64_t r = rows.unscored[k];
                       T* out = gbase + (r / T_) * gs0 + (r % T_) * gs1;
                       zero_bytes(out, static_cast<int64_t>(sizeof(T)) * V, stream);
                     }
                   });
}

// ---------------------------------------------------------------------------------------------
// Op entry points.

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_stats_cpu(const at::Tensor& logits,
                                                                const at::Tensor& targets_in) {
  check_token_stats_args(logits, targets_in, "cpu");
  TORCH_CHECK(logits.device().is_cpu() && targets_in.device().is_cpu(),
              "dpo_fast_C::token_stats (CPU): logits and targets must be CPU tensors");
  const at::Tensor targets = targets_in.contiguous();
  const auto out_dtype = stats_dtype(logits.scalar_type());
  const auto opts = logits.options().dtype(out_dtype);
  at::Tensor lse = at::zeros({logits.size(0), logits.size(1)}, opts);
  at::Tensor tl = at::zeros({logits.size(0), logits.size(1)}, opts);
  at::Tensor lsum = at::zeros({logits.size(0), logits.size(1)}, opts);
  if (lse.numel() == 0) {
    return {lse, tl, lsum};
  }
  switch (logits.scalar_type()) {
    case at::kFloat:
      token_stats_impl<float, float>(logits, targets, lse, tl, lsum);
      break;
    case at::kBFloat16:
      token_stats_impl<c10::BFloat16, float>(logits, targets, lse, tl, lsum);
      break;
    case at::kHalf:
      token_stats_impl<c10::Half, float>(logits, targets, lse, tl, lsum);
      break;
    case at::kDouble:
      token_stats_impl<double, double>(logits, targets, lse, tl, lsum);
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
  return {lse, tl, lsum};
}

void token_grad_cpu(const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& lse_in,
                    const at::Tensor& g_in, const at::Tensor& grad) {
  check_token_grad_args(logits, targets_in, lse_in, g_in, grad, "cpu");
  TORCH_CHECK(logits.device().is_cpu() && targets_in.device().is_cpu() && lse_in.device().is_cpu() &&
                  g_in.device().is_cpu() && grad.device().is_cpu(),
              "dpo_fast_C::token_grad (CPU): all tensors must be CPU tensors");
  if (grad.numel() == 0) {
    return;
  }
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor g_token = g_in.contiguous();
  at::Tensor out = grad;
  switch (logits.scalar_type()) {
    case at::kFloat:
      token_grad_impl<float, float>(logits, targets, lse, g_token, out);
      break;
    case at::kBFloat16:
      token_grad_impl<c10::BFloat16, float>(logits, targets, lse, g_token, out);
      break;
    case at::kHalf:
      token_grad_impl<c10::Half, float>(logits, targets, lse, g_token, out);
      break;
    case at::kDouble:
      token_grad_impl<double, double>(logits, targets, lse, g_token, out);
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dpo_fast_C, CPU, m) {
  m.impl("token_stats", &token_stats_cpu);
  m.impl("token_grad", &token_grad_cpu);
}

}  // namespace dpo_fast

// CPU kernels of Progressive Dropout Attention: the attention map A, the fused pooled
// features GAP(A * F), and both backwards.  Per sample: pass 1 contracts F with the
// classifier rows into the CAMs, a tiny [K, P] step gives thresholds and A, pass 2 reads F
// again (from cache where the sample fits).  No [N,C,H,W] temporary in the forward.
// Math in float (double for double inputs); results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/pda.h"
#include "cpu/channel_contract.h"
#include "cpu/huge_pages.h"
#include "cpu/multiversion.h"

namespace wsss::cpu {
namespace {

template <typename T>
using acc = at::opmath_type<T>;

// ---- hot loops, cloned per CPU target (see multiversion.h) --------------------------------

// pooled[c] = inv_p * sum_p A[p] f[c, p]  for c in [c0, c1); scratch: 4 rows [4, P].
// NB: the channels from last to first: pass 1 has just read them first to last, so the most
// recently read (still in L2/L3) come first.  Four channels per pass over the pixels, with
// kLanes partial sums each (one channel at a time, each dot product was a chain of dependent
// vector adds), and the next four rows prefetched meanwhile (see add_four_channels).
template <typename T>
inline void pool_range_impl(const T* f, int64_t c0, int64_t c1, int64_t P, const acc<T>* __restrict A,
                            acc<T> inv_p, T* pooled, acc<T>* scratch) {
  using A_t = acc<T>;
  constexpr int64_t kLanes = 16;
  int64_t c = c1;
  for (; c - 4 >= c0; c -= 4) {
    const A_t* __restrict x0 = math_row(f, c - 4, P, scratch);
    const A_t* __restrict x1 = math_row(f, c - 3, P, scratch + P);
    const A_t* __restrict x2 = math_row(f, c - 2, P, scratch + 2 * P);
    const A_t* __restrict x3 = math_row(f, c - 1, P, scratch + 3 * P);
    const int64_t ahead = std::max<int64_t>(0, std::min<int64_t>(4, c - 4 - c0));  // (the rows before these)
    SpreadPrefetch prefetch(reinterpret_cast<const char*>(f + (c - 4 - ahead) * P),
                            ahead * P * static_cast<int64_t>(sizeof(T)), P / kLanes);
    A_t s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {}, s3[kLanes] = {};
    int64_t i0 = 0;
    for (; i0 + kLanes <= P; i0 += kLanes) {
      prefetch.step();
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const A_t a = A[i0 + j];
        s0[j] += a * x0[i0 + j];
        s1[j] += a * x1[i0 + j];
        s2[j] += a * x2[i0 + j];
        s3[j] += a * x3[i0 + j];
      }
    }
    for (int64_t j = 0; i0 + j < P; ++j) {
      const A_t a = A[i0 + j];
      s0[j] += a * x0[i0 + j];
      s1[j] += a * x1[i0 + j];
      s2[j] += a * x2[i0 + j];
      s3[j] += a * x3[i0 + j];
    }
    A_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (int64_t j = 0; j < kLanes; ++j) {
      t0 += s0[j];
      t1 += s1[j];
      t2 += s2[j];
      t3 += s3[j];
    }
    pooled[c - 4] = static_cast<T>(t0 * inv_p);
    pooled[c - 3] = static_cast<T>(t1 * inv_p);
    pooled[c - 2] = static_cast<T>(t2 * inv_p);
    pooled[c - 1] = static_cast<T>(t3 * inv_p);
  }
  for (; c > c0; --c) pooled[c - 1] = static_cast<T>(dot(A, math_row(f, c - 1, P, scratch), P) * inv_p);
}

// For c in [c0, c1): grad_f[c, p] = gc * A[p] + sum_k w[k, c] dz[k, p]  (gc = g[c] * inv_p; no A term
// without g_pooled)
//                    gw[k, c] += sum_p dz[k, p] f[c, p]
template <typename T>
inline void backward_range_impl(const T* f, int64_t c0, int64_t c1, int64_t P, int64_t C, int64_t K, const acc<T>* A,
                                const acc<T>* dz, const acc<T>* w, const T* g_pooled, acc<T> inv_p, T* grad_f,
                                acc<T>* gw, acc<T>* scratch) {
  acc<T>* gf_row = scratch + P;
  for (int64_t c = c0; c < c1; ++c) {
    const acc<T>* x = math_row(f, c, P, scratch);
    // NB: the attention form starts from 0, not 0 * A (NaN where A is NaN or inf)
    if (g_pooled != nullptr) {
      const acc<T> gc = static_cast<acc<T>>(g_pooled[c]) * inv_p;
#pragma omp simd
      for (int64_t i = 0; i < P; ++i) gf_row[i] = gc * A[i];
    } else {
      std::fill(gf_row, gf_row + P, acc<T>(0));
    }
    for (int64_t k = 0; k < K; ++k) {
      const acc<T>* dzk = dz + k * P;
      const acc<T> wkc = w[k * C + c];
#pragma omp simd
      for (int64_t i = 0; i < P; ++i) gf_row[i] += wkc * dzk[i];
      gw[k * C + c] += dot(dzk, x, P);
    }
    T* out = grad_f + c * P;
#pragma omp simd
    for (int64_t i = 0; i < P; ++i) out[i] = static_cast<T>(gf_row[i]);
  }
}

#define WSSS_PDA_HOT_LOOPS(T)                                                                                    \
  WSSS_MULTIVERSION void contract_range(const T* f, int64_t c0, int64_t c1, int64_t P, const acc<T>* w,          \
                                        int64_t w_row, int64_t R, acc<T>* out, acc<T>* scratch) {                \
    contract_channels(f, c0, c1, P, w, w_row, R, out, scratch);                                                  \
  }                                                                                                              \
  WSSS_MULTIVERSION void pool_range(const T* f, int64_t c0, int64_t c1, int64_t P, const acc<T>* A,              \
                                    acc<T> inv_p, T* pooled, acc<T>* scratch) {                                  \
    pool_range_impl<T>(f, c0, c1, P, A, inv_p, pooled, scratch);                                                 \
  }                                                                                                              \
  WSSS_MULTIVERSION void backward_range(const T* f, int64_t c0, int64_t c1, int64_t P, int64_t C, int64_t K,     \
                                        const acc<T>* A, const acc<T>* dz, const acc<T>* w, const T* g_pooled,   \
                                        acc<T> inv_p, T* grad_f, acc<T>* gw, acc<T>* scratch) {                  \
    backward_range_impl<T>(f, c0, c1, P, C, K, A, dz, w, g_pooled, inv_p, grad_f, gw, scratch);                  \
  }
// dst[i] += src[i], i < n (in the math type: float or double)
#define WSSS_ADD_ROWS(A)                                                                      \
  WSSS_MULTIVERSION void add_rows(const A* __restrict src, int64_t n, A* __restrict dst) {   \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) dst[i] += src[i];                    \
  }
WSSS_ADD_ROWS(float)
WSSS_ADD_ROWS(double)
#undef WSSS_ADD_ROWS
WSSS_PDA_HOT_LOOPS(float)
WSSS_PDA_HOT_LOOPS(double)
WSSS_PDA_HOT_LOOPS(c10::BFloat16)
WSSS_PDA_HOT_LOOPS(c10::Half)
#undef WSSS_PDA_HOT_LOOPS

// ---- per-sample steps ---------------------------------------------------------------------

// Pass 1 of one sample: z [R, P] = w [R, C] @ f [C, P] as partial sums over fixed channel
// chunks added in chunk order, so the result does not depend on who computes which chunk.
// partial: scratch [chunks, R, P].  `parallel`: chunks across threads.
template <typename T>
void cams(const T* f, int64_t C, int64_t P, const acc<T>* w, int64_t R, acc<T>* z, std::vector<acc<T>>& partial,
          bool parallel) {
  const int64_t chunk = channel_chunk(C);
  const int64_t chunks = (C + chunk - 1) / chunk;
  partial.resize(static_cast<size_t>(chunks * R * P));
  auto run = [&](int64_t b, int64_t e) {
    std::vector<acc<T>> scratch(4 * P);
    for (int64_t j = b; j < e; ++j)
      contract_range(f, j * chunk, std::min(C, (j + 1) * chunk), P, w, C, R, partial.data() + j * R * P,
                     scratch.data());
  };
  if (parallel) {
    at::parallel_for(0, chunks, 1, run);
  } else {
    run(0, chunks);
  }
  // (chunk by chunk over the whole [R, P]: vectorised, the same order of adds per element as
  // element by element over the chunks, which strode through `partial` and cost ~0.05 ms a sample)
  std::fill(z, z + R * P, acc<T>(0));
  for (int64_t j = 0; j < chunks; ++j) add_rows(partial.data() + j * R * P, R * P, z);
}

// Thresholds beta [K] and attention A [P] from the raw CAMs z [K, P] of one sample.
// NaN propagates as in torch (wsss.reference.pda_attention): the max of a CAM with a NaN is
// NaN, so is its threshold (also mu = 0 with an infinite max: 0 * inf), and a class with a NaN
// threshold adds NaN to every pixel of A (pda_threshold alone would clamp a NaN max to 0).
template <typename acc_t>
void attention_from_cams(const acc_t* z, int64_t K, int64_t P, acc_t mu, acc_t* beta, acc_t* A) {
  for (int64_t k = 0; k < K; ++k) {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    const acc_t* zk = z + k * P;
    for (int64_t i = 0; i < P; ++i) m = (zk[i] > m || std::isnan(zk[i])) ? zk[i] : m;  // NaN sticks
    beta[k] = std::isnan(m) ? m : pda_threshold(m, mu);
  }
  std::fill(A, A + P, acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* zk = z + k * P;
    const acc_t b = beta[k];
    if (std::isnan(b)) {
      for (int64_t i = 0; i < P; ++i) A[i] += b;
      continue;
    }
    for (int64_t i = 0; i < P; ++i) A[i] += pda_kept(zk[i], b);
  }
  const acc_t inv_k = acc_t(1) / acc_t(K);
  for (int64_t i = 0; i < P; ++i) A[i] *= inv_k;
}

template <typename T>
std::vector<acc<T>> weight_rows(const at::Tensor& weight, int64_t extra_rows) {
  const int64_t K = weight.size(0), C = weight.size(1);
  std::vector<acc<T>> w((K + extra_rows) * C);
  const T* src = weight.const_data_ptr<T>();
  for (int64_t i = 0; i < K * C; ++i) w[i] = static_cast<acc<T>>(src[i]);
  return w;
}

// NB: two schedules with identical arithmetic.  With at least as many samples as threads, and
// samples small enough that one per thread stays in cache between the passes, one parallel
// region hands whole samples to threads (few fork/joins: robust when other processes share the
// cores).  Otherwise samples run one after another with their channels split across threads:
// one sample stays in L3 for pass 2.  Measured on a 2-core EPYC VM (32 MB L3, shared), 205 MB
// of features: samples of 12 MB (C = 4096, 28 x 28) one at a time 7.8 ms against 8.7 ms by
// sample (pass 2 from L3 instead of DRAM); samples of 0.8-6 MB faster by sample.
constexpr int64_t kSamplesInCacheBytes = 16 << 20;
inline bool samples_per_thread(int64_t N, int64_t sample_bytes) {
  const int64_t threads = at::get_num_threads();
  return N >= threads && threads * sample_bytes <= kSamplesInCacheBytes;
}

// Forward.  pooled [N, C] or null; attention [N, P] or null.
template <typename T>
void pda_forward_impl(const at::Tensor& features, const at::Tensor& weight, double mu, T* pooled, T* attention) {
  const int64_t N = features.size(0), C = features.size(1), P = features.size(2) * features.size(3);
  const int64_t K = weight.size(0);
  const T* f = features.const_data_ptr<T>();
  const auto w = weight_rows<T>(weight, 0);
  const acc<T> inv_p = acc<T>(1) / acc<T>(P);
  const int64_t chunk = channel_chunk(C);
  const bool by_sample = samples_per_thread(N, C * P * static_cast<int64_t>(sizeof(T)));
  auto sample = [&](int64_t n, bool inner_parallel) {
    std::vector<acc<T>> z(K * P), A(P), beta(K), partial;
    const T* fn = f + n * C * P;
    cams(fn, C, P, w.data(), K, z.data(), partial, inner_parallel);
    attention_from_cams(z.data(), K, P, static_cast<acc<T>>(mu), beta.data(), A.data());
    if (attention != nullptr)
      for (int64_t i = 0; i < P; ++i) attention[n * P + i] = static_cast<T>(A[i]);
    if (pooled == nullptr) return;
    auto pool = [&](int64_t b, int64_t e) {
      std::vector<acc<T>> scratch(4 * P);
      pool_range(fn, b, e, P, A.data(), inv_p, pooled + n * C, scratch.data());
    };
    if (inner_parallel) {
      at::parallel_for(0, C, chunk, pool);
    } else {
      pool(0, C);
    }
  };
  if (by_sample) {
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) sample(n, false);
    });
  } else {
    for (int64_t n = 0; n < N; ++n) sample(n, true);
  }
}

// Backward.  Exactly one of grad_pooled [N, C] / grad_attention [N, P] is given.
// dL/dz_k[p] = gA[p] / K * 1[0 < z_k[p] <= beta_k], with gA = grad_attention, or for the
// pooled form gA[p] = (1/P) sum_c g[c] F[c, p] (computed in pass 1 as an extra CAM row).
// grad_F[c, p] = sum_k w_kc dz_k[p] (+ g[c] A[p] / P for the pooled form);
// grad_w[k, c] = sum_{n, p} dz_k[p] F[c, p], accumulated over samples in order.
template <typename T>
void pda_backward_impl(const at::Tensor& features, const at::Tensor& weight, double mu, const T* grad_pooled,
                       const T* grad_attention, T* grad_f, T* grad_w) {
  const int64_t N = features.size(0), C = features.size(1), P = features.size(2) * features.size(3);
  const int64_t K = weight.size(0);
  const T* f = features.const_data_ptr<T>();
  const bool pooled_form = grad_pooled != nullptr;
  const int64_t R = pooled_form ? K + 1 : K;
  const auto w_classes = weight_rows<T>(weight, 0);
  const acc<T> inv_p = acc<T>(1) / acc<T>(P), inv_k = acc<T>(1) / acc<T>(K);
  const int64_t chunk = channel_chunk(C);
  // Per-sample grad_w partials [N, K, C], summed over samples in order at the end (deterministic).
  std::vector<acc<T>> gw_partial(static_cast<size_t>(N * K * C), acc<T>(0));
  auto sample = [&](int64_t n, bool inner_parallel) {
    const T* fn = f + n * C * P;
    std::vector<acc<T>> w(w_classes), z(R * P), A(P), beta(K), dz(K * P), gA_given(P), partial;
    if (pooled_form) {
      w.resize(R * C);
      for (int64_t c = 0; c < C; ++c) w[K * C + c] = static_cast<acc<T>>(grad_pooled[n * C + c]) * inv_p;
    }
    cams(fn, C, P, w.data(), R, z.data(), partial, inner_parallel);
    attention_from_cams(z.data(), K, P, static_cast<acc<T>>(mu), beta.data(), A.data());
    const acc<T>* gA = z.data() + K * P;
    if (!pooled_form) {
      load_row(grad_attention + n * P, gA_given.data(), P);
      gA = gA_given.data();
    }
    // NB: a select, not gA * kept' : where a value is dropped its gradient is exactly 0 even
    // where gA is NaN or inf (as torch.where's backward); a NaN threshold keeps nothing.
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < P; ++i)
        dz[k * P + i] = pda_kept_grad(z[k * P + i], beta[k]) != acc<T>(0) ? gA[i] * inv_k : acc<T>(0);
    auto rows = [&](int64_t b, int64_t e) {
      std::vector<acc<T>> scratch(2 * P);
      backward_range(fn, b, e, P, C, K, A.data(), dz.data(), w.data(), pooled_form ? grad_pooled + n * C : nullptr,
                     inv_p, grad_f + n * C * P, gw_partial.data() + n * K * C, scratch.data());
    };
    if (inner_parallel) {
      at::parallel_for(0, C, chunk, rows);
    } else {
      rows(0, C);
    }
  };
  if (samples_per_thread(N, C * P * static_cast<int64_t>(sizeof(T)))) {
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) sample(n, false);
    });
  } else {
    for (int64_t n = 0; n < N; ++n) sample(n, true);
  }
  at::parallel_for(0, K * C, 2048, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc<T> s = 0;
      for (int64_t n = 0; n < N; ++n) s += gw_partial[n * K * C + i];
      grad_w[i] = static_cast<T>(s);
    }
  });
}

// ---- registered kernels -------------------------------------------------------------------

at::Tensor pda_attention_cpu(const at::Tensor& features, const at::Tensor& weight, double mu) {
  check_pda_args("pda_attention", features, weight, mu);
  const auto f = features.contiguous();
  const auto w = weight.contiguous();
  auto out = at::empty({f.size(0), 1, f.size(2), f.size(3)}, f.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pda_attention_cpu", [&] {
    pda_forward_impl<scalar_t>(f, w, mu, nullptr, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor pda_pool_cpu(const at::Tensor& features, const at::Tensor& weight, double mu) {
  check_pda_args("pda_pool", features, weight, mu);
  const auto f = features.contiguous();
  const auto w = weight.contiguous();
  auto out = at::empty({f.size(0), f.size(1)}, f.options());
  if (out.numel() == 0) return out;
  if (f.size(2) * f.size(3) == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // mean of nothing
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pda_pool_cpu", [&] {
    pda_forward_impl<scalar_t>(f, w, mu, out.mutable_data_ptr<scalar_t>(), nullptr);
  });
  return out;
}

// Both backwards; grad is grad_pooled [N, C] (pooled form) or grad_attention [N, 1, H, W].
std::tuple<at::Tensor, at::Tensor> pda_backward_cpu(const at::Tensor& grad, const at::Tensor& features,
                                                   const at::Tensor& weight, double mu, bool pooled_form) {
  const auto f = features.contiguous();
  const auto w = weight.contiguous();
  const auto g = grad.to(f.scalar_type()).contiguous();
  auto grad_f = at::empty(f.sizes(), f.options());
  advise_huge_pages(grad_f);
  auto grad_w = at::zeros(w.sizes(), w.options());
  if (f.numel() == 0) return {grad_f, grad_w};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pda_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    pda_backward_impl<scalar_t>(f, w, mu, pooled_form ? gp : nullptr, pooled_form ? nullptr : gp,
                                grad_f.mutable_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<scalar_t>());
  });
  return {grad_f, grad_w};
}

std::tuple<at::Tensor, at::Tensor> pda_attention_backward_cpu(const at::Tensor& grad, const at::Tensor& features,
                                                             const at::Tensor& weight, double mu) {
  check_pda_args("pda_attention_backward", features, weight, mu);
  check_pda_attention_grad(grad, features);
  return pda_backward_cpu(grad, features, weight, mu, /*pooled_form=*/false);
}

std::tuple<at::Tensor, at::Tensor> pda_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& features,
                                                        const at::Tensor& weight, double mu) {
  check_pda_args("pda_pool_backward", features, weight, mu);
  check_pda_pool_grad(grad, features);
  return pda_backward_cpu(grad, features, weight, mu, /*pooled_form=*/true);
}

}  // namespace
}  // namespace wsss::cpu

TORCH_LIBRARY_IMPL(wsss, CPU, m) {
  m.impl("pda_attention", &wsss::cpu::pda_attention_cpu);
  m.impl("pda_pool", &wsss::cpu::pda_pool_cpu);
  m.impl("pda_attention_backward", &wsss::cpu::pda_attention_backward_cpu);
  m.impl("pda_pool_backward", &wsss::cpu::pda_pool_backward_cpu);
}

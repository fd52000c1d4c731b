// CPU kernel of the Grad-CAM combination for pseudo masks:
// maps[n, k, p] = sum_c alpha[n, k, c] F[n, c, p], alpha[n, k, c] = mean_p G[n, k, c, p].
// One read of G (channel weights), one read of F (contraction); allocates only alpha [N,K,C]
// and the output.  Parallel over (n, k, c) rows for alpha, over samples for the maps.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "cpu/channel_contract.h"
#include "cpu/multiversion.h"

namespace wsss::cpu {
namespace {

// maps [K, P] of one sample from fn [C, P] and its channel weights alpha_n [K, C]; row [4, P] scratch.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void gradcam_sample_impl(const scalar_t* fn, int64_t C, int64_t P, const acc_t* alpha_n, int64_t K,
                                acc_t* maps, acc_t* row, scalar_t* out) {
  contract_channels(fn, 0, C, P, alpha_n, C, K, maps, row);
  for (int64_t i = 0; i < K * P; ++i) out[i] = static_cast<scalar_t>(maps[i]);
}

// alpha[r] = mean_p g[r, p] for rows r in [r0, r1).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void row_means_impl(const scalar_t* g, int64_t r0, int64_t r1, int64_t P, acc_t inv_p, acc_t* alpha) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gr = g + r * P;
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < P; ++i) s += static_cast<acc_t>(gr[i]);
    alpha[r] = s * inv_p;
  }
}

#define WSSS_GRADCAM_SAMPLE(T)                                                                                   \
  WSSS_MULTIVERSION void gradcam_sample(const T* fn, int64_t C, int64_t P, const at::opmath_type<T>* alpha_n,   \
                                        int64_t K, at::opmath_type<T>* maps, at::opmath_type<T>* row, T* out) { \
    gradcam_sample_impl<T>(fn, C, P, alpha_n, K, maps, row, out);                                                \
  }                                                                                                              \
  WSSS_MULTIVERSION void row_means(const T* g, int64_t r0, int64_t r1, int64_t P, at::opmath_type<T> inv_p,     \
                                   at::opmath_type<T>* alpha) {                                                  \
    row_means_impl<T>(g, r0, r1, P, inv_p, alpha);                                                               \
  }
WSSS_GRADCAM_SAMPLE(float)
WSSS_GRADCAM_SAMPLE(double)
WSSS_GRADCAM_SAMPLE(c10::BFloat16)
WSSS_GRADCAM_SAMPLE(c10::Half)
#undef WSSS_GRADCAM_SAMPLE

template <typename scalar_t>
void gradcam_impl(const scalar_t* f, const scalar_t* g, int64_t N, int64_t K, int64_t C, int64_t P, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> alpha(N * K * C);
  const acc_t inv_p = P > 0 ? acc_t(1) / acc_t(P) : acc_t(0);
  at::parallel_for(0, N * K * C, 256, [&](int64_t begin, int64_t end) {
    row_means(g, begin, end, P, inv_p, alpha.data());
  });
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> maps(K * P), row(4 * P);
    for (int64_t n = begin; n < end; ++n) {
      gradcam_sample(f + n * C * P, C, P, alpha.data() + n * K * C, K, maps.data(), row.data(), out + n * K * P);
    }
  });
}

at::Tensor gradcam_cpu(const at::Tensor& features, const at::Tensor& grads) {
  check_gradcam_args(features, grads);
  const int64_t N = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t K = grads.size(1);
  auto out = at::empty({N, K, H, W}, features.options());
  if (out.numel() == 0) return out;
  if (C == 0) return out.zero_();
  const auto f = features.contiguous();
  const auto g = grads.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "gradcam_cpu", [&] {
    gradcam_impl<scalar_t>(f.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), N, K, C, H * W,
                           out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace wsss::cpu

TORCH_LIBRARY_IMPL(wsss, CPU, m) { m.impl("gradcam", &wsss::cpu::gradcam_cpu); }

// CPU kernels of Progressive Dropout Attention: the attention map A, the fused pooled
// features GAP(A * F), and both backwards.  Per sample: one pass over F for the CAMs
// (and the pooled gradient's projection), a tiny [K, P] step for thresholds and A, then a
// second pass over F (from cache for typical sizes).  Never allocates an [N,C,H,W] temporary
// in the forward.  Parallel over samples; math in float (double for double inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/pda.h"
#include "cpu/channel_contract.h"

namespace wsss::cpu {
namespace {

// From the raw CAMs z [K, P] of one sample: thresholds beta [K] and attention A [P].
template <typename acc_t>
void attention_from_cams(const acc_t* z, int64_t K, int64_t P, acc_t mu, acc_t* beta, acc_t* A) {
  for (int64_t k = 0; k < K; ++k) {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    const acc_t* zk = z + k * P;
    for (int64_t i = 0; i < P; ++i) m = zk[i] > m ? zk[i] : m;
    beta[k] = pda_threshold(m, mu);
  }
  std::fill(A, A + P, acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* zk = z + k * P;
    const acc_t b = beta[k];
#pragma omp simd
    for (int64_t i = 0; i < P; ++i) A[i] += pda_kept(zk[i], b);
  }
  const acc_t inv_k = acc_t(1) / acc_t(K);
#pragma omp simd
  for (int64_t i = 0; i < P; ++i) A[i] *= inv_k;
}

// Forward.  pooled: [N, C] or nullptr; attention: [N, P] or nullptr.
template <typename scalar_t>
void pda_forward_impl(const at::Tensor& features, const at::Tensor& weight, double mu_d, scalar_t* pooled,
                      scalar_t* attention) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = features.size(0), C = features.size(1), P = features.size(2) * features.size(3);
  const int64_t K = weight.size(0);
  const scalar_t* f = features.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const acc_t mu = static_cast<acc_t>(mu_d);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(K * P), A(P), row(P), beta(K);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* fn = f + n * C * P;
      contract_channels(fn, C, P, w, C, 1, K, z.data(), row.data());  // pass 1: CAMs
      attention_from_cams(z.data(), K, P, mu, beta.data(), A.data());
      if (attention != nullptr) {
        for (int64_t i = 0; i < P; ++i) attention[n * P + i] = static_cast<scalar_t>(A[i]);
      }
      if (pooled != nullptr) {  // pass 2: pooled[c] = mean_p A[p] F[c, p]
        const acc_t inv_p = P > 0 ? acc_t(1) / acc_t(P) : acc_t(0);
        for (int64_t c = 0; c < C; ++c) {
          load_row(fn + c * P, row.data(), P);
          pooled[n * C + c] = static_cast<scalar_t>(dot(A.data(), row.data(), P) * inv_p);
        }
      }
    }
  });
}

// Backward.  Exactly one of grad_pooled [N, C] / grad_attention [N, P] is given.
// dL/dz_k[p] = gA[p] / K * 1[0 < z_k[p] <= beta_k], with gA = grad_attention, or for the
// pooled form gA[p] = (1/P) sum_c g[c] F[c, p] (computed in pass 1 as an extra CAM row).
// grad_F[c, p] = sum_k w_kc dz_k[p] (+ g[c] A[p] / P for the pooled form);
// grad_w[k, c] = sum_{n, p} dz_k[p] F[c, p]  (per-sample partials summed in fixed order).
template <typename scalar_t>
void pda_backward_impl(const at::Tensor& features, const at::Tensor& weight, double mu_d,
                       const scalar_t* grad_pooled, const scalar_t* grad_attention, scalar_t* grad_f,
                       at::Tensor& grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = features.size(0), C = features.size(1), P = features.size(2) * features.size(3);
  const int64_t K = weight.size(0);
  const scalar_t* f = features.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const acc_t mu = static_cast<acc_t>(mu_d);
  const bool pooled_form = grad_pooled != nullptr;
  const int64_t R = pooled_form ? K + 1 : K;  // extra row: the pooled gradient's projection
  // Combined contraction weights [R, C]: K classifier rows (+ g / P).
  std::vector<acc_t> partial_gw(static_cast<size_t>(N * K * C), acc_t(0));
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> wr(R * C), z(R * P), A(P), row(P), beta(K), dz(K * P), gf_row(P);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) wr[k * C + c] = static_cast<acc_t>(w[k * C + c]);
    const acc_t inv_p = P > 0 ? acc_t(1) / acc_t(P) : acc_t(0);
    const acc_t inv_k = acc_t(1) / acc_t(K);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* fn = f + n * C * P;
      if (pooled_form)
        for (int64_t c = 0; c < C; ++c) wr[K * C + c] = static_cast<acc_t>(grad_pooled[n * C + c]) * inv_p;
      contract_channels(fn, C, P, wr.data(), C, 1, R, z.data(), row.data());  // pass 1
      attention_from_cams(z.data(), K, P, mu, beta.data(), A.data());
      const acc_t* gA = z.data() + K * P;
      std::vector<acc_t> gA_given;
      if (!pooled_form) {
        gA_given.resize(P);
        for (int64_t i = 0; i < P; ++i) gA_given[i] = static_cast<acc_t>(grad_attention[n * P + i]);
        gA = gA_given.data();
      }
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* zk = z.data() + k * P;
        acc_t* dzk = dz.data() + k * P;
        const acc_t b = beta[k];
#pragma omp simd
        for (int64_t i = 0; i < P; ++i) dzk[i] = gA[i] * inv_k * pda_kept_grad(zk[i], b);
      }
      acc_t* gw_n = partial_gw.data() + n * K * C;
      for (int64_t c = 0; c < C; ++c) {  // pass 2
        load_row(fn + c * P, row.data(), P);
        const acc_t gc = pooled_form ? static_cast<acc_t>(grad_pooled[n * C + c]) * inv_p : acc_t(0);
#pragma omp simd
        for (int64_t i = 0; i < P; ++i) gf_row[i] = gc * A[i];
        for (int64_t k = 0; k < K; ++k) {
          const acc_t* dzk = dz.data() + k * P;
          const acc_t wkc = wr[k * C + c];
#pragma omp simd
          for (int64_t i = 0; i < P; ++i) gf_row[i] += wkc * dzk[i];
          gw_n[k * C + c] = dot(dzk, row.data(), P);
        }
        scalar_t* out = grad_f + (n * C + c) * P;
        for (int64_t i = 0; i < P; ++i) out[i] = static_cast<scalar_t>(gf_row[i]);
      }
    }
  });
  // Fixed-order reduction over samples keeps grad_w deterministic.
  scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, K * C, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t s = 0;
      for (int64_t n = 0; n < N; ++n) s += partial_gw[n * K * C + j];
      gw[j] = static_cast<scalar_t>(s);
    }
  });
}

at::Tensor pda_attention_cpu(const at::Tensor& features, const at::Tensor& weight, double mu) {
  check_pda_args("pda_attention", features, weight, mu);
  const auto f = features.contiguous();
  const auto w = weight.contiguous();
  auto out = at::empty({f.size(0), 1, f.size(2), f.size(3)}, f.options());
  if (out.numel() == 0) return out;
  if (f.size(1) == 0 || w.size(0) == 0) return out.zero_();
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
  if (f.size(2) * f.size(3) == 0 || w.size(0) == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pda_pool_cpu", [&] {
    pda_forward_impl<scalar_t>(f, w, mu, out.mutable_data_ptr<scalar_t>(), nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pda_attention_backward_cpu(const at::Tensor& grad, const at::Tensor& features,
                                                             const at::Tensor& weight, double mu) {
  check_pda_args("pda_attention_backward", features, weight, mu);
  check_pda_attention_grad(grad, features);
  const auto f = features.contiguous();
  const auto w = weight.contiguous();
  const auto g = grad.to(f.scalar_type()).contiguous();
  auto grad_f = at::empty(f.sizes(), f.options());
  auto grad_w = at::zeros(w.sizes(), w.options());
  if (f.numel() == 0 || w.size(0) == 0) return {grad_f.zero_(), grad_w};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pda_attention_backward_cpu", [&] {
    pda_backward_impl<scalar_t>(f, w, mu, nullptr, g.const_data_ptr<scalar_t>(), grad_f.mutable_data_ptr<scalar_t>(),
                                grad_w);
  });
  return {grad_f, grad_w};
}

std::tuple<at::Tensor, at::Tensor> pda_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& features,
                                                        const at::Tensor& weight, double mu) {
  check_pda_args("pda_pool_backward", features, weight, mu);
  check_pda_pool_grad(grad, features);
  const auto f = features.contiguous();
  const auto w = weight.contiguous();
  const auto g = grad.to(f.scalar_type()).contiguous();
  auto grad_f = at::empty(f.sizes(), f.options());
  auto grad_w = at::zeros(w.sizes(), w.options());
  if (f.numel() == 0 || w.size(0) == 0) return {grad_f.zero_(), grad_w};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pda_pool_backward_cpu", [&] {
    pda_backward_impl<scalar_t>(f, w, mu, g.const_data_ptr<scalar_t>(), nullptr, grad_f.mutable_data_ptr<scalar_t>(),
                                grad_w);
  });
  return {grad_f, grad_w};
}

}  // namespace
}  // namespace wsss::cpu

TORCH_LIBRARY_IMPL(wsss, CPU, m) {
  m.impl("pda_attention", &wsss::cpu::pda_attention_cpu);
  m.impl("pda_pool", &wsss::cpu::pda_pool_cpu);
  m.impl("pda_attention_backward", &wsss::cpu::pda_attention_backward_cpu);
  m.impl("pda_pool_backward", &wsss::cpu::pda_pool_backward_cpu);
}

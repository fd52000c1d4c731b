// CUDA kernels of Progressive Dropout Attention (attention map, fused pooling, backwards).
// Same math as csrc/cpu/pda_kernel.cpp through csrc/common/pda.h: CAMs by a chunked
// channel contraction, per-(sample, class) max -> threshold, A, then one warp per
// (sample, channel) row for pooling and for the backward's grad_F / grad_w.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/pda.h"
#include "cuda/contract.cuh"

namespace wsss::cuda {
namespace {

// max(a, b) with NaN propagating (as torch's max): a NaN on either side gives NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (b > a || isnan(b)) ? b : a;
}

// One block per (n, k): beta[n, k] = threshold(max_p z[n, k, p]).  z [N, R, P] (first K rows used).
// NaN propagates (csrc/cpu/pda_kernel.cpp, wsss.reference.pda_attention): a NaN in the CAM gives
// a NaN max and a NaN threshold (pda_threshold alone would clamp a NaN max to 0).
template <typename acc_t>
__global__ void threshold_kernel(const acc_t* __restrict__ z, int64_t K, int64_t R, int64_t P, acc_t mu,
                                 acc_t* __restrict__ beta) {
  const int64_t n = blockIdx.x / K, k = blockIdx.x % K;
  const acc_t* zk = z + (n * R + k) * P;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) m = nan_max(m, zk[p]);
  __shared__ acc_t shared[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t other = __shfl_down_sync(0xffffffffu, m, o);
    m = nan_max(m, other);
  }
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kThreads / 32; ++i) m = nan_max(m, shared[i]);
    beta[n * K + k] = isnan(m) ? m : pda_threshold(m, mu);
  }
}

// Thread per (n, p): A[n, p] = mean_k kept(z, beta); optionally dz[n, k, p] = gA/K * kept'(z, beta),
// gA from z's extra row K (pooled form) or from grad_attention.
template <typename scalar_t, typename acc_t>
__global__ void attention_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ beta, int64_t N, int64_t K,
                                 int64_t R, int64_t P, acc_t* __restrict__ A, scalar_t* __restrict__ attention_out,
                                 const scalar_t* __restrict__ grad_attention, acc_t* __restrict__ dz) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N * P) return;
  const int64_t n = i / P, p = i % P;
  const acc_t* zn = z + n * R * P + p;
  acc_t a = 0;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t b = beta[n * K + k];
    a += isnan(b) ? b : pda_kept(zn[k * P], b);  // a NaN threshold: NaN everywhere (as the CPU kernel)
  }
  a /= acc_t(K);
  A[i] = a;
  if (attention_out != nullptr) attention_out[i] = static_cast<scalar_t>(a);
  if (dz != nullptr) {
    const acc_t gA = grad_attention != nullptr ? static_cast<acc_t>(grad_attention[i]) : zn[K * P];
    // NB: a select, not gA * kept': a dropped value's gradient is exactly 0 even where gA is NaN
    for (int64_t k = 0; k < K; ++k)
      dz[(n * K + k) * P + p] = pda_kept_grad(zn[k * P], beta[n * K + k]) != acc_t(0) ? gA / acc_t(K) : acc_t(0);
  }
}

// One warp per (n, c): pooled[n, c] = mean_p A[n, p] f[n, c, p].
template <typename scalar_t, typename acc_t>
__global__ void pool_kernel(const scalar_t* __restrict__ f, const acc_t* __restrict__ A, int64_t N, int64_t C,
                            int64_t P, scalar_t* __restrict__ pooled) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N * C) return;
  const int64_t n = row / C;
  const scalar_t* fr = f + row * P;
  const acc_t* An = A + n * P;
  acc_t s = 0;
  for (int64_t p = lane; p < P; p += 32) s += An[p] * static_cast<acc_t>(fr[p]);
  s = warp_sum(s);
  if (lane == 0) pooled[row] = static_cast<scalar_t>(s / acc_t(P));
}

// One warp per (n, c): grad_f[n, c, p] = gc A[n, p] + sum_k w[k, c] dz[n, k, p];
// partial_gw[n, k, c] = sum_p dz[n, k, p] f[n, c, p].
template <typename scalar_t, typename acc_t>
__global__ void backward_rows_kernel(const scalar_t* __restrict__ f, const acc_t* __restrict__ A,
                                     const acc_t* __restrict__ dz, const acc_t* __restrict__ w,
                                     const scalar_t* __restrict__ grad_pooled, int64_t N, int64_t C, int64_t P,
                                     int64_t K, scalar_t* __restrict__ grad_f, acc_t* __restrict__ partial_gw) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N * C) return;
  const int64_t n = row / C, c = row % C;
  const scalar_t* fr = f + row * P;
  const acc_t* An = A + n * P;
  const acc_t* dzn = dz + n * K * P;
  const acc_t gc = grad_pooled != nullptr ? static_cast<acc_t>(grad_pooled[row]) / acc_t(P) : acc_t(0);
  for (int64_t p = lane; p < P; p += 32) {
    acc_t g = grad_pooled != nullptr ? gc * An[p] : acc_t(0);  // (not 0 * A: NaN where A is NaN or inf)
    for (int64_t k = 0; k < K; ++k) g += w[k * C + c] * dzn[k * P + p];
    grad_f[row * P + p] = static_cast<scalar_t>(g);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kRowsPerPass) {
    acc_t s[kRowsPerPass];
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i) s[i] = 0;
    for (int64_t p = lane; p < P; p += 32) {
      const acc_t x = static_cast<acc_t>(fr[p]);
#pragma unroll
      for (int i = 0; i < kRowsPerPass; ++i)
        if (k0 + i < K) s[i] += dzn[(k0 + i) * P + p] * x;
    }
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i) {
      const acc_t t = warp_sum(s[i]);
      if (lane == 0 && k0 + i < K) partial_gw[(n * K + k0 + i) * C + c] = t;
    }
  }
}

// grad_w[k, c] = sum_n partial_gw[n, k, c] (fixed order).
template <typename scalar_t, typename acc_t>
__global__ void sum_samples_kernel(const acc_t* __restrict__ partial, int64_t N, int64_t M, scalar_t* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= M) return;
  acc_t s = 0;
  for (int64_t n = 0; n < N; ++n) s += partial[n * M + i];
  out[i] = static_cast<scalar_t>(s);
}

// Weight rows in the math type: [K, C], or per sample [N, K + 1, C] with the pooled gradient / P
// as the extra row (the pooled form of the backward).
template <typename scalar_t, typename acc_t>
__global__ void weight_rows_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ grad_pooled,
                                   int64_t N, int64_t K, int64_t C, int64_t P, acc_t* __restrict__ out) {
  const int64_t R = grad_pooled != nullptr ? K + 1 : K;
  const int64_t total = (grad_pooled != nullptr ? N : 1) * R * C;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t c = i % C, r = (i / C) % R, n = i / (R * C);
  out[i] = r < K ? static_cast<acc_t>(w[r * C + c]) : static_cast<acc_t>(grad_pooled[n * C + c]) / acc_t(P);
}

struct Workspace {
  at::Tensor w, z, beta, A, dz;
};

// Pass 1 + thresholds + A (+ dz for the backward).
template <typename scalar_t>
Workspace attention_pass(const at::Tensor& f, const at::Tensor& weight, double mu, const scalar_t* grad_pooled,
                         const scalar_t* grad_attention, scalar_t* attention_out, bool backward) {
  using acc_t = at::opmath_type<scalar_t>;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = f.size(0), C = f.size(1), P = f.size(2) * f.size(3), K = weight.size(0);
  const bool pooled_form = grad_pooled != nullptr;
  const int64_t R = pooled_form ? K + 1 : K;
  const auto acc_opts = f.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Workspace ws;
  ws.w = at::empty({(pooled_form ? N : 1) * R * C}, acc_opts);
  weight_rows_kernel<scalar_t, acc_t><<<ceil_div(ws.w.numel(), kThreads), kThreads, 0, stream>>>(
      weight.const_data_ptr<scalar_t>(), grad_pooled, N, K, C, P, ws.w.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ws.z = at::empty({N * R * P}, acc_opts);
  contract<scalar_t, acc_t>(f.const_data_ptr<scalar_t>(), ws.w.const_data_ptr<acc_t>(), pooled_form ? R * C : 0, N, C,
                            P, R, ws.z.mutable_data_ptr<acc_t>(), acc_opts);
  ws.beta = at::empty({N * K}, acc_opts);
  threshold_kernel<acc_t><<<N * K, kThreads, 0, stream>>>(ws.z.const_data_ptr<acc_t>(), K, R, P,
                                                          static_cast<acc_t>(mu), ws.beta.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ws.A = at::empty({N * P}, acc_opts);
  if (backward) ws.dz = at::empty({N * K * P}, acc_opts);
  attention_kernel<scalar_t, acc_t><<<ceil_div(N * P, kThreads), kThreads, 0, stream>>>(
      ws.z.const_data_ptr<acc_t>(), ws.beta.const_data_ptr<acc_t>(), N, K, R, P, ws.A.mutable_data_ptr<acc_t>(),
      attention_out, grad_attention, backward ? ws.dz.mutable_data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ws;
}

at::Tensor pda_attention_cuda(const at::Tensor& features, const at::Tensor& weight, double mu) {
  check_pda_args("pda_attention", features, weight, mu);
  c10::cuda::CUDAGuard guard(features.device());
  const auto f = features.contiguous();
  const auto w = weight.contiguous();
  auto out = at::empty({f.size(0), 1, f.size(2), f.size(3)}, f.options());
  if (out.numel() == 0) return out;
  if (f.size(1) == 0) return out.zero_();  // (no channels: every CAM is 0, so is A; as the CPU kernel)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pda_attention_cuda", [&] {
    attention_pass<scalar_t>(f, w, mu, nullptr, nullptr, out.mutable_data_ptr<scalar_t>(), false);
  });
  return out;
}

at::Tensor pda_pool_cuda(const at::Tensor& features, const at::Tensor& weight, double mu) {
  check_pda_args("pda_pool", features, weight, mu);
  c10::cuda::CUDAGuard guard(features.device());
  const auto f = features.contiguous();
  const auto w = weight.contiguous();
  auto out = at::empty({f.size(0), f.size(1)}, f.options());
  if (out.numel() == 0) return out;
  if (f.size(2) * f.size(3) == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pda_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto ws = attention_pass<scalar_t>(f, w, mu, nullptr, nullptr, nullptr, false);
    const int64_t rows = f.size(0) * f.size(1), P = f.size(2) * f.size(3);
    pool_kernel<scalar_t, acc_t><<<ceil_div(rows * 32, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        f.const_data_ptr<scalar_t>(), ws.A.const_data_ptr<acc_t>(), f.size(0), f.size(1), P,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pda_backward_cuda(const at::Tensor& grad, const at::Tensor& features,
                                                    const at::Tensor& weight, double mu, bool pooled_form) {
  c10::cuda::CUDAGuard guard(features.device());
  const auto f = features.contiguous();
  const auto w = weight.contiguous();
  const auto g = grad.to(f.scalar_type()).contiguous();
  auto grad_f = at::empty(f.sizes(), f.options());
  auto grad_w = at::zeros(w.sizes(), w.options());
  if (f.numel() == 0) return {grad_f, grad_w};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pda_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t N = f.size(0), C = f.size(1), P = f.size(2) * f.size(3), K = w.size(0);
    const scalar_t* gp = pooled_form ? g.const_data_ptr<scalar_t>() : nullptr;
    auto ws = attention_pass<scalar_t>(f, w, mu, gp, pooled_form ? nullptr : g.const_data_ptr<scalar_t>(), nullptr,
                                       true);
    auto partial = at::empty({N * K * C}, ws.A.options());
    backward_rows_kernel<scalar_t, acc_t><<<ceil_div(N * C * 32, kThreads), kThreads, 0, stream>>>(
        f.const_data_ptr<scalar_t>(), ws.A.const_data_ptr<acc_t>(), ws.dz.const_data_ptr<acc_t>(),
        ws.w.const_data_ptr<acc_t>(), gp, N, C, P, K, grad_f.mutable_data_ptr<scalar_t>(),
        partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // NB: ws.w rows 0..K-1 of sample 0 are the classifier weights in either form.
    sum_samples_kernel<scalar_t, acc_t><<<ceil_div(K * C, kThreads), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), N, K * C, grad_w.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_f, grad_w};
}

std::tuple<at::Tensor, at::Tensor> pda_attention_backward_cuda(const at::Tensor& grad, const at::Tensor& features,
                                                              const at::Tensor& weight, double mu) {
  check_pda_args("pda_attention_backward", features, weight, mu);
  check_pda_attention_grad(grad, features);
  return pda_backward_cuda(grad, features, weight, mu, false);
}

std::tuple<at::Tensor, at::Tensor> pda_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& features,
                                                         const at::Tensor& weight, double mu) {
  check_pda_args("pda_pool_backward", features, weight, mu);
  check_pda_pool_grad(grad, features);
  return pda_backward_cuda(grad, features, weight, mu, true);
}

}  // namespace
}  // namespace wsss::cuda

TORCH_LIBRARY_IMPL(wsss, CUDA, m) {
  m.impl("pda_attention", &wsss::cuda::pda_attention_cuda);
  m.impl("pda_pool", &wsss::cuda::pda_pool_cuda);
  m.impl("pda_attention_backward", &wsss::cuda::pda_attention_backward_cuda);
  m.impl("pda_pool_backward", &wsss::cuda::pda_pool_backward_cuda);
}

// CUDA kernel of the Grad-CAM combination: alpha[n, k, c] = mean_p G[n, k, c, p] with one warp
// per row (one read of G), then maps = alpha @ F per sample with the shared chunked channel
// contraction (one read of F).  Same result as csrc/cpu/gradcam_kernel.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/contract.cuh"

namespace wsss::cuda {
namespace {

// One warp per row r of G [rows, P]: alpha[r] = mean_p G[r, p].
template <typename scalar_t, typename acc_t>
__global__ void row_mean_kernel(const scalar_t* __restrict__ g, int64_t rows, int64_t P, acc_t* __restrict__ alpha) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  acc_t s = 0;
  for (int64_t p = lane; p < P; p += 32) s += static_cast<acc_t>(g[r * P + p]);
  s = warp_sum(s);
  if (lane == 0) alpha[r] = s / acc_t(P);
}

template <typename scalar_t, typename acc_t>
__global__ void cast_kernel(const acc_t* __restrict__ in, int64_t M, scalar_t* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < M) out[i] = static_cast<scalar_t>(in[i]);
}

at::Tensor gradcam_cuda(const at::Tensor& features, const at::Tensor& grads) {
  check_gradcam_args(features, grads);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t N = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t K = grads.size(1), P = H * W;
  auto out = at::empty({N, K, H, W}, features.options());
  if (out.numel() == 0) return out;
  if (C == 0) return out.zero_();
  const auto f = features.contiguous();
  const auto g = grads.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "gradcam_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto stream = c10::cuda::getCurrentCUDAStream();
    const auto acc_opts = f.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto alpha = at::empty({N * K * C}, acc_opts);
    row_mean_kernel<scalar_t, acc_t><<<ceil_div(N * K * C * 32, kThreads), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), N * K * C, P, alpha.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto maps = at::empty({N * K * P}, acc_opts);
    contract<scalar_t, acc_t>(f.const_data_ptr<scalar_t>(), alpha.const_data_ptr<acc_t>(), K * C, N, C, P, K,
                              maps.mutable_data_ptr<acc_t>(), acc_opts);
    cast_kernel<scalar_t, acc_t><<<ceil_div(N * K * P, kThreads), kThreads, 0, stream>>>(
        maps.const_data_ptr<acc_t>(), N * K * P, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace wsss::cuda

TORCH_LIBRARY_IMPL(wsss, CUDA, m) { m.impl("gradcam", &wsss::cuda::gradcam_cuda); }

// CUDA kernel of the classification gate + argmax: thread per pixel, the K score planes read
// once (coalesced), a uint8 label written.  Same gate rule as csrc/cpu/gate_kernel.cpp
// (csrc/common/pda.h): eps cast to class_prob's dtype, no class passing -> ungated argmax,
// ties to the lowest index, tissue_mask == 0 -> background_index.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/pda.h"
#include "cuda/contract.cuh"

namespace wsss::cuda {
namespace {

constexpr int kMaxK = 255;

// grid (ceil(P / kThreads), sample_blocks(N)): a block loops over samples n = blockIdx.y, +
// gridDim.y, ... (batches beyond the grid's y limit)
// class_prob arrives as double (exact for every input dtype) and eps already rounded to
// class_prob's dtype, so the comparison is the one PyTorch's `class_prob > eps` makes.
template <typename scalar_t>
__global__ void gate_argmax_kernel(const scalar_t* __restrict__ scores, const double* __restrict__ class_prob,
                                   double eps, int64_t N, int64_t K, int64_t P, const uint8_t* __restrict__ mask,
                                   uint8_t background, uint8_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  // Gate of the current sample, shared by the block (byte k: class k may win).
  __shared__ uint8_t allow[kMaxK];
  __shared__ int any;
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    __syncthreads();  // (every thread is done with the previous sample's gate)
    if (threadIdx.x == 0) any = 0;
    __syncthreads();
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      allow[k] = gate_passes(class_prob[n * K + k], eps);
      if (allow[k]) atomicOr(&any, 1);
    }
    __syncthreads();
    if (p >= P) continue;  // (not return: the block's threads meet at the barriers above)
    const scalar_t* s = scores + n * K * P + p;
    int best_k = -1;
    acc_t best = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (any && !allow[k]) continue;
      const acc_t v = static_cast<acc_t>(s[k * P]);
      if (best_k < 0 || v > best) {
        best = v;
        best_k = static_cast<int>(k);
      }
    }
    const uint8_t label = static_cast<uint8_t>(best_k);
    out[n * P + p] = (mask == nullptr || mask[n * P + p]) ? label : background;
  }
}

at::Tensor gate_argmax_cuda(const at::Tensor& scores, const at::Tensor& class_prob, double eps,
                            const std::optional<at::Tensor>& tissue_mask, int64_t background_index) {
  check_gate_args(scores, class_prob, tissue_mask, background_index);
  c10::cuda::CUDAGuard guard(scores.device());
  const int64_t N = scores.size(0), K = scores.size(1), H = scores.size(2), W = scores.size(3);
  auto out = at::empty({N, H, W}, scores.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  const auto s = scores.contiguous();
  const auto cp = class_prob.to(at::kDouble).contiguous();
  // eps rounded to class_prob's dtype first, as `class_prob > eps` does in PyTorch (and as the CPU
  // kernel does: an eps beyond the dtype's range is inf, no class passes; NB: not fill_, which
  // refuses such a value for float)
  double eps_cast = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, class_prob.scalar_type(), "gate_argmax_cuda_eps", [&] {
    eps_cast = static_cast<double>(static_cast<scalar_t>(eps));
  });
  at::Tensor m;
  if (tissue_mask.has_value()) m = tissue_mask->contiguous();
  const uint8_t* mp = m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr;
  const int64_t P = H * W;
  const dim3 grid(ceil_div(P, kThreads), sample_blocks(N));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "gate_argmax_cuda", [&] {
    gate_argmax_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), cp.const_data_ptr<double>(), eps_cast, N, K, P, mp,
        static_cast<uint8_t>(background_index), out.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace wsss::cuda

TORCH_LIBRARY_IMPL(wsss, CUDA, m) { m.impl("gate_argmax", &wsss::cuda::gate_argmax_cuda); }

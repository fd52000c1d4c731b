// CUDA kernel of band_finalize (the runner's device blending, wsss/runner/band_stitching.py): a
// band's final rows to labels in one pass, thread per pixel.  Same results, bit for bit, as the
// composite op (csrc/composite/band_accumulate.cpp), whose ATen calls it fuses:
//   probabilities = class sums / clamp_min(weight sum, 1e-30) (NaN stays NaN), argmax with ties to
//   the lowest class and a NaN winning only as class 0 (gate_argmax's rule with every class
//   passing), tissue_mask == 0 or weight sum not > 0 -> background, counts[v] += pixels labelled
//   values[v], optional float16 probabilities; then the accumulator moves up (band_shift_up).
//
// NB: why a kernel and not the composite: besides one pass over the band instead of eight, the
// composite's first call in a process loaded five ATen kernels no model had used (gt, clamp_min,
// div, masked_fill, the bool -> int64 sum): CUDA's lazy module loading took 0.17-0.27 s for them
// on an H200, the largest one-time cost of a process's first slide (docs/runner-measurements.md).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common/band.h"
#include "common/checks.h"
#include "cuda/contract.cuh"

namespace wsss::cuda {
namespace {

constexpr int kMaxValues = 256;  // (more counted values: the composite op)

// grid ceil(P / kThreads): pixel p of the band's P = rows * W (acc's plane stride: `plane`)
__global__ void band_finalize_kernel(const float* __restrict__ acc, int64_t plane, int64_t K, int64_t P,
                                     const uint8_t* __restrict__ mask, uint8_t background,
                                     const uint8_t* __restrict__ values, int V,
                                     unsigned long long* __restrict__ counts, uint8_t* __restrict__ labels,
                                     c10::Half* __restrict__ half) {
  __shared__ uint8_t value[kMaxValues];
  __shared__ unsigned int hist[kMaxValues];
  for (int v = threadIdx.x; v < V; v += blockDim.x) {
    value[v] = values[v];
    hist[v] = 0;
  }
  __syncthreads();
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int key = -1;  // this thread's label (-1: past the band's end)
  if (p < P) {
    const float w = acc[K * plane + p];
    const float lower = static_cast<float>(1e-30);  // (clamp_min's double scalar, cast as ATen casts it)
    const float d = isnan(w) ? w : (w < lower ? lower : w);
    int best_k = -1;
    float best = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = acc[k * plane + p] / d;
      if (half != nullptr) half[k * P + p] = static_cast<c10::Half>(v);
      if (best_k < 0 || v > best) {
        best = v;
        best_k = static_cast<int>(k);
      }
    }
    const bool inside = mask == nullptr || mask[p];
    const uint8_t label = (w > 0.f && inside) ? static_cast<uint8_t>(best_k) : background;
    labels[p] = label;
    key = label;
  }
  // counting: one shared-memory add per distinct label of a warp (its lanes with that label
  // agree on who adds), then one global add per counted value and block
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  const unsigned peers = __match_any_sync(0xffffffffu, key);
  const bool leader = (threadIdx.x & 31) == __ffs(peers) - 1;
  const unsigned n = __popc(peers);
#else
  const bool leader = true;
  const unsigned n = 1;
#endif
  if (leader && key >= 0) {
    for (int v = 0; v < V; ++v) {
      if (value[v] == key) atomicAdd(&hist[v], n);
    }
  }
  __syncthreads();
  for (int v = threadIdx.x; v < V; v += blockDim.x) {
    if (hist[v]) atomicAdd(&counts[v], static_cast<unsigned long long>(hist[v]));
  }
}

std::tuple<at::Tensor, at::Tensor> band_finalize_cuda(const at::Tensor& acc, int64_t rows, int64_t shift,
                                                      const std::optional<at::Tensor>& tissue_mask,
                                                      int64_t background_index, const at::Tensor& values,
                                                      const at::Tensor& counts, bool with_probs) {
  check_band_finalize(acc, rows, shift, tissue_mask, background_index, values, counts);
  // (the kernel indexes acc's planes and counts directly; anything else takes the ATen route)
  if (!acc.is_contiguous() || !counts.is_contiguous() || values.size(0) > kMaxValues) {
    return band_finalize_composite(acc, rows, shift, tissue_mask, background_index, values, counts, with_probs);
  }
  c10::cuda::CUDAGuard guard(acc.device());
  const int64_t K = acc.size(0) - 1, W = acc.size(2), P = rows * W;
  auto labels = at::empty({rows, W}, acc.options().dtype(at::kByte));
  const auto half_options = acc.options().dtype(at::kHalf);
  auto half = with_probs ? at::empty({K, rows, W}, half_options) : at::empty({0}, half_options);
  if (P > 0) {
    at::Tensor m;
    if (tissue_mask.has_value()) m = tissue_mask->contiguous();
    const auto vals = values.contiguous();
    auto stream = c10::cuda::getCurrentCUDAStream();
    band_finalize_kernel<<<ceil_div(P, kThreads), kThreads, 0, stream>>>(
        acc.const_data_ptr<float>(), acc.size(1) * W, K, P,
        m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr,
        static_cast<uint8_t>(background_index), vals.const_data_ptr<uint8_t>(), static_cast<int>(vals.size(0)),
        reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()), labels.mutable_data_ptr<uint8_t>(),
        with_probs ? half.mutable_data_ptr<c10::Half>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  band_shift_up(acc, shift);
  return {labels, half};
}

}  // namespace
}  // namespace wsss::cuda

TORCH_LIBRARY_IMPL(wsss, CUDA, m) { m.impl("band_finalize", &wsss::cuda::band_finalize_cuda); }

// CUDA building block shared by the PDA and Grad-CAM kernels: per-sample channel
// contraction out[n, r, p] = sum_c w[n, r, c] * f[n, c, p] (w's sample stride may be 0).
// Channels are split into a fixed number of chunks (deterministic partial sums, enough
// blocks to fill the GPU), then the chunk partials are added in order.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace wsss::cuda {

constexpr int kThreads = 256;
constexpr int kRowsPerPass = 8;  // weight rows accumulated in registers per pass over f
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y (and z)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks along y for N samples: kernels loop over samples n = blockIdx.y, + gridDim.y, ... so
// batches beyond the grid's y limit work too.
inline unsigned int sample_blocks(int64_t N) { return static_cast<unsigned int>(N < kMaxGridY ? N : kMaxGridY); }

// grid (ceil(P / kThreads), sample_blocks(N), chunks); partial [chunks, N, R, P]
template <typename scalar_t, typename acc_t>
__global__ void contract_partial_kernel(const scalar_t* __restrict__ f, const acc_t* __restrict__ w,
                                        int64_t w_n_stride, int64_t N, int64_t C, int64_t P, int64_t R,
                                        int64_t chunk, acc_t* __restrict__ partial) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t j = blockIdx.z;
  if (p >= P) return;
  const int64_t c0 = j * chunk;
  const int64_t c1 = c0 + chunk < C ? c0 + chunk : C;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const scalar_t* fn = f + n * C * P + p;
    const acc_t* wn = w + n * w_n_stride;
    acc_t* out = partial + (j * N + n) * R * P + p;
    for (int64_t r0 = 0; r0 < R; r0 += kRowsPerPass) {
      acc_t sum[kRowsPerPass];
#pragma unroll
      for (int i = 0; i < kRowsPerPass; ++i) sum[i] = acc_t(0);
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t x = static_cast<acc_t>(fn[c * P]);
#pragma unroll
        for (int i = 0; i < kRowsPerPass; ++i)
          if (r0 + i < R) sum[i] += wn[(r0 + i) * C + c] * x;
      }
#pragma unroll
      for (int i = 0; i < kRowsPerPass; ++i)
        if (r0 + i < R) out[(r0 + i) * P] = sum[i];
    }
  }
}

// out [N * R * P] = sum over chunks of partial, in chunk order.
template <typename acc_t>
__global__ void sum_chunks_kernel(const acc_t* __restrict__ partial, int64_t chunks, int64_t M, acc_t* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= M) return;
  acc_t s = 0;
  for (int64_t j = 0; j < chunks; ++j) s += partial[j * M + i];
  out[i] = s;
}

// z [N, R, P] (acc_t) = contraction of f [N, C, P] with w ([N,] R, C) on the current stream.
template <typename scalar_t, typename acc_t>
void contract(const scalar_t* f, const acc_t* w, int64_t w_n_stride, int64_t N, int64_t C, int64_t P, int64_t R,
              acc_t* z, const at::TensorOptions& acc_options) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunks = C >= 512 ? 16 : (C >= 64 ? 4 : 1);
  const int64_t chunk = ceil_div(C, chunks);
  auto partial = at::empty({chunks * N * R * P}, acc_options);
  const dim3 grid(ceil_div(P, kThreads), sample_blocks(N), chunks);
  contract_partial_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(f, w, w_n_stride, N, C, P, R, chunk,
                                                                          partial.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t M = N * R * P;
  sum_chunks_kernel<acc_t><<<ceil_div(M, kThreads), kThreads, 0, stream>>>(partial.const_data_ptr<acc_t>(), chunks, M, z);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Warp-level sum.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace wsss::cuda

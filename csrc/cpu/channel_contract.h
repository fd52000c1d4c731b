// CPU building blocks shared by the PDA and Grad-CAM kernels: contracting one sample's
// features over channels with a few weight rows, and converting rows to the math type.
// Features of one sample are f [C, P] (P = H*W, contiguous); rows are out [R, P].
#pragma once
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

namespace wsss::cpu {

// dst[p] = src[p] in the math type (float for half/bfloat16/float, double for double).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* __restrict src, acc_t* __restrict dst, int64_t p) {
#pragma omp simd
  for (int64_t i = 0; i < p; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// out[r, p] = sum_c weight(r, c) * f[c, p]   for r < R, with weight(r, c) = w[r * w_row + c * w_col].
// One pass over f; each row of f is converted once into `row` (scratch [P]) and then used R times
// from L1/L2.  out is overwritten.
template <typename scalar_t, typename acc_t, typename wscalar_t>
inline void contract_channels(const scalar_t* __restrict f, int64_t C, int64_t P, const wscalar_t* __restrict w,
                              int64_t w_row, int64_t w_col, int64_t R, acc_t* __restrict out,
                              acc_t* __restrict row) {
  std::fill(out, out + R * P, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    load_row(f + c * P, row, P);
    for (int64_t r = 0; r < R; ++r) {
      const acc_t wrc = static_cast<acc_t>(w[r * w_row + c * w_col]);
      if (wrc == acc_t(0)) continue;
      acc_t* __restrict o = out + r * P;
#pragma omp simd
      for (int64_t i = 0; i < P; ++i) o[i] += wrc * row[i];
    }
  }
}

template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t p) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < p; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace wsss::cpu

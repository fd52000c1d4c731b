// CPU building blocks shared by the PDA and Grad-CAM kernels: contracting a range of one
// sample's channels with a few weight rows, and reading rows in the math type.
// Features of one sample are f [C, P] (P = H*W, contiguous); rows are out [R, P].
#pragma once
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace wsss::cpu {

// dst[p] = src[p] in the math type (float for half/bfloat16/float, double for double).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* __restrict src, acc_t* __restrict dst, int64_t p) {
#pragma omp simd
  for (int64_t i = 0; i < p; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// Row c of f in the math type: the row itself when no conversion is needed, else a copy in scratch.
template <typename scalar_t, typename acc_t>
inline const acc_t* math_row(const scalar_t* f, int64_t c, int64_t P, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return f + c * P;
  } else {
    load_row(f + c * P, scratch, P);
    return scratch;
  }
}

// out[r, p] = sum_{c in [c0, c1)} weight(r, c) * f[c, p]  for r < R, weight(r, c) = w[r * w_row + c].
// One pass over those rows of f, four channels at a time (one load/store of out per four FMAs).
// scratch holds 4 rows [4, P] (used only when f needs conversion).  out is overwritten.
template <typename scalar_t, typename acc_t>
inline void contract_channels(const scalar_t* __restrict f, int64_t c0, int64_t c1, int64_t P,
                              const acc_t* __restrict w, int64_t w_row, int64_t R, acc_t* __restrict out,
                              acc_t* __restrict scratch) {
  std::fill(out, out + R * P, acc_t(0));
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) {
    const acc_t* __restrict x0 = math_row(f, c, P, scratch);
    const acc_t* __restrict x1 = math_row(f, c + 1, P, scratch + P);
    const acc_t* __restrict x2 = math_row(f, c + 2, P, scratch + 2 * P);
    const acc_t* __restrict x3 = math_row(f, c + 3, P, scratch + 3 * P);
    for (int64_t r = 0; r < R; ++r) {
      const acc_t* wr = w + r * w_row + c;
      const acc_t w0 = wr[0], w1 = wr[1], w2 = wr[2], w3 = wr[3];
      acc_t* __restrict o = out + r * P;
#pragma omp simd
      for (int64_t i = 0; i < P; ++i) o[i] += w0 * x0[i] + w1 * x1[i] + w2 * x2[i] + w3 * x3[i];
    }
  }
  for (; c < c1; ++c) {
    const acc_t* __restrict x = math_row(f, c, P, scratch);
    for (int64_t r = 0; r < R; ++r) {
      const acc_t wrc = w[r * w_row + c];
      acc_t* __restrict o = out + r * P;
#pragma omp simd
      for (int64_t i = 0; i < P; ++i) o[i] += wrc * x[i];
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

// Deterministic split of [0, C) into chunks of fixed size (independent of the thread count,
// so partial sums are always added in the same order).
inline int64_t channel_chunk(int64_t C) { return std::max<int64_t>(16, (C + 31) / 32); }

}  // namespace wsss::cpu

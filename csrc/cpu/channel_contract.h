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

// Prefetches ``bytes`` bytes from ``next`` (null: none), spread evenly over ``steps`` calls of
// step(): the rows a loop reads next, while it works on the current ones.
class SpreadPrefetch {
 public:
  SpreadPrefetch(const char* next, int64_t bytes, int64_t steps)
      : next_(next), lines_(next == nullptr ? 0 : (bytes + 63) / 64),
        per_step_(steps > 0 ? (lines_ + steps - 1) / steps : lines_) {}
  void step() {
    for (int64_t j = 0; j < per_step_ && line_ < lines_; ++j, ++line_) __builtin_prefetch(next_ + 64 * line_);
  }

 private:
  const char* next_;
  int64_t lines_, per_step_, line_ = 0;
};

// o[r, i] += w(r, 0) x0[i] + w(r, 1) x1[i] + w(r, 2) x2[i] + w(r, 3) x3[i] for r < R, i < P, w(r, j) =
// w[r * w_row + j]: every row in one pass over the pixels, so each x is loaded once for all R
// rows (a loop over the rows outside reloaded it R times: 24 memory operations per pixel for 16
// FMAs at R = 4, now 12).  Per element the same sums in the same order as one row at a time.
// ``next`` (may be null): the bytes the caller reads next, ``next_bytes`` of them, prefetched
// while these rows are summed (four rows of 784 pixels are four short streams, too short for the
// hardware prefetcher to ramp up on: pass 1 of the PDA read them at a third of the DRAM's speed).
template <int R, typename acc_t>
inline void add_four_channels(const acc_t* __restrict x0, const acc_t* __restrict x1, const acc_t* __restrict x2,
                              const acc_t* __restrict x3, const acc_t* __restrict w, int64_t w_row, int64_t P,
                              acc_t* __restrict o, const char* next = nullptr, int64_t next_bytes = 0) {
  acc_t wr[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) wr[r][j] = w[r * w_row + j];
  constexpr int64_t kBlock = 16;  // pixels per step: a cache line of each float row
  SpreadPrefetch prefetch(next, next_bytes, (P + kBlock - 1) / kBlock);
  for (int64_t i0 = 0; i0 < P; i0 += kBlock) {
    prefetch.step();
    const int64_t i1 = i0 + kBlock < P ? i0 + kBlock : P;
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t a0 = x0[i], a1 = x1[i], a2 = x2[i], a3 = x3[i];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) o[r * P + i] += wr[r][0] * a0 + wr[r][1] * a1 + wr[r][2] * a2 + wr[r][3] * a3;
    }
  }
}

// out[r, p] = sum_{c in [c0, c1)} weight(r, c) * f[c, p]  for r < R, weight(r, c) = w[r * w_row + c].
// One pass over those rows of f, four channels at a time (one load/store of out per four FMAs;
// up to 8 rows in one pass over the pixels, add_four_channels).  scratch holds 4 rows [4, P]
// (used only when f needs conversion).  out is overwritten.
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
    const acc_t* wc = w + c;
    // (the next four rows: contiguous after these)
    const int64_t ahead = std::min<int64_t>(4, c1 - (c + 4));
    const char* nx = ahead > 0 ? reinterpret_cast<const char*>(f + (c + 4) * P) : nullptr;
    const int64_t nb = ahead > 0 ? ahead * P * static_cast<int64_t>(sizeof(scalar_t)) : 0;
    switch (R) {
      case 1: add_four_channels<1>(x0, x1, x2, x3, wc, w_row, P, out, nx, nb); break;
      case 2: add_four_channels<2>(x0, x1, x2, x3, wc, w_row, P, out, nx, nb); break;
      case 3: add_four_channels<3>(x0, x1, x2, x3, wc, w_row, P, out, nx, nb); break;
      case 4: add_four_channels<4>(x0, x1, x2, x3, wc, w_row, P, out, nx, nb); break;
      case 5: add_four_channels<5>(x0, x1, x2, x3, wc, w_row, P, out, nx, nb); break;
      case 6: add_four_channels<6>(x0, x1, x2, x3, wc, w_row, P, out, nx, nb); break;
      case 7: add_four_channels<7>(x0, x1, x2, x3, wc, w_row, P, out, nx, nb); break;
      case 8: add_four_channels<8>(x0, x1, x2, x3, wc, w_row, P, out, nx, nb); break;
      default:
        for (int64_t r = 0; r < R; ++r)
          add_four_channels<1>(x0, x1, x2, x3, wc + r * w_row, w_row, P, out + r * P, r == 0 ? nx : nullptr, nb);
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

// CPU kernel of the classification gate + argmax: labels[n, p] = the class k maximising
// scores[n, k, p] among the classes that pass the gate (class_prob[n, k] > eps), lowest
// index on ties; a sample where no class passes keeps its ungated argmax; tissue_mask == 0
// gives background_index.  One read of the scores, one uint8 write, no temporaries.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/pda.h"
#include "cpu/multiversion.h"

namespace wsss::cpu {
namespace {

constexpr int64_t kBlock = 2048;  // pixels per work item: running max + index stay in L1

// allowed[n * K + k]: class k may win in sample n (NB: eps is cast to class_prob's dtype
// first, as `class_prob > eps` does in PyTorch).
std::vector<uint8_t> gate_table(const at::Tensor& class_prob, double eps) {
  const auto p = class_prob.contiguous();
  const int64_t N = p.size(0), K = p.size(1);
  std::vector<uint8_t> allowed(N * K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "gate_table", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(static_cast<scalar_t>(eps));
    for (int64_t n = 0; n < N; ++n) {
      bool any = false;
      for (int64_t k = 0; k < K; ++k) {
        allowed[n * K + k] = gate_passes(static_cast<acc_t>(pp[n * K + k]), e);
        any = any || allowed[n * K + k];
      }
      if (!any) std::fill(allowed.begin() + n * K, allowed.begin() + (n + 1) * K, uint8_t(1));
    }
  });
  return allowed;
}

// Up to kMaxUnrolled allowed classes: per pixel, a running max over the allowed class planes
// held in registers (the class loop is unrolled at compile time, so the pixel loop
// vectorises: one load per class and pixel, one byte store per pixel).
constexpr int kMaxUnrolled = 8;

template <int KA, typename scalar_t>
inline void gate_pixels_unrolled(const scalar_t* const* planes, const int32_t* classes, int64_t len,
                                 const uint8_t* __restrict mask, uint8_t background, uint8_t* __restrict out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict p[KA];
  int32_t cls[KA];
  for (int j = 0; j < KA; ++j) {
    p[j] = planes[j];
    cls[j] = classes[j];
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    acc_t best = static_cast<acc_t>(p[0][i]);
    int32_t best_k = cls[0];
#pragma GCC unroll 8
    for (int j = 1; j < KA; ++j) {
      const acc_t v = static_cast<acc_t>(p[j][i]);
      const bool better = v > best;  // strict: ties keep the lower index
      best = better ? v : best;
      best_k = better ? cls[j] : best_k;
    }
    const uint8_t label = static_cast<uint8_t>(best_k);
    out[i] = (mask == nullptr || mask[i]) ? label : background;
  }
}

// One block of len <= kBlock pixels of one sample: s points at scores[n, 0, p0], classes
// P apart; allow [K]; mask [len] or null; out [len].
template <typename scalar_t>
inline void gate_block_impl(const scalar_t* __restrict s, int64_t K, int64_t P, int64_t len, const uint8_t* allow,
                            const uint8_t* __restrict mask, uint8_t background, uint8_t* __restrict out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* planes[kMaxUnrolled];
  int32_t classes[kMaxUnrolled];
  int ka = 0;
  for (int32_t k = 0; k < K && ka <= kMaxUnrolled; ++k) {
    if (!allow[k]) continue;
    if (ka < kMaxUnrolled) {
      planes[ka] = s + k * P;
      classes[ka] = k;
    }
    ++ka;
  }
  switch (ka) {
    case 1: return gate_pixels_unrolled<1>(planes, classes, len, mask, background, out);
    case 2: return gate_pixels_unrolled<2>(planes, classes, len, mask, background, out);
    case 3: return gate_pixels_unrolled<3>(planes, classes, len, mask, background, out);
    case 4: return gate_pixels_unrolled<4>(planes, classes, len, mask, background, out);
    case 5: return gate_pixels_unrolled<5>(planes, classes, len, mask, background, out);
    case 6: return gate_pixels_unrolled<6>(planes, classes, len, mask, background, out);
    case 7: return gate_pixels_unrolled<7>(planes, classes, len, mask, background, out);
    case 8: return gate_pixels_unrolled<8>(planes, classes, len, mask, background, out);
    default: break;
  }
  // Many allowed classes: running max and index per pixel in L1-resident block arrays.
  alignas(64) acc_t best[kBlock];
  alignas(64) int32_t best_k[kBlock];
  int32_t first = 0;
  while (!allow[first]) ++first;  // the table guarantees one allowed class
  {
    const scalar_t* sk = s + first * P;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      best[i] = static_cast<acc_t>(sk[i]);
      best_k[i] = first;
    }
  }
  for (int32_t k = first + 1; k < K; ++k) {
    if (!allow[k]) continue;
    const scalar_t* sk = s + k * P;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t v = static_cast<acc_t>(sk[i]);
      const bool better = v > best[i];  // strict: ties keep the lower index
      best[i] = better ? v : best[i];
      best_k[i] = better ? k : best_k[i];
    }
  }
  if (mask != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = mask[i] ? static_cast<uint8_t>(best_k[i]) : background;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<uint8_t>(best_k[i]);
  }
}

#define WSSS_GATE_BLOCK(T)                                                                                 \
  WSSS_MULTIVERSION void gate_block(const T* s, int64_t K, int64_t P, int64_t len, const uint8_t* allow,   \
                                    const uint8_t* mask, uint8_t background, uint8_t* out) {               \
    gate_block_impl<T>(s, K, P, len, allow, mask, background, out);                                         \
  }
WSSS_GATE_BLOCK(float)
WSSS_GATE_BLOCK(double)
WSSS_GATE_BLOCK(c10::BFloat16)
WSSS_GATE_BLOCK(c10::Half)
#undef WSSS_GATE_BLOCK

template <typename scalar_t>
void gate_argmax_impl(const scalar_t* scores, int64_t N, int64_t K, int64_t P, const uint8_t* allowed,
                      const uint8_t* mask, uint8_t background, uint8_t* out) {
  const int64_t blocks_per_sample = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, N * blocks_per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b / blocks_per_sample;
      const int64_t p0 = (b % blocks_per_sample) * kBlock;
      gate_block(scores + n * K * P + p0, K, P, std::min(kBlock, P - p0), allowed + n * K,
                 mask ? mask + n * P + p0 : nullptr, background, out + n * P + p0);
    }
  });
}

at::Tensor gate_argmax_cpu(const at::Tensor& scores, const at::Tensor& class_prob, double eps,
                           const std::optional<at::Tensor>& tissue_mask, int64_t background_index) {
  check_gate_args(scores, class_prob, tissue_mask, background_index);
  const int64_t N = scores.size(0), K = scores.size(1), H = scores.size(2), W = scores.size(3);
  auto out = at::empty({N, H, W}, scores.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  const auto s = scores.contiguous();
  const auto allowed = gate_table(class_prob, eps);
  at::Tensor m;
  if (tissue_mask.has_value()) m = tissue_mask->contiguous();
  // Bool and Byte are both one byte per element; any non-zero byte means tissue.
  const uint8_t* mp = m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "gate_argmax_cpu", [&] {
    gate_argmax_impl<scalar_t>(s.const_data_ptr<scalar_t>(), N, K, H * W, allowed.data(), mp,
                               static_cast<uint8_t>(background_index), out.mutable_data_ptr<uint8_t>());
  });
  return out;
}

}  // namespace
}  // namespace wsss::cpu

TORCH_LIBRARY_IMPL(wsss, CPU, m) { m.impl("gate_argmax", &wsss::cpu::gate_argmax_cpu); }

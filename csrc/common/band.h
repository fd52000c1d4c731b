// band_finalize's argument checks and its composite (ATen) implementation, shared by the CPU/CUDA
// composite registration (csrc/composite/band_accumulate.cpp) and the fused CUDA kernel
// (csrc/cuda/band_kernel.cu), so every backend says the same words and shifts the same way.
// Host-only.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace wsss {

// acc [K+1, R, W] float, rows in [0, R], shift >= 0, tissue_mask [rows, W]?, values [V] uint8 and
// counts [V] int64 on acc's device
inline void check_band_finalize(const at::Tensor& acc, int64_t rows, int64_t shift,
                                const std::optional<at::Tensor>& tissue_mask, int64_t background_index,
                                const at::Tensor& values, const at::Tensor& counts) {
  constexpr const char* op = "wsss::band_finalize: ";
  WSSS_CHECK(acc.dim() == 3 && acc.size(0) >= 2, op, "acc must be a 3-D tensor [K+1, R, W] with K >= 1, got shape ",
             shape_str(acc));
  WSSS_CHECK(acc.size(0) <= 256, op, "acc must have 1 to 255 classes (K = acc.size(0) - 1), got ", acc.size(0) - 1);
  WSSS_CHECK(acc.scalar_type() == at::kFloat, op, "acc must be Float, got ", acc.scalar_type());
  WSSS_CHECK(0 <= rows && rows <= acc.size(1), op, "rows must be in [0, ", acc.size(1), "], got ", rows);
  WSSS_CHECK(0 <= shift, op, "shift must be >= 0, got ", shift);
  WSSS_CHECK(values.dim() == 1 && values.scalar_type() == at::kByte && values.device() == acc.device(), op,
             "values must be a 1-D uint8 tensor on the device of acc, got shape ", shape_str(values), " of ",
             values.scalar_type(), " on ", values.device());
  WSSS_CHECK(counts.dim() == 1 && counts.size(0) == values.size(0) && counts.scalar_type() == at::kLong &&
                 counts.device() == acc.device(),
             op, "counts must be an int64 tensor [", values.size(0), "] on the device of acc, got shape ",
             shape_str(counts), " of ", counts.scalar_type(), " on ", counts.device());
  // NB: every argument gate_argmax would check is checked here first, so its errors name
  // band_finalize and the argument as the caller passed it (and the fake kernel says the same)
  check_mask_and_background(op, tissue_mask, "rows, W", {rows, acc.size(2)}, acc, "acc", background_index);
}

// band_finalize from ATen calls (arguments already checked); see band_accumulate.cpp
std::tuple<at::Tensor, at::Tensor> band_finalize_composite(const at::Tensor& acc, int64_t rows, int64_t shift,
                                                           const std::optional<at::Tensor>& tissue_mask,
                                                           int64_t background_index, const at::Tensor& values,
                                                           const at::Tensor& counts, bool with_probs);

// acc's rows move up by `shift` (zeros below; shift >= R: all zeros; 0: nothing)
void band_shift_up(const at::Tensor& acc, int64_t shift);

}  // namespace wsss

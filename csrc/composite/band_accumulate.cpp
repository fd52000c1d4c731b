// band_accumulate: the runner's device-side blend of a batch of tiles into a band accumulator,
//   for i in order: acc[:, :rows, x_i : x_i + w_i] += tiles[i, :, :rows, :w_i],  w_i = min(T, W - x_i);
//   with a window [T, T], tiles are class probabilities [N, K, T, T] and acc [K+1, R, W]: what is
//   added is (tiles * window, window), the products made first for the whole batch, as before.
// band_finalize: the band's final rows to labels (see below).
//
// A composite op (ATen calls, so any backend could run it; registered for CPU and CUDA)
// rather than a kernel of its own: the adds are torch's in-place adds, in tile order, so sums
// are bit-identical to the Python loop this replaces (wsss.reference.band_accumulate) and to
// the CPU stitcher's.  What it buys is the loop itself running in C++: on a GPU host the
// Python loop (two torch calls per tile, each dropping and retaking the GIL) competed with the
// reader threads for the GIL and starved the model's stream (H200, reference networks:
// 2.2 s of 7.8 s of tile stage queueing these adds; docs/runner-measurements.md).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/band.h"
#include "common/checks.h"

namespace wsss {
namespace {

void check_band_accumulate(const at::Tensor& acc, const at::Tensor& tiles, at::IntArrayRef xs, int64_t rows,
                           const std::optional<at::Tensor>& window) {
  constexpr const char* op = "wsss::band_accumulate: ";
  WSSS_CHECK(acc.dim() == 3, op, "acc must be a 3-D tensor [C, R, W], got shape ", shape_str(acc));
  const int64_t c = acc.size(0) - (window.has_value() ? 1 : 0);
  WSSS_CHECK(tiles.dim() == 4 && tiles.size(1) == c && tiles.size(2) == tiles.size(3), op,
             window.has_value() ? "tiles must have shape [N, K, T, T] with K = acc.size(0) - 1 = "
                                : "tiles must have shape [N, C, T, T] with C = acc.size(0) = ",
             c, ", got shape ", shape_str(tiles));
  if (window.has_value()) {
    WSSS_CHECK(window->dim() == 2 && window->size(0) == tiles.size(2) && window->size(1) == tiles.size(3), op,
               "window must have shape [T, T] = [", tiles.size(2), ", ", tiles.size(3), "], got shape ",
               shape_str(*window));
    WSSS_CHECK(window->scalar_type() == acc.scalar_type() && window->device() == acc.device(), op,
               "window must have the dtype and device of acc (", acc.scalar_type(), ", ", acc.device(), "), got ",
               window->scalar_type(), ", ", window->device());
  }
  WSSS_CHECK(is_supported_float(acc.scalar_type()), op,
             "acc must be a floating tensor (Float, Double, BFloat16, Half), got ", acc.scalar_type());
  WSSS_CHECK(tiles.scalar_type() == acc.scalar_type(), op, "tiles must have the dtype of acc (",
             acc.scalar_type(), "), got ", tiles.scalar_type());
  WSSS_CHECK(tiles.device() == acc.device(), op, "tiles must be on the device of acc (", acc.device(), "), got ",
             tiles.device());
  WSSS_CHECK(static_cast<int64_t>(xs.size()) == tiles.size(0), op, "xs must hold one column per tile (",
             tiles.size(0), "), got ", static_cast<int64_t>(xs.size()));
  WSSS_CHECK(0 <= rows && rows <= std::min(acc.size(1), tiles.size(2)), op, "rows must be in [0, ",
             std::min(acc.size(1), tiles.size(2)), "], got ", rows);
  for (const int64_t x : xs) {
    WSSS_CHECK(0 <= x && x < acc.size(2), op, "every x must be in [0, ", acc.size(2), "), got ", x);
  }
}

void band_accumulate(const at::Tensor& acc, const at::Tensor& tiles, at::IntArrayRef xs, int64_t rows,
                     const std::optional<at::Tensor>& window) {
  check_band_accumulate(acc, tiles, xs, rows, window);
  const int64_t T = tiles.size(3), W = acc.size(2);
  if (rows == 0) return;
  at::Tensor added = tiles;
  if (window.has_value()) {  // (tiles * window, window) for the whole batch, then tile by tile
    const int64_t n = tiles.size(0), k = tiles.size(1);
    added = at::empty({n, k + 1, T, T}, tiles.options());
    at::Tensor products = added.narrow(1, 0, k);
    at::mul_out(products, tiles, *window);
    added.select(1, k).copy_(*window);
  }
  const auto band = acc.narrow(1, 0, rows);
  for (int64_t i = 0; i < added.size(0); ++i) {
    const int64_t w = std::min(T, W - xs[i]);
    band.narrow(2, xs[i], w).add_(added[i].narrow(1, 0, rows).narrow(2, 0, w));
  }
}

// band_finalize(acc [K+1, R, W], rows, shift, tissue_mask [rows, W]?, background_index, values [V],
//               counts [V] (in place), with_probs) -> (labels uint8 [rows, W], probs float16 [K, rows, W] or [0])
// The rows [0, rows) of the band are final: probabilities = class sums / weight sum, labels by
// gate_argmax (every class passes the gate; the tissue mask sends pixels outside to the
// background), pixels no tile covered -> background, counts[v] += pixels labelled values[v];
// then the accumulator moves up by `shift` rows (zeros below; shift 0: stays).  The ATen calls
// of wsss/runner/band_stitching.py's Python version, in one op call (NB: on a GPU host every
// Python-level torch call gave up the GIL and waited to take it back).  The CUDA build has a
// fused kernel instead (csrc/cuda/band_kernel.cu; the same results bit for bit).
std::tuple<at::Tensor, at::Tensor> band_finalize(const at::Tensor& acc, int64_t rows, int64_t shift,
                                                 const std::optional<at::Tensor>& tissue_mask,
                                                 int64_t background_index, const at::Tensor& values,
                                                 const at::Tensor& counts, bool with_probs) {
  check_band_finalize(acc, rows, shift, tissue_mask, background_index, values, counts);
  return band_finalize_composite(acc, rows, shift, tissue_mask, background_index, values, counts, with_probs);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> band_finalize_composite(const at::Tensor& acc, int64_t rows, int64_t shift,
                                                           const std::optional<at::Tensor>& tissue_mask,
                                                           int64_t background_index, const at::Tensor& values,
                                                           const at::Tensor& counts, bool with_probs) {
  const int64_t K = acc.size(0) - 1;
  const auto band = acc.narrow(1, 0, rows);
  const auto weight = band.select(0, K);
  const auto covered = weight.gt(0);
  // NB: uncovered pixels have zero sums: any positive divisor gives them 0 probabilities
  const auto probs = band.narrow(0, 0, K).div(weight.clamp_min(1e-30));
  static auto gate = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("wsss::gate_argmax", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double,
                                           const std::optional<at::Tensor>&, int64_t)>();
  const auto ones = at::ones({1, K}, acc.options());
  std::optional<at::Tensor> mask;
  if (tissue_mask.has_value()) mask = tissue_mask->unsqueeze(0);
  auto labels = gate.call(probs.unsqueeze(0), ones, 0.0, mask, background_index).squeeze(0);
  labels.masked_fill_(covered.logical_not(), background_index);
  // NB: not bincount: on CUDA it reads the input's maximum back to the host (a stream sync)
  counts.add_(labels.unsqueeze(0).eq(values.view({-1, 1, 1})).sum({1, 2}));
  at::Tensor half = with_probs ? probs.to(at::kHalf) : at::empty({0}, acc.options().dtype(at::kHalf));
  band_shift_up(acc, shift);
  return {labels, half};
}

void band_shift_up(const at::Tensor& acc, int64_t shift) {
  if (shift <= 0) return;
  const int64_t keep = acc.size(1) - shift;
  if (keep > 0) {
    acc.narrow(1, 0, keep).copy_(acc.narrow(1, shift, keep).clone());
    acc.narrow(1, keep, shift).zero_();
  } else {
    acc.zero_();
  }
}

}  // namespace wsss

// NB: CPU and CUDA only (the backends the runner blends on); Meta is the fake kernel in
// wsss/ops.py.  The CUDA registrations need no CUDA code (the ops dispatch to torch's kernels),
// except where the library has a kernel of its own: band_finalize's fused kernel
// (csrc/cuda/band_kernel.cu), which a build with CUDA kernels registers instead.
TORCH_LIBRARY_IMPL(wsss, CPU, m) {
  m.impl("band_accumulate", &wsss::band_accumulate);
  m.impl("band_finalize", &wsss::band_finalize);
}
TORCH_LIBRARY_IMPL(wsss, CUDA, m) {
  m.impl("band_accumulate", &wsss::band_accumulate);
#ifndef WSSS_WITH_CUDA_KERNELS
  m.impl("band_finalize", &wsss::band_finalize);
#endif
}

// band_accumulate: the runner's device-side blend of a batch of tiles into a band accumulator,
//   for i in order: acc[:, :rows, x_i : x_i + w_i] += tiles[i, :, :rows, :w_i],  w_i = min(T, W - x_i).
//
// A composite op (ATen calls, so every backend torch has runs it, registered for CPU and CUDA)
// rather than a kernel of its own: the adds are torch's in-place adds, in tile order, so sums
// are bit-identical to the Python loop this replaces (wsss.reference.band_accumulate) and to
// the CPU stitcher's.  What it buys is the loop itself running in C++: on a GPU host the
// Python loop (two torch calls per tile, each dropping and retaking the GIL) competed with the
// reader threads for the GIL and starved the model's stream (H200, reference networks:
// 2.2 s of 7.8 s of tile stage queueing these adds; docs/runner-measurements.md).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"

namespace wsss {
namespace {

void check_band_accumulate(const at::Tensor& acc, const at::Tensor& tiles, at::IntArrayRef xs, int64_t rows) {
  constexpr const char* op = "wsss::band_accumulate: ";
  WSSS_CHECK(acc.dim() == 3, op, "acc must be a 3-D tensor [C, R, W], got shape ", shape_str(acc));
  WSSS_CHECK(tiles.dim() == 4 && tiles.size(1) == acc.size(0) && tiles.size(2) == tiles.size(3),
             op, "tiles must have shape [N, C, T, T] with C = acc.size(0) = ", acc.size(0), ", got shape ",
             shape_str(tiles));
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

void band_accumulate(const at::Tensor& acc, const at::Tensor& tiles, at::IntArrayRef xs, int64_t rows) {
  check_band_accumulate(acc, tiles, xs, rows);
  const int64_t T = tiles.size(3), W = acc.size(2);
  if (rows == 0) return;
  const auto band = acc.narrow(1, 0, rows);
  for (int64_t i = 0; i < tiles.size(0); ++i) {
    const int64_t w = std::min(T, W - xs[i]);
    band.narrow(2, xs[i], w).add_(tiles[i].narrow(1, 0, rows).narrow(2, 0, w));
  }
}

}  // namespace
}  // namespace wsss

// NB: CPU and CUDA only (the backends the runner blends on); Meta is the fake kernel in
// wsss/ops.py.  The CUDA registration needs no CUDA code: the adds dispatch to torch's kernels.
TORCH_LIBRARY_IMPL(wsss, CPU, m) { m.impl("band_accumulate", &wsss::band_accumulate); }
TORCH_LIBRARY_IMPL(wsss, CUDA, m) { m.impl("band_accumulate", &wsss::band_accumulate); }

// majority_downsample: uint8 labels [2h, 2w] -> [h, w], the most frequent value of each 2x2 block
// (the label pyramid's levels: a vote, never a max).
//
// With a b / c d the block in reading order, the rules (wsss.reference.majority_downsample):
// a if a equals any other value; else b if b equals c or d; else c if c equals d; else (four
// different values) a.  So a 2-2 split keeps a's class, and otherwise the majority wins.
//
// Why an op: the numpy version made about ten array calls per strip of parent tiles, and on a
// GPU host each of them gave up the GIL and waited to take it back beside the runner's other
// threads; this is one call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"

namespace wsss {
namespace {

inline uint8_t vote(uint8_t a, uint8_t b, uint8_t c, uint8_t d) {
  if (a == b || a == c || a == d) return a;
  if (b == c || b == d) return b;
  if (c == d) return c;
  return a;  // four different values (d alone cannot be a majority)
}

at::Tensor majority_downsample(const at::Tensor& labels) {
  constexpr const char* op = "wsss::majority_downsample: ";
  WSSS_CHECK(labels.dim() == 2 && labels.size(0) % 2 == 0 && labels.size(1) % 2 == 0, op,
             "labels must be a 2-D tensor [2h, 2w] (even sizes), got shape ", shape_str(labels));
  WSSS_CHECK(labels.scalar_type() == at::kByte, op, "labels must be uint8 (Byte), got ", labels.scalar_type());
  const at::Tensor src = labels.contiguous();
  const int64_t h = src.size(0) / 2, w = src.size(1) / 2, stride = src.size(1);
  at::Tensor out = at::empty({h, w}, src.options());
  const uint8_t* in = src.const_data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  // NB: no parallel_for: the pyramid calls this from its own pool threads
  for (int64_t y = 0; y < h; ++y) {
    const uint8_t* top = in + 2 * y * stride;
    const uint8_t* bottom = top + stride;
    uint8_t* row = dst + y * w;
    for (int64_t x = 0; x < w; ++x) {
      row[x] = vote(top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]);
    }
  }
  return out;
}

}  // namespace
}  // namespace wsss

TORCH_LIBRARY_IMPL(wsss, CPU, m) { m.impl("majority_downsample", &wsss::majority_downsample); }

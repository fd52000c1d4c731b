// deflate_tiles / inflate_tiles: zlib streams of many output tiles in one call (the runner's
// label TIFF tiles), and back.
//
//   deflate_tiles(tiles [N, ...] CPU contiguous, index [M], level) -> (data uint8 [B], ends int64 [M])
//   stream j is data[ends[j-1] : ends[j]] (ends[-1] = 0), the zlib-format deflate of the bytes of
//   tiles[index[j]] at `level` (0-10, miniz's levels; 1: fastest).
//   inflate_tiles(data uint8 [B], starts [M], ends [M], out [M, ...] CPU contiguous) -> ()
//   inflates stream j = data[starts[j] : ends[j]] into out[j], which it must fill exactly.
//
// Why an op: the runner stores each finished output tile compressed.  Compressed one Python call
// at a time, every tile gave up the GIL and waited to retake it; on a GPU host, where reader
// threads and the model's feeder want the GIL too, that wait (about one switch interval per
// tile) made the band writer the pipeline's bottleneck (H100, 16384^2: busy 6.1 of 6.4 s of
// tiles).  One call per tile row gives the GIL up once.
//
// The deflate is miniz's, which libtorch_cpu carries and exports (torch writes its zip archives
// with it): nothing more to build or link, in Python or in a C++ host.  Any zlib reader inflates
// the streams (TIFF's Adobe deflate, Python's zlib).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/checks.h"

extern "C" {
// miniz (mz_ulong is unsigned long); exported by libtorch_cpu, which the op library links
int mz_compress2(unsigned char* dest, unsigned long* dest_len, const unsigned char* source,
                 unsigned long source_len, int level);
unsigned long mz_compressBound(unsigned long source_len);
int mz_uncompress(unsigned char* dest, unsigned long* dest_len, const unsigned char* source,
                  unsigned long source_len);
}

namespace wsss {
namespace {

constexpr int MZ_OK = 0;

std::tuple<at::Tensor, at::Tensor> deflate_tiles(const at::Tensor& tiles, at::IntArrayRef index, int64_t level) {
  constexpr const char* op = "wsss::deflate_tiles: ";
  WSSS_CHECK(tiles.dim() >= 1, op, "tiles must have a leading tile dimension [N, ...], got a 0-d tensor");
  WSSS_CHECK(tiles.is_contiguous(), op, "tiles must be contiguous, got a non-contiguous tensor of shape ",
             shape_str(tiles));
  WSSS_CHECK(0 <= level && level <= 10, op, "level must be in [0, 10], got ", level);
  const int64_t n = tiles.size(0);
  for (const int64_t i : index) {
    WSSS_CHECK(0 <= i && i < n, op, "every index must be in [0, ", n, "), got ", i);
  }
  const int64_t m = static_cast<int64_t>(index.size());
  const unsigned long tile_bytes = n ? static_cast<unsigned long>(tiles.nbytes() / n) : 0;
  const auto* base = static_cast<const unsigned char*>(tiles.const_data_ptr());

  at::Tensor ends = at::empty({m}, tiles.options().dtype(at::kLong));
  int64_t* end = ends.data_ptr<int64_t>();
  // NB: each stream goes through one worst-case-sized buffer into a growing one, so memory is
  // the compressed bytes plus one tile's bound (a row of float16 probability tiles of a wide
  // slide is over 100 MB raw)
  std::vector<unsigned char> one(mz_compressBound(tile_bytes));
  std::vector<unsigned char> streams;
  for (int64_t j = 0; j < m; ++j) {
    unsigned long len = static_cast<unsigned long>(one.size());
    const int rc = mz_compress2(one.data(), &len, base + index[j] * tile_bytes, tile_bytes, static_cast<int>(level));
    WSSS_CHECK(rc == MZ_OK, op, "deflate failed (miniz error ", rc, ") on tile ", index[j]);
    streams.insert(streams.end(), one.data(), one.data() + len);
    end[j] = static_cast<int64_t>(streams.size());
  }
  at::Tensor data = at::empty({static_cast<int64_t>(streams.size())}, tiles.options().dtype(at::kByte));
  if (!streams.empty()) std::memcpy(data.data_ptr<uint8_t>(), streams.data(), streams.size());
  return {data, ends};
}

void inflate_tiles(const at::Tensor& data, at::IntArrayRef starts, at::IntArrayRef ends, const at::Tensor& out) {
  constexpr const char* op = "wsss::inflate_tiles: ";
  WSSS_CHECK(data.dim() == 1 && data.scalar_type() == at::kByte && data.is_contiguous(), op,
             "data must be a contiguous 1-D uint8 tensor, got shape ", shape_str(data), " of ", data.scalar_type());
  WSSS_CHECK(out.dim() >= 1 && out.is_contiguous(), op, "out must be a contiguous tensor [M, ...], got shape ",
             shape_str(out));
  const int64_t m = out.size(0);
  WSSS_CHECK(static_cast<int64_t>(starts.size()) == m && static_cast<int64_t>(ends.size()) == m, op,
             "starts and ends must hold one offset per tile of out (", m, "), got ",
             static_cast<int64_t>(starts.size()), " and ", static_cast<int64_t>(ends.size()));
  const int64_t b = data.numel();
  for (int64_t j = 0; j < m; ++j) {
    WSSS_CHECK(0 <= starts[j] && starts[j] <= ends[j] && ends[j] <= b, op, "stream ", j, " [", starts[j], ", ",
               ends[j], ") is not within data [0, ", b, ")");
  }
  const unsigned long tile_bytes = m ? static_cast<unsigned long>(out.nbytes() / m) : 0;
  const auto* src = static_cast<const unsigned char*>(data.const_data_ptr());
  auto* dst = static_cast<unsigned char*>(out.data_ptr());
  for (int64_t j = 0; j < m; ++j) {
    unsigned long len = tile_bytes;
    const int rc = mz_uncompress(dst + j * tile_bytes, &len, src + starts[j], ends[j] - starts[j]);
    WSSS_CHECK(rc == MZ_OK && len == tile_bytes, op, "stream ", j, " is not a zlib stream of ", tile_bytes,
               " bytes (miniz error ", rc, ", ", len, " bytes inflated)");
  }
}

}  // namespace
}  // namespace wsss

// NB: CPU only: the tiles are host memory by the time they are stored.  Meta: the fake kernels
// in wsss/ops.py.
TORCH_LIBRARY_IMPL(wsss, CPU, m) {
  m.impl("deflate_tiles", &wsss::deflate_tiles);
  m.impl("inflate_tiles", &wsss::inflate_tiles);
}

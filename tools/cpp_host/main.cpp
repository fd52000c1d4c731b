// wsss_host: run a wsss model bundle (TorchScript .pt) or AOTInductor package (.pt2) from C++.
//
// Loads the wsss op library with dlopen BEFORE the model (the model calls torch.ops.wsss.*,
// whose registrations run from the library's static initialisers), reads raw RGB tiles
// (H x W x 3 uint8, interleaved, N tiles back to back), runs them and writes raw outputs:
//   labels  uint8   [N,H,W]
//   probs   float32 [N,K]     (class probabilities of the classification gate)
//   scores  float32 [N,K,H,W] (gated class probabilities, only with --scores)
//
//   wsss_host --ops /path/to/wsss/_ops.so --bundle model.pt --tile tiles.rgb --height 224 --width 224 \
//             --labels labels.u8 --probs probs.f32 [--scores scores.f32] [--threads 2]
//   wsss_host --ops ... --pt2 model.pt2 ...      (same outputs from an AOTInductor package)
//   wsss_host --ops ... --bundle model.pt --print-metadata
//
// --ops is the op library Python loads: python -c "import wsss; print(wsss._library.library_path())"
// (wsss/_ops*.so); a bare file name means the file in the current folder.  A TorchScript bundle takes
// any tile size and runs all N tiles in one batch.  A .pt2 package takes only the H x W it was compiled
// for ("wsss_tile_hw" in its metadata) and batches of 2 to "wsss_max_batch" tiles: the host runs any N in
// batches of at most that many, a last single tile padded to two (outputs are per tile, so the extra
// copy changes nothing and is dropped).  Errors: one line "wsss_host: error: ..." on stderr, exit 2
// (exit 1 for an unexpected internal error; no input aborts the process).
#include <dlfcn.h>
#include <sys/stat.h>

#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr const char* kMetadataFile = "wsss_bundle.json";
constexpr int64_t kMaxThreads = 1024;
// batches a .pt2 package without "wsss_max_batch" metadata (exported by an older wsss) is run in:
// every package export_pt2 writes takes 2 tiles (its batch range is 2..max_batch, max_batch >= 2)
constexpr int64_t kLegacyPackageBatch = 2;

// A refusal with its one-line message; main() prints it and exits 2.  NB: deliberately not a
// std::exception, so that the handlers around model loading and running do not re-wrap it.
struct HostError {
  std::string message;
};

struct Args {
  std::map<std::string, std::string> values;
  bool print_metadata = false;

  std::string get(const std::string& key, const std::string& fallback = "") const {
    auto it = values.find(key);
    return it == values.end() ? fallback : it->second;
  }
  bool has(const std::string& key) const { return values.count(key) != 0; }
};

[[noreturn]] void fail(const std::string& message) { throw HostError{message}; }

// The first line of an exception's message (c10 and AOTInductor messages can run to many lines).
std::string first_line(const std::string& text) {
  const size_t end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

Args parse_args(int argc, char** argv) {
  static const std::vector<std::string> known = {"--ops", "--bundle", "--pt2", "--tile", "--height", "--width",
                                                 "--labels", "--probs", "--scores", "--threads"};
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (key == "--print-metadata") {
      args.print_metadata = true;
      continue;
    }
    if (key == "-h" || key == "--help") {
      std::cout << "usage: wsss_host --ops OPS_LIB (--bundle FILE.pt | --pt2 FILE.pt2) [--print-metadata]\n"
                   "                 --tile RAW_RGB --height H --width W --labels OUT.u8 --probs OUT.f32\n"
                   "                 [--scores OUT.f32] [--threads N]\n"
                   "  --ops       the wsss op library: python -c \"import wsss; print(wsss._library.library_path())\"\n"
                   "  --tile      N tiles of H x W x 3 uint8 RGB (interleaved), back to back\n"
                   "  --labels    writes uint8 [N,H,W]; --probs float32 [N,K]; --scores float32 [N,K,H,W]\n"
                   "  --pt2       runs any N in batches of at most the package's wsss_max_batch tiles\n"
                   "  --print-metadata  prints the bundle's wsss_bundle.json (and runs tiles if --tile is given)\n"
                   "  --threads   1.." << kMaxThreads << " (default: torch's)\n";
      std::exit(0);
    }
    bool ok = false;
    for (const auto& k : known) ok = ok || (k == key);
    if (!ok) fail("unknown argument " + key + " (see --help)");
    if (i + 1 >= argc) fail(key + " needs a value");
    args.values[key] = argv[++i];
  }
  return args;
}

int64_t parse_positive(const Args& args, const std::string& key) {
  std::string text = args.get(key);
  try {
    size_t used = 0;
    long long v = std::stoll(text, &used);
    if (used != text.size() || v <= 0) throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    fail(key + " must be a positive integer, got '" + text + "'");
  }
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::vector<uint8_t> read_file(const std::string& path) {
  if (is_directory(path)) fail("cannot read " + path + " (is a directory)");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open " + path + " (" + std::strerror(errno) + ")");
  try {
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) fail("cannot read " + path + " (read error)");
    return data;
  } catch (const std::exception& e) {  // (libstdc++ reports some read errors by throwing)
    fail("cannot read " + path + " (" + first_line(e.what()) + ")");
  }
}

// Written to a temporary name and renamed into place: an output is whole or absent.
void write_file(const std::string& path, const at::Tensor& tensor) {
  at::Tensor t = tensor.contiguous().cpu();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) fail("cannot write " + path);
    out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      fail("short write to " + path);
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    fail("cannot write " + path + " (rename failed)");
  }
}

// The op library must be loaded once, before the model, and kept loaded (RTLD_GLOBAL so that
// code compiled by AOTInductor can also resolve against it).
// NB: dlopen searches the library path for a name without '/': "--ops _ops.so" would not find the
// file in the current folder, so such a name is opened as "./_ops.so" (--ops names a file).
void load_op_library(const std::string& given) {
  const std::string path = given.find('/') == std::string::npos ? "./" + given : given;
  if (is_directory(path)) fail("cannot load the wsss op library " + given + ": it is a directory");
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    fail("cannot load the wsss op library " + given + ": " + (why ? why : "unknown dlopen error"));
  }
}

// An AOTInductor package's compiled model links libtorch.so, which this host does not (it links
// libtorch_cpu and libc10).  The host's rpath only serves its own direct dependencies, so the
// dlopen inside AOTIModelPackageLoader would not find libtorch.so: load it first, from the
// folder the running libtorch_cpu.so came from (so it is the same wheel's), RTLD_GLOBAL.
void load_libtorch_for_aoti() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&at::set_num_threads), &info) == 0 || info.dli_fname == nullptr)
    fail("cannot locate libtorch_cpu.so (dladdr failed), needed to find libtorch.so for the .pt2 package");
  std::string dir(info.dli_fname);
  dir = dir.substr(0, dir.find_last_of('/'));
  const std::string lib = dir + "/libtorch.so";
  if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    fail("cannot load " + lib + " (an AOTInductor package needs it): " + (why ? why : "unknown dlopen error"));
  }
}

// Checks the bundle format marker written by wsss.bundle.save_bundle (in a .pt's zip entry, or
// in a .pt2's AOTInductor metadata, as export_pt2 stores it).
void check_metadata(const std::string& path, const std::string& json) {
  if (json.empty()) fail("bundle " + path + ": no " + kMetadataFile + " in the archive (not a wsss bundle)");
  if (!std::regex_search(json, std::regex("\"format\":\\s*\"wsss-bundle\"")))
    fail("bundle " + path + ": " + kMetadataFile + " does not say format \"wsss-bundle\"");
  if (!std::regex_search(json, std::regex("\"format_version\":\\s*1\\s*[,}]")))
    fail("bundle " + path + ": unsupported format_version (this host reads version 1)");
}

// The H x W a .pt2 package is compiled for, from its "wsss_tile_hw" metadata ("HxW"; written by
// wsss.cli.export.export_pt2); {-1, -1} when it has none.
// NB: not the bundle JSON's tile_size by pattern: that matched the first "tile_size" in the text,
// and the JSON's sorted keys put "config" (the training settings) before it.
std::pair<int64_t, int64_t> package_tile_hw(const std::unordered_map<std::string, std::string>& meta) {
  auto it = meta.find("wsss_tile_hw");
  std::smatch m;
  if (it == meta.end() || !std::regex_match(it->second, m, std::regex("([0-9]{1,9})x([0-9]{1,9})"))) return {-1, -1};
  return {std::stoll(m[1].str()), std::stoll(m[2].str())};
}

// The largest batch a .pt2 package takes, from its "wsss_max_batch" metadata (export_pt2's
// max_batch); -1 when it has none (packages exported before wsss wrote it).
int64_t package_max_batch(const std::string& path, const std::unordered_map<std::string, std::string>& meta) {
  auto it = meta.find("wsss_max_batch");
  if (it == meta.end()) return -1;
  if (!std::regex_match(it->second, std::regex("[0-9]{1,9}")) || std::stoll(it->second) < 2)
    fail("--pt2 " + path + ": its metadata wsss_max_batch is '" + it->second + "', expected an integer >= 2");
  return std::stoll(it->second);
}

// Runs N tiles through a .pt2 package in batches of at most max_batch; the package takes no batch
// of one (torch.export specialises sizes 0 and 1, so its batch dimension starts at 2), so a single
// tile is run as two copies of itself and the first result kept.  Outputs: labels, scores, probs.
std::vector<at::Tensor> run_package(torch::inductor::AOTIModelPackageLoader& package, const at::Tensor& tiles,
                                    int64_t max_batch) {
  const int64_t n = tiles.size(0);
  std::vector<std::vector<at::Tensor>> parts(3);
  for (int64_t start = 0; start < n; start += max_batch) {
    const int64_t count = std::min(max_batch, n - start);
    at::Tensor batch = tiles.narrow(0, start, count);
    if (count == 1) batch = batch.expand({2, -1, -1, -1}).contiguous();
    std::vector<at::Tensor> out = package.run({batch});
    if (out.size() != 3) fail("the .pt2 package returned " + std::to_string(out.size()) + " outputs, expected 3");
    for (size_t i = 0; i < 3; ++i) {
      if (out[i].dim() == 0 || out[i].size(0) != batch.size(0))
        fail("the .pt2 package returned output " + std::to_string(i) + " of shape " + c10::str(out[i].sizes()) +
             " for a batch of " + std::to_string(batch.size(0)));
      parts[i].push_back(out[i].narrow(0, 0, count));
    }
  }
  std::vector<at::Tensor> out;
  for (auto& p : parts) out.push_back(p.size() == 1 ? p[0] : at::cat(p, 0));
  return out;
}

int run(int argc, char** argv) {
  Args args = parse_args(argc, argv);
  if (!args.has("--ops")) fail("--ops (path of the wsss op library, wsss._library.library_path()) is required");
  if (args.has("--bundle") == args.has("--pt2")) fail("give exactly one of --bundle and --pt2");
  const bool run_tiles = !args.print_metadata || args.has("--tile");
  if (run_tiles)
    for (const char* key : {"--tile", "--height", "--width", "--labels", "--probs"})
      if (!args.has(key)) fail(std::string(key) + " is required");

  // Arguments first, before the (slow) model load.
  if (args.has("--threads")) {
    const int64_t threads = parse_positive(args, "--threads");
    if (threads > kMaxThreads)
      fail("--threads must be at most " + std::to_string(kMaxThreads) + ", got " + args.get("--threads"));
    at::set_num_threads(static_cast<int>(threads));
  }
  int64_t height = 0, width = 0, tile_bytes = 0;
  if (run_tiles) {
    height = parse_positive(args, "--height");
    width = parse_positive(args, "--width");
    // NB: H * W * 3 can overflow int64 (it wrapped to 0, then divided by it): refuse, not wrap
    if (__builtin_mul_overflow(height, width, &tile_bytes) || __builtin_mul_overflow(tile_bytes, int64_t{3}, &tile_bytes))
      fail("--height " + args.get("--height") + " --width " + args.get("--width") +
           ": a tile of that size has more bytes than this host can count");
  }
  const std::string model_flag = args.has("--bundle") ? "--bundle" : "--pt2";
  const std::string model_path = args.get(model_flag);
  // (torch::jit::load calls a folder a corrupted checkpoint; AOTInductor takes a folder for an
  // unzipped package, so --pt2 may name one)
  if (model_flag == "--bundle" && is_directory(model_path))
    fail("cannot load the model: --bundle " + model_path + " is a directory (expected a .pt file)");

  load_op_library(args.get("--ops"));
  c10::InferenceMode inference_guard;

  torch::jit::Module bundle;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
  std::string metadata;
  std::pair<int64_t, int64_t> package_hw{-1, -1};
  int64_t max_batch = -1;
  try {
    if (args.has("--bundle")) {
      std::unordered_map<std::string, std::string> extra{{kMetadataFile, ""}};
      bundle = torch::jit::load(model_path, torch::kCPU, extra);
      bundle.eval();
      metadata = extra[kMetadataFile];
      check_metadata(model_path, metadata);
    } else {
      load_libtorch_for_aoti();
      // NB: a package is compiled for one H x W and a batch range; without this AOTInductor does not
      // check its inputs, and other tile sizes read past the end of the input (sizes and batches
      // are also kept within the metadata below, with messages that say so)
      setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", 0);
      package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(model_path);
      auto meta = package->get_metadata();
      package_hw = package_tile_hw(meta);
      max_batch = package_max_batch(model_path, meta);
      metadata = meta.count(kMetadataFile) ? meta[kMetadataFile] : "";
      check_metadata(model_path, metadata);
    }
  } catch (const c10::Error& e) {
    fail(std::string("cannot load the model: ") + first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {  // (AOTInductor reports with std::runtime_error)
    fail(std::string("cannot load the model: ") + first_line(e.what()));
  }
  if (args.print_metadata) {
    std::cout << metadata << std::endl;
    if (!run_tiles) return 0;
  }

  const std::string tile_path = args.get("--tile");
  std::vector<uint8_t> raw = read_file(tile_path);
  if (raw.empty()) fail("--tile " + tile_path + " is empty");
  if (static_cast<uint64_t>(raw.size()) % static_cast<uint64_t>(tile_bytes) != 0)
    fail("--tile " + tile_path + ": " + std::to_string(raw.size()) + " bytes is not a whole number of " +
         std::to_string(height) + "x" + std::to_string(width) + " RGB tiles (" + std::to_string(tile_bytes) +
         " bytes each)");
  const int64_t n = static_cast<int64_t>(raw.size() / static_cast<uint64_t>(tile_bytes));
  if (package) {
    const auto [size_h, size_w] = package_hw;
    if (size_h > 0 && (height != size_h || width != size_w))
      fail("--pt2 " + model_path + " is compiled for " + std::to_string(size_h) + "x" + std::to_string(size_w) +
           " tiles, got --height " + std::to_string(height) + " --width " + std::to_string(width) +
           " (a TorchScript bundle takes any tile size)");
    if (max_batch < 0) {
      max_batch = kLegacyPackageBatch;
      if (n > max_batch)
        std::cerr << "wsss_host: note: --pt2 " << model_path << " has no wsss_max_batch metadata (exported by an "
                  << "older wsss): running it in batches of " << max_batch << std::endl;
    }
  }

  // [N,H,W,3] interleaved -> [N,3,H,W] uint8, as Python's torch.from_numpy(hwc).permute(0,3,1,2)
  at::Tensor tiles = torch::from_blob(raw.data(), {n, height, width, 3}, torch::kUInt8).permute({0, 3, 1, 2}).contiguous();
  const bool with_scores = args.has("--scores");

  at::Tensor labels, scores, probs;
  try {
    if (package) {
      std::vector<at::Tensor> out = run_package(*package, tiles, max_batch);
      labels = out[0];
      scores = out[1];
      probs = out[2];
    } else {
      auto out = bundle.forward({tiles, with_scores}).toTuple();
      labels = out->elements()[0].toTensor();
      scores = out->elements()[1].toTensor();
      probs = out->elements()[2].toTensor();
    }
  } catch (const c10::Error& e) {
    fail(std::string("running the model failed: ") + first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    fail(std::string("running the model failed: ") + first_line(e.what()));
  }

  write_file(args.get("--labels"), labels.to(torch::kUInt8));
  write_file(args.get("--probs"), probs.to(torch::kFloat32));
  if (with_scores) write_file(args.get("--scores"), scores.to(torch::kFloat32));
  std::cout << "wsss_host: " << n << " tile(s) " << height << "x" << width << ", " << probs.size(1)
            << " classes, labels -> " << args.get("--labels") << ", probs -> " << args.get("--probs") << std::endl;
  return 0;
}

}  // namespace

// Nothing escapes: a refusal is one line and exit 2, any other error one line and exit 1 (no input
// may abort the process with an uncaught exception).
int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const HostError& e) {
    std::cerr << "wsss_host: error: " << e.message << std::endl;
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "wsss_host: error: " << first_line(e.what_without_backtrace()) << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "wsss_host: error: " << first_line(e.what()) << std::endl;
    return 1;
  } catch (...) {
    std::cerr << "wsss_host: error: unknown exception" << std::endl;
    return 1;
  }
}

// wsss_host: run a wsss model bundle (TorchScript .pt) or AOTInductor package (.pt2) from C++.
//
// Loads the wsss op library with dlopen BEFORE the model (the model calls torch.ops.wsss.*,
// whose registrations run from the library's static initialisers), reads raw RGB tiles
// (H x W x 3 uint8, interleaved, N tiles back to back), runs them and writes raw outputs:
//   labels  uint8   [N,H,W]
//   probs   float32 [N,K]     (class probabilities of the classification gate)
//   scores  float32 [N,K,H,W] (gated class probabilities, only with --scores)
//
//   wsss_host --ops libwsss_ops.so --bundle model.pt --tile tile.rgb --height 224 --width 224 \
//             --labels labels.u8 --probs probs.f32 [--scores scores.f32] [--threads 2]
//   wsss_host --ops ... --pt2 model.pt2 ...      (same outputs from an AOTInductor package)
//   wsss_host --ops ... --bundle model.pt --print-metadata
#include <dlfcn.h>

#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
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

struct Args {
  std::map<std::string, std::string> values;
  bool print_metadata = false;

  std::string get(const std::string& key, const std::string& fallback = "") const {
    auto it = values.find(key);
    return it == values.end() ? fallback : it->second;
  }
  bool has(const std::string& key) const { return values.count(key) != 0; }
};

[[noreturn]] void fail(const std::string& message) {
  std::cerr << "wsss_host: error: " << message << std::endl;
  std::exit(2);
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
      std::cout << "usage: wsss_host --ops LIB (--bundle FILE.pt | --pt2 FILE.pt2) [--print-metadata]\n"
                   "                 --tile RAW_RGB --height H --width W --labels OUT.u8 --probs OUT.f32\n"
                   "                 [--scores OUT.f32] [--threads N]\n";
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

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open " + path);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
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
void load_op_library(const std::string& path) {
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    fail("cannot load the wsss op library " + path + ": " + (why ? why : "unknown dlopen error"));
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
  if (it == meta.end() || !std::regex_match(it->second, m, std::regex("([0-9]+)x([0-9]+)"))) return {-1, -1};
  return {std::stoll(m[1].str()), std::stoll(m[2].str())};
}

}  // namespace

int main(int argc, char** argv) {
  Args args = parse_args(argc, argv);
  if (!args.has("--ops")) fail("--ops (path of the wsss op library, wsss._library.library_path()) is required");
  if (args.has("--bundle") == args.has("--pt2")) fail("give exactly one of --bundle and --pt2");
  if (args.has("--threads")) at::set_num_threads(static_cast<int>(parse_positive(args, "--threads")));

  load_op_library(args.get("--ops"));
  c10::InferenceMode inference_guard;

  torch::jit::Module bundle;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
  std::string metadata;
  std::pair<int64_t, int64_t> package_hw{-1, -1};
  try {
    if (args.has("--bundle")) {
      std::unordered_map<std::string, std::string> extra{{kMetadataFile, ""}};
      bundle = torch::jit::load(args.get("--bundle"), torch::kCPU, extra);
      bundle.eval();
      metadata = extra[kMetadataFile];
      check_metadata(args.get("--bundle"), metadata);
    } else {
      load_libtorch_for_aoti();
      // NB: a package is compiled for one H x W; without this AOTInductor does not check its
      // inputs, and other tile sizes read past the end of the input (the size is also checked
      // against the metadata below, with a message that says so)
      setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", 0);
      package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(args.get("--pt2"));
      auto meta = package->get_metadata();
      package_hw = package_tile_hw(meta);
      metadata = meta.count(kMetadataFile) ? meta[kMetadataFile] : "";
      check_metadata(args.get("--pt2"), metadata);
    }
  } catch (const c10::Error& e) {
    fail(std::string("cannot load the model: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {  // (AOTInductor reports with std::runtime_error)
    fail(std::string("cannot load the model: ") + e.what());
  }
  if (args.print_metadata) {
    std::cout << metadata << std::endl;
    if (!args.has("--tile")) return 0;
  }

  for (const char* key : {"--tile", "--height", "--width", "--labels", "--probs"})
    if (!args.has(key)) fail(std::string(key) + " is required");
  const int64_t height = parse_positive(args, "--height");
  const int64_t width = parse_positive(args, "--width");
  std::vector<uint8_t> raw = read_file(args.get("--tile"));
  const int64_t tile_bytes = height * width * 3;
  if (raw.empty() || static_cast<int64_t>(raw.size()) % tile_bytes != 0)
    fail("--tile " + args.get("--tile") + ": " + std::to_string(raw.size()) + " bytes is not a whole number of " +
         std::to_string(height) + "x" + std::to_string(width) + " RGB tiles (" + std::to_string(tile_bytes) +
         " bytes each)");
  const int64_t n = static_cast<int64_t>(raw.size()) / tile_bytes;
  if (package) {
    const auto [size_h, size_w] = package_hw;
    if (size_h > 0 && (height != size_h || width != size_w))
      fail("--pt2 " + args.get("--pt2") + " is compiled for " + std::to_string(size_h) + "x" + std::to_string(size_w) +
           " tiles, got --height " + std::to_string(height) + " --width " + std::to_string(width) +
           " (a TorchScript bundle takes any tile size)");
  }

  // [N,H,W,3] interleaved -> [N,3,H,W] uint8, as Python's torch.from_numpy(hwc).permute(0,3,1,2)
  at::Tensor tiles = torch::from_blob(raw.data(), {n, height, width, 3}, torch::kUInt8).permute({0, 3, 1, 2}).contiguous();
  const bool with_scores = args.has("--scores");

  at::Tensor labels, scores, probs;
  try {
    if (package) {
      std::vector<at::Tensor> out = package->run({tiles});
      if (out.size() != 3) fail("the .pt2 package returned " + std::to_string(out.size()) + " outputs, expected 3");
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
    fail(std::string("running the model failed: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    fail(std::string("running the model failed: ") + e.what());
  }

  write_file(args.get("--labels"), labels.to(torch::kUInt8));
  write_file(args.get("--probs"), probs.to(torch::kFloat32));
  if (with_scores) write_file(args.get("--scores"), scores.to(torch::kFloat32));
  std::cout << "wsss_host: " << n << " tile(s) " << height << "x" << width << ", " << probs.size(1)
            << " classes, labels -> " << args.get("--labels") << ", probs -> " << args.get("--probs") << std::endl;
  return 0;
}

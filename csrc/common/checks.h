// Argument checks shared by every backend of every op, so CPU and CUDA say the same words
// (wsss/ops.py's fake kernels repeat them; tests pin them).  Host-only.
//
// NB: messages are built here by plain string concatenation (WSSS_CHECK), never with
// iostreams: TORCH_CHECK(cond, a, b, ...) formats through a std::ostringstream instantiated in
// *this* library, and on a GPU machine (Ubuntu 24.04 toolchain, torch 2.11) that stream's number
// formatting segfaulted on the first error message (the backtrace ended in libstdc++ stream and
// locale code placed inside _ops.so).  One std::string argument makes TORCH_CHECK pass it
// through without a stream.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace wsss {
namespace detail {

inline void append(std::string& out, std::string_view s) { out.append(s); }
inline void append(std::string& out, const char* s) { out.append(s); }
inline void append(std::string& out, const std::string& s) { out.append(s); }
inline void append(std::string& out, at::ScalarType t) { out.append(c10::toString(t)); }
inline void append(std::string& out, const c10::Device& d) { out.append(d.str()); }
inline void append(std::string& out, double v) {
  char buf[32];  // shortest round-trip form, as Python's repr (wsss/ops.py's messages) prints it
  auto r = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, r.ptr);
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& out, T v) {
  out.append(std::to_string(v));
}

}  // namespace detail

// The message pieces concatenated: strings, integers, doubles, dtypes, devices.
template <typename... Args>
inline std::string cat(const Args&... args) {
  std::string out;
  (detail::append(out, args), ...);
  return out;
}

// TORCH_CHECK with a message built by cat() (evaluated only when the check fails).
#define WSSS_CHECK(cond, ...) TORCH_CHECK(cond, ::wsss::cat(__VA_ARGS__))

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// features [N,C,H,W], weight [K,C], mu in [0,1]
inline void check_pda_args(const char* op, const at::Tensor& features, const at::Tensor& weight, double mu) {
  WSSS_CHECK(features.dim() == 4, "wsss::", op, ": features must be a 4-D tensor [N, C, H, W], got shape ",
              shape_str(features));
  WSSS_CHECK(is_supported_float(features.scalar_type()), "wsss::", op,
              ": features must be a floating tensor (Float, Double, BFloat16, Half), got ",
              features.scalar_type());
  WSSS_CHECK(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) == features.size(1), "wsss::", op,
              ": weight must have shape [K, C] with K >= 1 and C = features.size(1) = ", features.size(1), ", got shape ",
              shape_str(weight));
  WSSS_CHECK(weight.scalar_type() == features.scalar_type(), "wsss::", op,
              ": weight must have the dtype of features (", features.scalar_type(), "), got ", weight.scalar_type());
  WSSS_CHECK(weight.device() == features.device(), "wsss::", op, ": weight must be on the device of features (",
              features.device(), "), got ", weight.device());
  WSSS_CHECK(mu >= 0.0 && mu <= 1.0, "wsss::", op, ": mu must be in [0, 1], got ", mu);
}

inline void check_pda_attention_grad(const at::Tensor& grad, const at::Tensor& features) {
  WSSS_CHECK(grad.dim() == 4 && grad.size(0) == features.size(0) && grad.size(1) == 1 &&
                  grad.size(2) == features.size(2) && grad.size(3) == features.size(3),
              "wsss::pda_attention_backward: grad_attention must have shape [", features.size(0), ", 1, ",
              features.size(2), ", ", features.size(3), "], got shape ", shape_str(grad));
  WSSS_CHECK(grad.device() == features.device(), "wsss::pda_attention_backward: grad_attention must be on the "
             "device of features (", features.device(), "), got ", grad.device());
}

inline void check_pda_pool_grad(const at::Tensor& grad, const at::Tensor& features) {
  WSSS_CHECK(grad.dim() == 2 && grad.size(0) == features.size(0) && grad.size(1) == features.size(1),
              "wsss::pda_pool_backward: grad_pooled must have shape [", features.size(0), ", ", features.size(1),
              "], got shape ", shape_str(grad));
  WSSS_CHECK(grad.device() == features.device(), "wsss::pda_pool_backward: grad_pooled must be on the device of "
             "features (", features.device(), "), got ", grad.device());
}

// The tissue-mask and background-index checks gate_argmax and band_finalize share (``prefix``:
// "wsss::name: "; ``dims`` names the expected shape's axes, ``like`` the tensor whose device the
// mask must share).
inline void check_mask_and_background(const char* prefix, const std::optional<at::Tensor>& tissue_mask,
                                      const char* dims, at::IntArrayRef shape, const at::Tensor& like,
                                      const char* like_name, int64_t background_index) {
  if (tissue_mask.has_value()) {
    const at::Tensor& m = *tissue_mask;
    std::string expected;
    for (size_t i = 0; i < shape.size(); ++i) expected += (i ? ", " : "") + std::to_string(shape[i]);
    WSSS_CHECK(m.sizes() == shape, prefix, "tissue_mask must have shape [", dims, "] = [", expected,
               "], got shape ", shape_str(m));
    WSSS_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte, prefix,
               "tissue_mask must be Bool or Byte, got ", m.scalar_type());
    WSSS_CHECK(m.device() == like.device(), prefix, "tissue_mask must be on the device of ", like_name, " (",
               like.device(), "), got ", m.device());
  }
  WSSS_CHECK(background_index >= 0 && background_index <= 255, prefix,
             "background_index must be in [0, 255], got ", background_index);
}

// scores [N,K,H,W], class_prob [N,K], tissue_mask [N,H,W]?
inline void check_gate_args(const at::Tensor& scores, const at::Tensor& class_prob,
                            const std::optional<at::Tensor>& tissue_mask, int64_t background_index) {
  constexpr const char* op = "wsss::gate_argmax";
  WSSS_CHECK(scores.dim() == 4, op, ": scores must be a 4-D tensor [N, K, H, W], got shape ", shape_str(scores));
  WSSS_CHECK(is_supported_float(scores.scalar_type()), op,
              ": scores must be a floating tensor (Float, Double, BFloat16, Half), got ", scores.scalar_type());
  const int64_t n = scores.size(0), k = scores.size(1), h = scores.size(2), w = scores.size(3);
  WSSS_CHECK(k >= 1 && k <= 255, op, ": scores must have 1 to 255 classes (dim 1), got ", k);
  WSSS_CHECK(class_prob.dim() == 2 && class_prob.size(0) == n && class_prob.size(1) == k, op,
              ": class_prob must have shape [N, K] = [", n, ", ", k, "], got shape ", shape_str(class_prob));
  WSSS_CHECK(is_supported_float(class_prob.scalar_type()), op,
              ": class_prob must be a floating tensor (Float, Double, BFloat16, Half), got ",
              class_prob.scalar_type());
  WSSS_CHECK(class_prob.device() == scores.device(), op, ": class_prob must be on the device of scores (",
              scores.device(), "), got ", class_prob.device());
  check_mask_and_background("wsss::gate_argmax: ", tissue_mask, "N, H, W", {n, h, w}, scores, "scores",
                            background_index);
}

// features [N,C,h,w], grads [N,K,C,h,w]
inline void check_gradcam_args(const at::Tensor& features, const at::Tensor& grads) {
  constexpr const char* op = "wsss::gradcam";
  WSSS_CHECK(features.dim() == 4, op, ": features must be a 4-D tensor [N, C, h, w], got shape ",
              shape_str(features));
  WSSS_CHECK(is_supported_float(features.scalar_type()), op,
              ": features must be a floating tensor (Float, Double, BFloat16, Half), got ", features.scalar_type());
  const int64_t n = features.size(0), c = features.size(1), h = features.size(2), w = features.size(3);
  WSSS_CHECK(grads.dim() == 5 && grads.size(0) == n && grads.size(2) == c && grads.size(3) == h &&
                  grads.size(4) == w,
              op, ": grads must have shape [N, K, C, h, w] = [", n, ", K, ", c, ", ", h, ", ", w, "], got shape ",
              shape_str(grads));
  WSSS_CHECK(grads.scalar_type() == features.scalar_type(), op, ": grads must have the dtype of features (",
              features.scalar_type(), "), got ", grads.scalar_type());
  WSSS_CHECK(grads.device() == features.device(), op, ": grads must be on the device of features (",
              features.device(), "), got ", grads.device());
}

}  // namespace wsss

// Per-element math of Progressive Dropout Attention and of the classification gate, shared
// by the CPU and CUDA kernels (so CPU tests exercise the arithmetic the GPU runs).
// z: a class activation value sum_c w_kc F_c; beta: that class's threshold mu * max ReLU(z).
#pragma once

#if defined(__CUDACC__)
#define WSSS_HD __host__ __device__ __forceinline__
#else
#define WSSS_HD inline
#endif

namespace wsss {

// Mhat = ReLU(z) where ReLU(z) <= beta, else 0 (peaks dropped, other values kept).
template <typename T>
WSSS_HD T pda_kept(T z, T beta) {
  const T m = z > T(0) ? z : T(0);
  return m <= beta ? m : T(0);
}

// d Mhat / d z: 1 where 0 < z <= beta (the threshold mask is piecewise constant, so no
// gradient flows through beta), else 0.
template <typename T>
WSSS_HD T pda_kept_grad(T z, T beta) {
  return (z > T(0) && z <= beta) ? T(1) : T(0);
}

// beta_k from the per-class maximum of the CAM (max of raw z; ReLU(max z) = max ReLU(z)).
template <typename T>
WSSS_HD T pda_threshold(T max_z, T mu) {
  return mu * (max_z > T(0) ? max_z : T(0));
}

// A class passes the classification gate iff its probability is strictly above eps.
template <typename T>
WSSS_HD bool gate_passes(T class_prob, T eps) {
  return class_prob > eps;
}

}  // namespace wsss

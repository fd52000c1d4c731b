// The one schema block of the wsss op library: every op's signature, written out.
// Kernels live per dispatch key: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA); ops made of
// ATen calls, one implementation registered for CPU and CUDA, in csrc/composite/*.cpp.
// Fake (meta) kernels and autograd are registered from Python in wsss/ops.py.
// The library is a plain shared object (no Python): C++ hosts dlopen it as well.
#include <torch/library.h>

TORCH_LIBRARY(wsss, m) {
  // features [N,C,H,W], weight [K,C], mu -> attention A [N,1,H,W]
  m.def("pda_attention(Tensor features, Tensor weight, float mu) -> Tensor");
  // grad_attention [N,1,H,W] -> (grad_features [N,C,H,W], grad_weight [K,C])
  m.def(
      "pda_attention_backward(Tensor grad_attention, Tensor features, Tensor weight, "
      "float mu) -> (Tensor, Tensor)");
  // features [N,C,H,W], weight [K,C], mu -> mean_hw(A * features) [N,C]
  m.def("pda_pool(Tensor features, Tensor weight, float mu) -> Tensor");
  // grad_pooled [N,C] -> (grad_features [N,C,H,W], grad_weight [K,C])
  m.def(
      "pda_pool_backward(Tensor grad_pooled, Tensor features, Tensor weight, float mu) "
      "-> (Tensor, Tensor)");
  // scores [N,K,H,W], class_prob [N,K], eps, tissue_mask [N,H,W]? -> labels uint8 [N,H,W]
  m.def(
      "gate_argmax(Tensor scores, Tensor class_prob, float eps, Tensor? tissue_mask=None, "
      "int background_index=255) -> Tensor");
  // features [N,C,h,w], grads [N,K,C,h,w] -> sum_c mean_hw(grads) * features [N,K,h,w]
  m.def("gradcam(Tensor features, Tensor grads) -> Tensor");
  // acc [C,R,W] (in place), tiles [N,C,T,T], xs: N columns, rows ->
  //   acc[:, :rows, x_i : x_i + T] += tiles[i, :, :rows] in tile order (clipped at W);
  //   with window [T,T]: tiles [N,K,T,T], acc [K+1,R,W], adding (tiles * window, window)
  m.def("band_accumulate(Tensor(a!) acc, Tensor tiles, int[] xs, int rows, Tensor? window=None) -> ()");
  // acc [K+1,R,W] (in place: moved up by shift rows), rows, shift, tissue_mask [rows,W]?,
  //   background_index, values [V] uint8, counts [V] int64 (in place), with_probs ->
  //   (labels uint8 [rows,W], probs float16 [K,rows,W] or [0]): the band's final rows to labels
  m.def(
      "band_finalize(Tensor(a!) acc, int rows, int shift, Tensor? tissue_mask, int background_index, "
      "Tensor values, Tensor(b!) counts, bool with_probs) -> (Tensor, Tensor)");
  // tiles [N, ...] (CPU, contiguous), index [M], level -> (data uint8 [B], ends int64 [M]):
  //   stream j = data[ends[j-1]:ends[j]], the zlib stream of tiles[index[j]]'s bytes
  m.def("deflate_tiles(Tensor tiles, int[] index, int level=1) -> (Tensor, Tensor)");
  // data uint8 [B], starts [M], ends [M], out [M, ...] (in place): out[j] = inflate(data[starts[j]:ends[j]])
  m.def("inflate_tiles(Tensor data, int[] starts, int[] ends, Tensor(a!) out) -> ()");
  // labels uint8 [2h,2w] -> [h,w]: the majority of each 2x2 block (ties: the top-left value's class)
  m.def("majority_downsample(Tensor labels) -> Tensor");
}

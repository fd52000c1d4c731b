"""The wsss custom ops: scriptable wrappers, fake kernels and autograd.

Kernels are compiled C++/CUDA (csrc/) registered under ``torch.ops.wsss``; this module
adds what the dispatcher needs from Python: fake (meta) kernels, so torch.compile,
torch.export and opcheck can trace the ops, and autograd formulas that call the fused
backward kernels.  The wrappers are plain functions over ``torch.ops.wsss.<op>``, so they
can be called from TorchScript-scripted modules.

Fake kernels repeat the C++ argument checks word for word (tests pin both).

Shapes: N batch, C channels, K classes, H x W spatial.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from wsss import _library
from wsss.reference import gate_allowed

_library.load()

__all__ = ["pda_attention", "pda_pool", "gate_argmax", "gradcam", "gated_scores", "band_accumulate", "band_finalize", "deflate_tiles",
           "inflate_tiles", "majority_downsample"]

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------
# Scriptable wrappers
# --------------------------------------------------------------------------------------
def pda_attention(features: Tensor, weight: Tensor, mu: float) -> Tensor:
    """Progressive Dropout Attention map.  features [N,C,H,W], weight [K,C] -> A [N,1,H,W].

    A = mean_k (ReLU(CAM_k) where ReLU(CAM_k) <= mu * max_hw ReLU(CAM_k), else 0).
    Differentiable in features and weight (A is not detached), also twice (create_graph=True).
    NaN propagates: a sample whose CAMs have a NaN gets a NaN map (see wsss.reference.pda_attention).
    """
    return torch.ops.wsss.pda_attention(features, weight, mu)


def pda_pool(features: Tensor, weight: Tensor, mu: float) -> Tensor:
    """GAP(A * features) [N,C] with A = pda_attention(features, weight, mu), fused.

    Never materialises A * features; differentiable in features and weight, also twice
    (create_graph=True; that gradient is built from PyTorch ops, not the fused kernel).
    """
    return torch.ops.wsss.pda_pool(features, weight, mu)


def gate_argmax(
    scores: Tensor,
    class_prob: Tensor,
    eps: float,
    tissue_mask: Optional[Tensor] = None,
    background_index: int = 255,
) -> Tensor:
    """Classification-gated argmax.  scores [N,K,H,W], class_prob [N,K] -> uint8 [N,H,W].

    Classes with class_prob <= eps never win; a sample where no class passes keeps its
    ungated argmax; ties go to the lowest class index; where tissue_mask [N,H,W] is False
    the label is background_index.  See wsss.reference.gate_argmax.
    """
    return torch.ops.wsss.gate_argmax(scores, class_prob, eps, tissue_mask, background_index)


def gradcam(features: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM maps (no ReLU).  features [N,C,h,w], grads [N,K,C,h,w] -> [N,K,h,w]."""
    return torch.ops.wsss.gradcam(features, grads)


def band_accumulate(acc: Tensor, tiles: Tensor, xs: List[int], rows: int, window: Optional[Tensor] = None) -> None:
    """In place, tile by tile in order: acc[:, :rows, x_i : x_i + T] += tiles[i, :, :rows]
    (clipped at acc's width).  acc [C,R,W], tiles [N,C,T,T] of acc's dtype and device.  With a
    window [T,T]: tiles are class probabilities [N,K,T,T], acc is [K+1,R,W] and what is added is
    (tiles * window, window), the products made for the whole batch first.

    The runner's device-side blend (wsss.runner.band_stitching): one call per batch and tile
    row instead of a Python loop of two torch calls per tile.  See wsss.reference.band_accumulate.
    """
    torch.ops.wsss.band_accumulate(acc, tiles, xs, rows, window)


def band_finalize(acc: Tensor, rows: int, shift: int, tissue_mask: Optional[Tensor], background_index: int,
                  values: Tensor, counts: Tensor, with_probs: bool) -> Tuple[Tensor, Tensor]:
    """The first ``rows`` rows of a band accumulator acc [K+1,R,W] (class sums, weight sum) are
    final: -> (labels uint8 [rows,W], probabilities float16 [K,rows,W] if with_probs else [0]).
    Labels: gate_argmax of sums / weight (tissue_mask [rows,W]: outside -> background), pixels
    no tile covered -> background; counts[v] += pixels labelled values[v] (in place); then acc
    moves up by ``shift`` rows, zeros below (in place).  One op call for what was about twenty
    torch calls (wsss.runner.band_stitching).  See wsss.reference.band_finalize."""
    return torch.ops.wsss.band_finalize(acc, rows, shift, tissue_mask, background_index, values, counts, with_probs)


def deflate_tiles(tiles: Tensor, index: List[int], level: int = 1) -> Tuple[Tensor, Tensor]:
    """zlib streams of tiles[index[j]]'s bytes, all in one call (the GIL given up once):
    (data uint8 [B], ends int64 [M]); stream j is data[ends[j-1]:ends[j]].  tiles: a CPU
    contiguous tensor [N, ...] of any dtype; level 0-10 (1: fastest).

    The runner's label and probability tiles (wsss.runner.stitching.TileSpool.put_many).  See
    wsss.reference.deflate_tiles (Python's zlib: other bytes, the same inflated content)."""
    return torch.ops.wsss.deflate_tiles(tiles, index, level)


def inflate_tiles(data: Tensor, starts: List[int], ends: List[int], out: Tensor) -> None:
    """In place, all in one call: out[j] = the bytes of the zlib stream data[starts[j]:ends[j]],
    which must fill out[j] exactly.  data: uint8 [B]; out: a CPU contiguous tensor [M, ...].

    The label pyramid's children (wsss.runner.stitching.TileSpool.get_many).  See
    wsss.reference.inflate_tiles."""
    torch.ops.wsss.inflate_tiles(data, starts, ends, out)


def majority_downsample(labels: Tensor) -> Tensor:
    """uint8 [2h,2w] -> [h,w] (CPU): the most frequent value of each 2x2 block; a 2-2 split keeps
    the top-left value's class, four different values give the top-left value.  The label
    pyramid's levels, one call per strip of parent tiles.  See wsss.reference.majority_downsample."""
    return torch.ops.wsss.majority_downsample(labels)


def gated_scores(probs: Tensor, class_prob: Tensor, eps: float) -> Tensor:
    """Segmentation probabilities [N,K,H,W] with gated classes zeroed (same rule as gate_argmax).

    Used to blend overlapping tiles: the per-tile gate is applied before blending.
    """
    return probs * gate_allowed(class_prob, eps).to(probs.dtype)[:, :, None, None]


# --------------------------------------------------------------------------------------
# Argument checks shared by the fake kernels (the C++ kernels say the same words)
# --------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return {
        torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
        torch.float16: "Half", torch.uint8: "Byte", torch.bool: "Bool", torch.int64: "Long",
        torch.int32: "Int",
    }.get(dtype, str(dtype).replace("torch.", ""))


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_pda(op: str, features: Tensor, weight: Tensor, mu: float) -> None:
    torch._check(features.dim() == 4,
                 lambda: f"wsss::{op}: features must be a 4-D tensor [N, C, H, W], got shape {_shape(features)}")
    torch._check(features.dtype in _FLOATS,
                 lambda: f"wsss::{op}: features must be a floating tensor (Float, Double, BFloat16, Half), got {_dtype_name(features.dtype)}")
    torch._check(weight.dim() == 2 and weight.shape[0] >= 1 and weight.shape[1] == features.shape[1],
                 lambda: f"wsss::{op}: weight must have shape [K, C] with K >= 1 and C = features.size(1) = {features.shape[1]}, got shape {_shape(weight)}")
    torch._check(weight.dtype == features.dtype,
                 lambda: f"wsss::{op}: weight must have the dtype of features ({_dtype_name(features.dtype)}), got {_dtype_name(weight.dtype)}")
    torch._check(weight.device == features.device,
                 lambda: f"wsss::{op}: weight must be on the device of features ({features.device}), got {weight.device}")
    torch._check(0.0 <= mu <= 1.0, lambda: f"wsss::{op}: mu must be in [0, 1], got {mu}")


@torch.library.register_fake("wsss::pda_attention")
def _pda_attention_fake(features, weight, mu):
    _check_pda("pda_attention", features, weight, mu)
    n, _, h, w = features.shape
    return features.new_empty((n, 1, h, w))


@torch.library.register_fake("wsss::pda_pool")
def _pda_pool_fake(features, weight, mu):
    _check_pda("pda_pool", features, weight, mu)
    return features.new_empty(features.shape[:2])


@torch.library.register_fake("wsss::pda_attention_backward")
def _pda_attention_backward_fake(grad, features, weight, mu):
    _check_pda("pda_attention_backward", features, weight, mu)
    n, _, h, w = features.shape
    torch._check(tuple(grad.shape) == (n, 1, h, w),
                 lambda: f"wsss::pda_attention_backward: grad_attention must have shape [{n}, 1, {h}, {w}], got shape {_shape(grad)}")
    torch._check(grad.device == features.device,
                 lambda: f"wsss::pda_attention_backward: grad_attention must be on the device of features ({features.device}), got {grad.device}")
    return torch.empty_like(features, memory_format=torch.contiguous_format), torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("wsss::pda_pool_backward")
def _pda_pool_backward_fake(grad, features, weight, mu):
    _check_pda("pda_pool_backward", features, weight, mu)
    n, c = features.shape[:2]
    torch._check(tuple(grad.shape) == (n, c),
                 lambda: f"wsss::pda_pool_backward: grad_pooled must have shape [{n}, {c}], got shape {_shape(grad)}")
    torch._check(grad.device == features.device,
                 lambda: f"wsss::pda_pool_backward: grad_pooled must be on the device of features ({features.device}), got {grad.device}")
    return torch.empty_like(features, memory_format=torch.contiguous_format), torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("wsss::gate_argmax")
def _gate_argmax_fake(scores, class_prob, eps, tissue_mask=None, background_index=255):
    op = "wsss::gate_argmax"
    torch._check(scores.dim() == 4,
                 lambda: f"{op}: scores must be a 4-D tensor [N, K, H, W], got shape {_shape(scores)}")
    torch._check(scores.dtype in _FLOATS,
                 lambda: f"{op}: scores must be a floating tensor (Float, Double, BFloat16, Half), got {_dtype_name(scores.dtype)}")
    n, k, h, w = scores.shape
    torch._check(1 <= k <= 255, lambda: f"{op}: scores must have 1 to 255 classes (dim 1), got {k}")
    torch._check(class_prob.dim() == 2 and class_prob.shape[0] == n and class_prob.shape[1] == k,
                 lambda: f"{op}: class_prob must have shape [N, K] = [{n}, {k}], got shape {_shape(class_prob)}")
    torch._check(class_prob.dtype in _FLOATS,
                 lambda: f"{op}: class_prob must be a floating tensor (Float, Double, BFloat16, Half), got {_dtype_name(class_prob.dtype)}")
    torch._check(class_prob.device == scores.device,
                 lambda: f"{op}: class_prob must be on the device of scores ({scores.device}), got {class_prob.device}")
    _check_mask_and_background(f"{op}: ", tissue_mask, "N, H, W", (n, h, w), scores, "scores", background_index)
    return scores.new_empty((n, h, w), dtype=torch.uint8)


def _check_mask_and_background(op: str, tissue_mask, dims: str, shape, like: Tensor, like_name: str,
                               background_index: int) -> None:
    """The tissue-mask and background-index checks gate_argmax's and band_finalize's fakes share
    (``op``: the message prefix "wsss::name: "), worded as their kernels word them."""
    if tissue_mask is not None:
        torch._check(tissue_mask.dim() == len(shape) and tuple(tissue_mask.shape) == tuple(shape),
                     lambda: f"{op}tissue_mask must have shape [{dims}] = [{', '.join(map(str, shape))}], "
                             f"got shape {_shape(tissue_mask)}")
        torch._check(tissue_mask.dtype in (torch.bool, torch.uint8),
                     lambda: f"{op}tissue_mask must be Bool or Byte, got {_dtype_name(tissue_mask.dtype)}")
        torch._check(tissue_mask.device == like.device,
                     lambda: f"{op}tissue_mask must be on the device of {like_name} ({like.device}), got {tissue_mask.device}")
    torch._check(0 <= background_index <= 255,
                 lambda: f"{op}background_index must be in [0, 255], got {background_index}")


@torch.library.register_fake("wsss::gradcam")
def _gradcam_fake(features, grads):
    op = "wsss::gradcam"
    torch._check(features.dim() == 4,
                 lambda: f"{op}: features must be a 4-D tensor [N, C, h, w], got shape {_shape(features)}")
    torch._check(features.dtype in _FLOATS,
                 lambda: f"{op}: features must be a floating tensor (Float, Double, BFloat16, Half), got {_dtype_name(features.dtype)}")
    n, c, h, w = features.shape
    torch._check(grads.dim() == 5 and grads.shape[0] == n and grads.shape[2] == c and grads.shape[3] == h and grads.shape[4] == w,
                 lambda: f"{op}: grads must have shape [N, K, C, h, w] = [{n}, K, {c}, {h}, {w}], got shape {_shape(grads)}")
    torch._check(grads.dtype == features.dtype,
                 lambda: f"{op}: grads must have the dtype of features ({_dtype_name(features.dtype)}), got {_dtype_name(grads.dtype)}")
    torch._check(grads.device == features.device,
                 lambda: f"{op}: grads must be on the device of features ({features.device}), got {grads.device}")
    return features.new_empty((n, grads.shape[1], h, w))


@torch.library.register_fake("wsss::band_accumulate")
def _band_accumulate_fake(acc, tiles, xs, rows, window=None):
    op = "wsss::band_accumulate: "
    torch._check(acc.dim() == 3, lambda: f"{op}acc must be a 3-D tensor [C, R, W], got shape {_shape(acc)}")
    # NB: an int, not a bool: SymInt - bool fails under dynamic shapes (torch 2.11, seen on the GPU host)
    c = acc.shape[0] - (1 if window is not None else 0)
    what = "[N, K, T, T] with K = acc.size(0) - 1" if window is not None else "[N, C, T, T] with C = acc.size(0)"
    torch._check(tiles.dim() == 4 and tiles.shape[1] == c and tiles.shape[2] == tiles.shape[3],
                 lambda: f"{op}tiles must have shape {what} = {c}, got shape {_shape(tiles)}")
    if window is not None:
        torch._check(window.dim() == 2 and tuple(window.shape) == tuple(tiles.shape[2:]),
                     lambda: f"{op}window must have shape [T, T] = [{tiles.shape[2]}, {tiles.shape[3]}], got shape {_shape(window)}")
        torch._check(window.dtype == acc.dtype and window.device == acc.device,
                     lambda: f"{op}window must have the dtype and device of acc ({_dtype_name(acc.dtype)}, {acc.device}), "
                             f"got {_dtype_name(window.dtype)}, {window.device}")
    torch._check(acc.dtype in _FLOATS,
                 lambda: f"{op}acc must be a floating tensor (Float, Double, BFloat16, Half), got {_dtype_name(acc.dtype)}")
    torch._check(tiles.dtype == acc.dtype,
                 lambda: f"{op}tiles must have the dtype of acc ({_dtype_name(acc.dtype)}), got {_dtype_name(tiles.dtype)}")
    torch._check(tiles.device == acc.device,
                 lambda: f"{op}tiles must be on the device of acc ({acc.device}), got {tiles.device}")
    torch._check(len(xs) == tiles.shape[0], lambda: f"{op}xs must hold one column per tile ({tiles.shape[0]}), got {len(xs)}")
    limit = min(acc.shape[1], tiles.shape[2])
    torch._check(0 <= rows <= limit, lambda: f"{op}rows must be in [0, {limit}], got {rows}")
    for x in xs:
        torch._check(0 <= x < acc.shape[2], lambda: f"{op}every x must be in [0, {acc.shape[2]}), got {x}")
    return None


@torch.library.register_fake("wsss::band_finalize")
def _band_finalize_fake(acc, rows, shift, tissue_mask, background_index, values, counts, with_probs):
    op = "wsss::band_finalize: "
    torch._check(acc.dim() == 3 and acc.shape[0] >= 2,
                 lambda: f"{op}acc must be a 3-D tensor [K+1, R, W] with K >= 1, got shape {_shape(acc)}")
    torch._check(acc.shape[0] <= 256,
                 lambda: f"{op}acc must have 1 to 255 classes (K = acc.size(0) - 1), got {acc.shape[0] - 1}")
    torch._check(acc.dtype == torch.float32, lambda: f"{op}acc must be Float, got {_dtype_name(acc.dtype)}")
    torch._check(0 <= rows <= acc.shape[1], lambda: f"{op}rows must be in [0, {acc.shape[1]}], got {rows}")
    torch._check(shift >= 0, lambda: f"{op}shift must be >= 0, got {shift}")
    torch._check(values.dim() == 1 and values.dtype == torch.uint8 and values.device == acc.device,
                 lambda: f"{op}values must be a 1-D uint8 tensor on the device of acc, got shape {_shape(values)} of "
                         f"{_dtype_name(values.dtype)} on {values.device}")
    torch._check(counts.dim() == 1 and counts.shape[0] == values.shape[0] and counts.dtype == torch.int64
                 and counts.device == acc.device,
                 lambda: f"{op}counts must be an int64 tensor [{values.shape[0]}] on the device of acc, got shape "
                         f"{_shape(counts)} of {_dtype_name(counts.dtype)} on {counts.device}")
    k, w = acc.shape[0] - 1, acc.shape[2]
    _check_mask_and_background(op, tissue_mask, "rows, W", (rows, w), acc, "acc", background_index)
    half = acc.new_empty((k, rows, w) if with_probs else (0,), dtype=torch.float16)
    return acc.new_empty((rows, w), dtype=torch.uint8), half


@torch.library.register_fake("wsss::majority_downsample")
def _majority_downsample_fake(labels):
    op = "wsss::majority_downsample: "
    torch._check(labels.dim() == 2 and labels.shape[0] % 2 == 0 and labels.shape[1] % 2 == 0,
                 lambda: f"{op}labels must be a 2-D tensor [2h, 2w] (even sizes), got shape {_shape(labels)}")
    torch._check(labels.dtype == torch.uint8, lambda: f"{op}labels must be uint8 (Byte), got {_dtype_name(labels.dtype)}")
    return labels.new_empty((labels.shape[0] // 2, labels.shape[1] // 2))


@torch.library.register_fake("wsss::deflate_tiles")
def _deflate_tiles_fake(tiles, index, level=1):
    op = "wsss::deflate_tiles: "
    torch._check(tiles.dim() >= 1, lambda: f"{op}tiles must have a leading tile dimension [N, ...], got a 0-d tensor")
    torch._check(tiles.is_contiguous(),
                 lambda: f"{op}tiles must be contiguous, got a non-contiguous tensor of shape {_shape(tiles)}")
    torch._check(0 <= level <= 10, lambda: f"{op}level must be in [0, 10], got {level}")
    for i in index:
        torch._check(0 <= i < tiles.shape[0], lambda: f"{op}every index must be in [0, {tiles.shape[0]}), got {i}")
    total = torch.library.get_ctx().new_dynamic_size()  # (the compressed size is the data's)
    return tiles.new_empty((total,), dtype=torch.uint8), tiles.new_empty((len(index),), dtype=torch.int64)


@torch.library.register_fake("wsss::inflate_tiles")
def _inflate_tiles_fake(data, starts, ends, out):
    op = "wsss::inflate_tiles: "
    torch._check(data.dim() == 1 and data.dtype == torch.uint8 and data.is_contiguous(),
                 lambda: f"{op}data must be a contiguous 1-D uint8 tensor, got shape {_shape(data)} of {_dtype_name(data.dtype)}")
    torch._check(out.dim() >= 1 and out.is_contiguous(),
                 lambda: f"{op}out must be a contiguous tensor [M, ...], got shape {_shape(out)}")
    # NB: the kernel is CPU only, so it never sees two devices; a meta tensor among host tensors
    # lands here (Meta wins the dispatch) and must not pass for a call that did nothing
    torch._check(data.device == out.device,
                 lambda: f"{op}data must be on the device of out ({out.device}), got {data.device}")
    m = out.shape[0]
    torch._check(len(starts) == m and len(ends) == m,
                 lambda: f"{op}starts and ends must hold one offset per tile of out ({m}), got {len(starts)} and {len(ends)}")
    b = data.shape[0]
    for j, (s, e) in enumerate(zip(starts, ends)):
        torch._check(0 <= s <= e <= b, lambda: f"{op}stream {j} [{s}, {e}) is not within data [0, {b})")
    return None


# --------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------
def _pda_setup_context(ctx, inputs, output):
    features, weight, mu = inputs
    ctx.save_for_backward(features, weight)
    ctx.mu = mu


def _pda_grads_differentiable(grad: Tensor, features: Tensor, weight: Tensor, mu: float,
                              pooled: bool) -> Tuple[Tensor, Tensor]:
    """What pda_pool_backward (pooled) / pda_attention_backward compute, as the vector-Jacobian
    product of the PyTorch reference, so that the gradients are themselves differentiable
    (double backward, gradient penalties).  Same values as the fused kernels up to rounding, NaN
    rows included; used only when the backward is asked for a graph."""
    from wsss import reference

    fn = reference.pda_pool if pooled else reference.pda_attention
    _, vjp = torch.func.vjp(lambda f, w: fn(f, w, mu), features, weight)
    return vjp(grad)


# NB: the fused backward kernels have no derivative of their own.  When a backward is run with
# create_graph=True (grad mode is on inside it exactly then), the gradients are computed with
# the PyTorch ops above instead, which autograd differentiates to any order; otherwise the
# kernels.  (Before, the kernels ran either way and second derivatives came out silently zero.)
def _pda_attention_backward(ctx, grad):
    features, weight = ctx.saved_tensors
    if torch.is_grad_enabled():
        gf, gw = _pda_grads_differentiable(grad, features, weight, ctx.mu, pooled=False)
    else:
        gf, gw = torch.ops.wsss.pda_attention_backward(grad, features, weight, ctx.mu)
    return gf, gw, None


def _pda_pool_backward(ctx, grad):
    features, weight = ctx.saved_tensors
    if torch.is_grad_enabled():
        gf, gw = _pda_grads_differentiable(grad, features, weight, ctx.mu, pooled=True)
    else:
        gf, gw = torch.ops.wsss.pda_pool_backward(grad, features, weight, ctx.mu)
    return gf, gw, None


torch.library.register_autograd("wsss::pda_attention", _pda_attention_backward, setup_context=_pda_setup_context)
torch.library.register_autograd("wsss::pda_pool", _pda_pool_backward, setup_context=_pda_setup_context)


# The backward ops themselves are not differentiable: differentiating a direct call raises
# (without this, autograd only warned and the derivative came out as zero).
def _not_differentiable(name: str):
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, grad_features, grad_weight):
        raise RuntimeError(
            f"wsss::{name} is not differentiable: differentiate wsss::{name[:-len('_backward')]} instead "
            f"(its gradient is differentiable when taken with create_graph=True), or use "
            f"wsss.reference.{name[:-len('_backward')]}")

    torch.library.register_autograd(f"wsss::{name}", backward, setup_context=setup_context)


_not_differentiable("pda_attention_backward")
_not_differentiable("pda_pool_backward")


def _gradcam_setup_context(ctx, inputs, output):
    features, grads = inputs
    ctx.save_for_backward(features, grads)


def _gradcam_backward(ctx, grad):
    # out[n,k,p] = sum_c alpha[n,k,c] F[n,c,p] with alpha = mean_p G[n,k,c,p]
    features, grads = ctx.saved_tensors
    n, c, h, w = features.shape
    k = grads.shape[1]
    flat_f = features.reshape(n, c, h * w)
    g = grad.reshape(n, k, h * w)
    alpha = grads.mean(dim=(3, 4))  # [N,K,C]
    grad_features = torch.matmul(alpha.transpose(1, 2), g).reshape(n, c, h, w)
    grad_alpha = torch.matmul(g, flat_f.transpose(1, 2))  # [N,K,C]
    grad_grads = (grad_alpha / (h * w))[..., None, None].expand(n, k, c, h, w)  # (a view: no [N,K,C,h,w] copy)
    return grad_features, grad_grads


torch.library.register_autograd("wsss::gradcam", _gradcam_backward, setup_context=_gradcam_setup_context)

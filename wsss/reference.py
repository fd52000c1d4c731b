"""Pure-PyTorch versions of every wsss op: the specification and the test oracle.

Each function here states an op of ``csrc/ops.cpp`` in plain, vectorised PyTorch. The
fused kernels must agree with these (tests/test_ops.py) and autograd through these
functions defines the gradients the fused backward kernels must reproduce.

Shapes: N batch, C channels, K classes, H x W spatial.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "class_activation_maps",
    "pda_attention",
    "pda_pool",
    "gate_allowed",
    "gate_argmax",
    "gradcam",
    "band_accumulate",
    "band_finalize",
    "deflate_tiles",
    "inflate_tiles",
    "majority_downsample",
]


def class_activation_maps(features: Tensor, weight: Tensor) -> Tensor:
    """CAM_k = sum_c w_kc F_c, no ReLU.  features [N,C,H,W], weight [K,C] -> [N,K,H,W].

    NB: written as a batched matmul, not einsum: on CPU einsum copies the features first.
    """
    n, c, h, w = features.shape
    cams = torch.matmul(weight.to(features.dtype), features.reshape(n, c, h * w))
    return cams.reshape(n, weight.shape[0], h, w)


def pda_attention(features: Tensor, weight: Tensor, mu: float) -> Tensor:
    """Progressive Dropout Attention map A [N,1,H,W] (METHOD.md, stage 1).

    M_k = ReLU(CAM_k); beta_k = mu * max_hw M_k; Mhat_k = M_k where M_k <= beta_k, else 0;
    A = mean_k Mhat_k.  The threshold mask is piecewise constant, so gradients flow only
    through the kept CAM values (A is not detached).

    NaN propagates, as in torch's max: a CAM with a NaN anywhere (a NaN feature, inf - inf,
    or 0 * inf with mu = 0) has a NaN threshold, and a class whose threshold is NaN has an
    undefined dropped map, NaN everywhere; so A of that sample is NaN at every pixel (and so
    is pda_pool's output for it) rather than a plausible-looking map.  (NB: a comparison with
    NaN is False, so ``where(M <= beta, M, 0)`` alone would silently zero the sample.)  The
    kernels do the same; the NaN rows get no gradient through the map (as where's).
    """
    cams = torch.relu(class_activation_maps(features, weight))  # [N,K,H,W]
    if cams.shape[2] * cams.shape[3] == 0:
        return cams[:, :1]  # empty spatial extent: an empty map
    beta = mu * cams.amax(dim=(2, 3), keepdim=True)  # [N,K,1,1] (NaN where the CAM has a NaN)
    kept = torch.where(cams <= beta, cams, torch.zeros_like(cams))
    kept = kept.masked_fill(torch.isnan(beta), float("nan"))
    return kept.mean(dim=1, keepdim=True)


def pda_pool(features: Tensor, weight: Tensor, mu: float) -> Tensor:
    """GAP(A * features) [N,C]: the attended features pooled, without keeping A * features.

    Training applies channel dropout to this vector, which equals Dropout2d before GAP.
    """
    attention = pda_attention(features, weight, mu)
    return (attention * features).mean(dim=(2, 3))


def gate_allowed(class_prob: Tensor, eps: float) -> Tensor:
    """[N, K] bool: the classes that may win in each sample: those with class_prob > eps, or
    every class where none passes (the gate rule of gate_argmax)."""
    passes = class_prob > eps
    return passes | ~passes.any(dim=1, keepdim=True)


def gate_argmax(
    scores: Tensor,
    class_prob: Tensor,
    eps: float,
    tissue_mask: Optional[Tensor] = None,
    background_index: int = 255,
) -> Tensor:
    """Classification-gated argmax.  scores [N,K,H,W], class_prob [N,K] -> labels uint8 [N,H,W].

    A class whose probability is <= eps can never win.  Where no class of a sample passes
    the gate, that sample keeps its ungated argmax (NB: the classifier said "nothing here",
    which on a tissue tile is a classifier miss; the segmenter's own decision is the better
    guess, and this never yields a label outside 0..K-1).  Ties go to the lowest index.
    Where ``tissue_mask`` [N,H,W] is False, the label is ``background_index``.
    """
    allowed = gate_allowed(class_prob, eps)  # [N,K]
    # Running max over the allowed classes in index order: strict '>' keeps the lowest
    # index on ties, and a gated class is never even compared.
    first = allowed.to(torch.uint8).argmax(dim=1)  # [N] first allowed class
    labels = first[:, None, None].expand(scores.shape[0], scores.shape[2], scores.shape[3])
    best = torch.gather(scores, 1, labels[:, None].to(torch.int64)).squeeze(1)
    labels = labels.clone()
    for k in range(scores.shape[1]):
        better = allowed[:, k, None, None] & (scores[:, k] > best)
        best = torch.where(better, scores[:, k], best)
        labels = torch.where(better, torch.full_like(labels, k), labels)
    labels = labels.to(torch.uint8)
    if tissue_mask is not None:
        labels = torch.where(tissue_mask.bool(), labels,
                             torch.full_like(labels, background_index))
    return labels


def gradcam(features: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM class maps without ReLU (METHOD.md, stage 2).

    features F [N,C,h,w], grads G [N,K,C,h,w] (dz_k/dF) -> [N,K,h,w] = sum_c mean_hw(G_kc) F_c.
    """
    n, c, h, w = features.shape
    alpha = grads.mean(dim=(3, 4))  # [N,K,C]
    maps = torch.matmul(alpha.to(features.dtype), features.reshape(n, c, h * w))
    return maps.reshape(n, grads.shape[1], h, w)


def band_accumulate(acc: Tensor, tiles: Tensor, xs: List[int], rows: int, window: Optional[Tensor] = None) -> None:
    """In place, tile by tile in order: acc[:, :rows, x_i : x_i + T] += tiles[i, :, :rows]
    (clipped at acc's width).  acc [C,R,W], tiles [N,C,T,T], xs: N column offsets.  With a
    window [T,T]: tiles [N,K,T,T] are class probabilities, acc is [K+1,R,W], and the tiles added
    are (tiles * window, window).

    The order is part of the contract: sums of overlapping tiles are bit-identical to adding
    them one by one (what the runner's CPU stitcher does)."""
    if window is not None:
        tiles = torch.cat([tiles * window, window.expand(tiles.shape[0], 1, *window.shape)], dim=1)
    t, width = tiles.shape[-1], acc.shape[-1]
    for i, x in enumerate(xs):
        w = min(t, width - x)
        acc[:, :rows, x:x + w] += tiles[i, :, :rows, :w]


def band_finalize(acc: Tensor, rows: int, shift: int, tissue_mask: Optional[Tensor], background_index: int,
                  values: Tensor, counts: Tensor, with_probs: bool) -> Tuple[Tensor, Tensor]:
    """The first ``rows`` rows of a band accumulator acc [K+1,R,W] (class sums, weight sum) to
    (labels uint8 [rows,W], probabilities float16 [K,rows,W] or [0]):

    - probabilities = sums / weight (0 where no tile covered a pixel: weight 0);
    - labels = gate_argmax with every class passing, tissue_mask [rows,W] (outside -> background);
      uncovered pixels -> background_index; counts[v] += pixels labelled values[v];
    - then acc moves up by ``shift`` rows, zeros below (both in place; shift 0: acc stays)."""
    k = acc.shape[0] - 1
    band = acc[:, :rows]
    covered = band[k] > 0
    probs = band[:k] / band[k].clamp_min(1e-30)
    mask = None if tissue_mask is None else tissue_mask[None]
    labels = gate_argmax(probs[None], torch.ones(1, k, dtype=acc.dtype, device=acc.device), 0.0, mask,
                         background_index)[0]
    labels[~covered] = background_index
    counts += (labels[None] == values[:, None, None]).sum((1, 2))
    half = probs.to(torch.float16) if with_probs else acc.new_empty((0,), dtype=torch.float16)
    if shift > 0:
        keep = acc.shape[1] - shift
        if keep > 0:
            acc[:, :keep] = acc[:, shift:].clone()
            acc[:, keep:] = 0
        else:
            acc.zero_()
    return labels, half


def deflate_tiles(tiles: Tensor, index: List[int], level: int = 1) -> Tuple[Tensor, Tensor]:
    """(data uint8 [B], ends int64 [M]): stream j = data[ends[j-1]:ends[j]] is a zlib stream of
    the bytes of tiles[index[j]] (a contiguous CPU tensor [N, ...]).

    The contract is the inflated content, not the bytes: this uses Python's zlib, the op miniz
    (another encoder; any zlib reader inflates either)."""
    import zlib

    flat = tiles.contiguous().reshape(tiles.shape[0], -1).view(torch.uint8) if tiles.shape[0] else tiles
    streams = [zlib.compress(flat[i].numpy().tobytes(), min(level, 9)) for i in index]
    data = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8) if streams else torch.empty(0, dtype=torch.uint8)
    ends = torch.tensor([len(s) for s in streams], dtype=torch.int64).cumsum(0) if streams else torch.empty(0, dtype=torch.int64)
    return data, ends


def inflate_tiles(data: Tensor, starts: List[int], ends: List[int], out: Tensor) -> None:
    """In place: out[j] = the inflated zlib stream data[starts[j]:ends[j]], exactly out[j]'s bytes."""
    import zlib

    raw = data.numpy().tobytes()
    flat = out.reshape(out.shape[0], -1).view(torch.uint8) if out.shape[0] else out
    for j, (a, b) in enumerate(zip(starts, ends)):
        content = zlib.decompress(raw[a:b])
        if len(content) != flat.shape[1]:
            raise RuntimeError(f"inflate_tiles: stream {j} is not a zlib stream of {flat.shape[1]} bytes")
        flat[j] = torch.frombuffer(bytearray(content), dtype=torch.uint8)


def majority_downsample(labels: Tensor) -> Tensor:
    """uint8 [2h,2w] -> [h,w]: the vote of each 2x2 block a b / c d (reading order): a where a
    equals any other value, else b where b equals c or d, else c where c equals d, else (four
    different values) a.  So the majority wins, and a 2-2 split keeps the top-left class."""
    a, b = labels[0::2, 0::2], labels[0::2, 1::2]
    c, d = labels[1::2, 0::2], labels[1::2, 1::2]
    out = torch.where(c == d, c, a)
    out = torch.where((b == c) | (b == d), b, out)
    return torch.where((a == b) | (a == c) | (a == d), a, out)

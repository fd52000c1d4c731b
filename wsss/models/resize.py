"""Bilinear resizing that keeps TorchScript bundles loadable in older torch versions.

Why not ``F.interpolate`` in the networks: ``torch.jit.script`` compiles the whole Python body
of ``torch.nn.functional.interpolate`` into the archive, every mode's branch included.  The
torch that saves the bundle decides what that body calls: torch 2.14's has a ``lanczos`` branch
that calls ``aten::_upsample_lanczos2d_aa``, an op torch 2.11 does not have, so a bundle saved
with 2.14 failed to load in 2.11 ("Unknown builtin op: aten::_upsample_lanczos2d_aa") although
the models only ever upsample bilinearly.  ``resize_bilinear`` puts only the one op call into
the archive, an op every torch 2.x has.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize_bilinear"]


def resize_bilinear(x: Tensor, size_hw: List[int], align_corners: bool) -> Tensor:
    """Bilinear resize of x [N,C,H,W] to size_hw = [h, w]; bit-identical to
    ``F.interpolate(x, size=(h, w), mode="bilinear", align_corners=align_corners)``.

    Scripted (what bundles carry), this calls ``aten::upsample_bilinear2d.vec(x, [h, w],
    align_corners, None)``: the very op and overload that F.interpolate's scripted body calls
    for mode="bilinear" with a size and no scale factor (the ``Optional`` annotations below make
    TorchScript pick the ``.vec`` overload, as in F.interpolate), so bundles compute exactly
    what they did before, autocast included (autocast acts in the dispatcher, on the op).

    In eager mode (training, torch.export for .pt2 packages) it calls F.interpolate itself, so
    eager behaviour is unchanged in every detail, e.g. F.interpolate's deterministic decomposition
    on CUDA under ``torch.use_deterministic_algorithms(True)`` (whose backward is deterministic;
    the plain op's CUDA backward is not).  TorchScript never compiles that branch: it does not
    compile the body of ``if not torch.jit.is_scripting()``.
    """
    if not torch.jit.is_scripting():
        return F.interpolate(x, size=(size_hw[0], size_hw[1]), mode="bilinear", align_corners=align_corners)
    output_size: Optional[List[int]] = [size_hw[0], size_hw[1]]
    scale_factors: Optional[List[float]] = None
    return torch.ops.aten.upsample_bilinear2d(x, output_size, align_corners, scale_factors)

"""The inference module: RGB tiles -> classification gate -> segmentation -> labels.

One TorchScript-scriptable module that a bundle carries (wsss.bundle) and that Python, the
whole-slide runner and the C++ host all call with the same signature.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from wsss import ops
from wsss.models.resize import resize_bilinear

__all__ = ["TissueSegmenter"]


def _dtype_str(dtype: torch.dtype) -> str:
    """str(dtype) ("torch.int64"), also in TorchScript, where a dtype is its integer code and
    formats as a bare number ("4"): the names of the dtypes tiles could come as, else the code."""
    if not torch.jit.is_scripting():
        return str(dtype)
    dtypes = [torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
              torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32,
              torch.complex64, torch.complex128]
    names = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "bfloat16",
             "float32", "float64", "complex32", "complex64", "complex128"]
    for i in range(len(dtypes)):
        if dtypes[i] == dtype:
            return "torch." + names[i]
    return "dtype code {} (torch.ScalarType)".format(dtype)


class TissueSegmenter(nn.Module):
    """Classifier-gated tissue segmentation of RGB tiles.

    ``forward(tiles, with_scores=False) -> (labels, scores, class_prob)``:

    - tiles: [N,3,H,W] uint8 RGB, or float in 0..255.  Scaled by ``input_scale`` (1/255 as the
      reference) and cast to the dtype of the networks' weights (so a bfloat16 copy of the
      module takes bfloat16 input).
    - labels: uint8 [N,H,W] = wsss.ops.gate_argmax(segmentation logits, class_prob, eps): a class
      with class_prob <= eps never wins; where no class passes, the ungated argmax is kept.
    - scores: float32 [N,K,H,W] gated class probabilities (softmax of the segmentation logits
      with gated classes zeroed, wsss.ops.gated_scores) for blending overlapping tiles; an empty
      tensor when with_scores is False.
    - class_prob: float32 [N,K] = sigmoid(classifier logits).

    NB: the segmentation logits are upsampled to the tile size in float32 whatever the networks'
    dtype, so reduced-precision copies only round inside the networks.
    """

    def __init__(self, classifier: nn.Module, segmenter: nn.Module, *, eps: float = 0.1,
                 input_scale: float = 1.0 / 255.0) -> None:
        super().__init__()
        self.classifier = classifier
        self.segmenter = segmenter
        self.eps = float(eps)
        self.input_scale = float(input_scale)
        self.num_classes = int(classifier.num_classes)
        if int(segmenter.num_classes) != self.num_classes:
            raise ValueError(
                f"TissueSegmenter: classifier has {self.num_classes} classes but segmenter has "
                f"{int(segmenter.num_classes)}"
            )

    def _weight_dtype(self) -> torch.dtype:
        return self.classifier.conv1a.weight.dtype

    def forward(self, tiles: Tensor, with_scores: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        if tiles.dim() != 4 or tiles.size(1) != 3:
            raise ValueError("TissueSegmenter: tiles must have shape [N, 3, H, W], got {}".format(tiles.shape))
        if tiles.dtype == torch.bool or not (tiles.dtype == torch.uint8 or tiles.is_floating_point()):
            raise ValueError("TissueSegmenter: tiles must be uint8 or floating, got {}".format(_dtype_str(tiles.dtype)))
        x = tiles.to(self._weight_dtype()) * self.input_scale
        class_prob = torch.sigmoid(self.classifier(x).float())
        logits = self.segmenter.forward_low_res(x).float()
        logits = resize_bilinear(logits, [tiles.shape[2], tiles.shape[3]], True)
        labels = ops.gate_argmax(logits, class_prob, self.eps)
        if with_scores:
            scores = ops.gated_scores(torch.softmax(logits, dim=1), class_prob, self.eps)
        else:
            scores = torch.empty(0, dtype=torch.float32, device=tiles.device)
        return labels, scores, class_prob

"""Segmentation metrics exactly as METHOD.md: one K x K confusion matrix over a whole split.

Ground-truth pixels equal to the background/excluded index are left out.  With C the
confusion matrix (rows: truth, columns: prediction):
  IoU_k = C_kk / (sum_j C_kj + sum_i C_ik - C_kk)   (nan when the class is in neither)
  mIoU  = nanmean_k IoU_k
  FwIoU = sum_k freq_k IoU_k, freq_k = sum_j C_kj / sum C   (nan IoU counts as 0: freq is 0 there)
  ACC   = trace(C) / sum(C)
A prediction outside 0..K-1 (e.g. background on a tissue pixel) is a miss for that pixel's
true class: it counts in the row total (so in FN) but in no column.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

__all__ = ["ConfusionMatrix", "segmentation_scores", "multilabel_f1"]


class ConfusionMatrix:
    """Accumulates a [K,K] int64 confusion matrix plus per-class misses to out-of-range predictions."""

    def __init__(self, num_classes: int, background_index: int):
        self.num_classes = num_classes
        self.background_index = background_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.missed = np.zeros(num_classes, dtype=np.int64)  # true class k predicted outside 0..K-1

    def update(self, truth, prediction) -> None:
        """truth, prediction: integer arrays/tensors of the same shape (any shape)."""
        t = _as_tensor(truth).reshape(-1).to(torch.int64)
        p = _as_tensor(prediction).reshape(-1).to(torch.int64).to(t.device)
        if t.shape != p.shape:
            raise ValueError(f"truth and prediction must have the same number of pixels, got {t.numel()} and {p.numel()}")
        k = self.num_classes
        keep = (t >= 0) & (t < k)  # background/excluded truth left out
        t, p = t[keep], p[keep]
        inside = (p >= 0) & (p < k)
        self.matrix += torch.bincount(t[inside] * k + p[inside], minlength=k * k).reshape(k, k).cpu().numpy()
        self.missed += torch.bincount(t[~inside], minlength=k).cpu().numpy()

    def scores(self, class_names: Optional[Sequence[str]] = None) -> Dict:
        return segmentation_scores(self.matrix, self.missed, class_names)


def _as_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    return torch.from_numpy(np.array(a))  # a copy: read-only arrays (e.g. from PIL) are fine


def segmentation_scores(matrix: np.ndarray, missed: Optional[np.ndarray] = None,
                        class_names: Optional[Sequence[str]] = None) -> Dict:
    """IoU per class, mIoU, FwIoU, ACC (fractions in [0,1]; nan where undefined) from a [K,K] matrix."""
    c = np.asarray(matrix, dtype=np.float64)
    k = c.shape[0]
    missed = np.zeros(k) if missed is None else np.asarray(missed, dtype=np.float64)
    tp = np.diag(c)
    truth_total = c.sum(axis=1) + missed
    pred_total = c.sum(axis=0)
    union = truth_total + pred_total - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    total = truth_total.sum()
    freq = truth_total / total if total > 0 else np.zeros(k)
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return {
        "iou": {names[i]: float(iou[i]) for i in range(k)},
        "miou": miou,
        "fwiou": float(np.nansum(freq * iou)) if total > 0 else float("nan"),
        "acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "pixels": int(total),
    }


def multilabel_f1(truth: torch.Tensor, predicted: torch.Tensor) -> Dict:
    """Per-class and macro/micro F1 of 0/1 multilabel predictions [N,K] against truth [N,K]."""
    t = truth.bool()
    p = predicted.bool()
    tp = (t & p).sum(0).double()
    fp = (~t & p).sum(0).double()
    fn = (t & ~p).sum(0).double()
    per_class = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.full_like(tp, float("nan")))
    micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1))
    return {"per_class": [float(v) for v in per_class], "macro": float(np.nanmean(per_class.numpy())), "micro": micro}

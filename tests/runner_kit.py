"""Helpers shared by the runner tests: colour-coded synthetic slides and trivial predictors
whose exact output is known, so a stitched result can be checked pixel for pixel.

(Imported by tests/test_runner*.py; tests/conftest.py puts this folder on sys.path.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch

from wsss.runner import RunOptions, SlideModel

K = 4
PALETTE = [[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0], [255, 255, 255]]


def colour_slide(h: int, w: int, seed: int = 0, block: int = 5) -> np.ndarray:
    """uint8 [h, w, 3]: blocks whose red channel encodes a class (red // 64)."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, K, (h // block + 1, w // block + 1)).repeat(block, 0).repeat(block, 1)[:h, :w]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = cls * 64 + 20
    img[..., 1] = rng.integers(0, 256, (h, w))
    img[..., 2] = 255 - img[..., 0]
    return img


def write_pyramid(path: Path, levels, *, mpp=0.5, tile=32):
    with tifffile.TiffWriter(path) as tif:
        for i, img in enumerate(levels):
            res = 1e4 / (mpp * levels[0].shape[1] / img.shape[1])
            tif.write(img, tile=(tile, tile), photometric="rgb", compression="zlib", resolution=(res, res),
                      resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)


def red_class(x: torch.Tensor) -> torch.Tensor:
    """Trivial predictor: one-hot of red // 64.  uint8 [N,3,H,W] -> float32 [N,K,H,W]."""
    c = (x[:, 0].long() // 64).clamp(0, K - 1)
    return torch.nn.functional.one_hot(c, K).permute(0, 3, 1, 2).float()


def soft_colour(x: torch.Tensor) -> torch.Tensor:
    """Trivial smooth predictor: softmax of a fixed linear map of the pixel colour."""
    w = torch.tensor([[0.02, 0.0, -0.01], [-0.01, 0.01, 0.0], [0.0, -0.01, 0.02], [0.005, 0.005, 0.005]])
    logits = torch.einsum("kc,nchw->nkhw", w, x.float())
    return torch.softmax(logits, dim=1)


def dies_at(call: int, error: Exception, predict=red_class):
    """A predictor that raises ``error`` on its ``call``-th call (1-based), else predicts."""
    calls = {"n": 0}

    def dying(x):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return predict(x)

    return dying


# (height, width, tile, overlap, output tile) of the exact-reconstruction checks
GEOMETRIES = [
    (97, 131, 32, 8, 32),    # odd sizes, multiple tiles
    (31, 29, 32, 8, 16),     # slide smaller than one tile
    (150, 64, 48, 20, 32),   # big overlap, width = exact tiles
    (77, 200, 32, 0, 48),    # no overlap
    (120, 90, 40, 13, 64),   # odd overlap
]


def model(predict=red_class, tile=32, mpp=0.5, bg=4):
    return SlideModel(predict, ["A", "B", "C", "D"], PALETTE, bg, mpp, tile, identity=f"test-{predict.__name__}")


def opts(**kw):
    base = dict(tissue="none", progress=False, output_tile=32, workers=2, batch_size=3)
    base.update(kw)
    return RunOptions(**base)


# --------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------

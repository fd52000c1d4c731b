"""A large, mostly-glass pyramidal TIFF written in seconds (benchmark helper).

Real whole-slide images are mostly empty glass; the runner's tissue detection skips it.
Tiles without tissue are one pre-compressed white tile repeated (written as raw bytes,
never re-encoded), so a 60k x 60k slide with a few tissue islands takes seconds and a few
MB.  Tissue islands are H&E-like (pink/purple blobs with texture) so Otsu on saturation
finds them.  Levels are separate pages (OpenSlide's generic-tiff reader sees them all).
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import tifffile

__all__ = ["write_sparse_slide", "default_islands"]


def default_islands(size: int, n: int = 3, edge: int = 2048) -> List[Tuple[int, int, int]]:
    """n square tissue islands (x, y, edge) spread along the diagonal of a size x size slide."""
    edge = min(edge, size // 4)
    return [(int((i + 1) * size / (n + 1) - edge / 2), int((i + 1) * size / (n + 1) - edge / 2), edge)
            for i in range(n)]


def _tissue(x0: int, y0: int, t: int, islands: Sequence[Tuple[int, int, int]], step: int) -> np.ndarray:
    """uint8 [t, t, 3] RGB of the slide area (x0, y0) + t*step (step: level downsample)."""
    yy, xx = np.mgrid[0:t, 0:t]
    gx, gy = x0 + xx * step, y0 + yy * step
    inside = np.zeros((t, t), bool)
    for (ix, iy, e) in islands:
        cx, cy, r = ix + e / 2, iy + e / 2, e / 2
        inside |= (gx - cx) ** 2 + (gy - cy) ** 2 < r * r
    out = np.full((t, t, 3), 242, np.uint8)
    if inside.any():
        # stripes of "stroma" and "nuclei"-like blobs: coloured, textured
        band = ((gx // 97 + gy // 71) % 3)
        r = np.where(band == 0, 200, np.where(band == 1, 150, 120))
        g = np.where(band == 0, 110, np.where(band == 1, 70, 60))
        b = np.where(band == 0, 170, np.where(band == 1, 160, 150))
        tex = ((gx * 7 + gy * 13) % 23).astype(np.int16) - 11
        rgb = np.stack([r + tex, g + tex, b + tex], -1).clip(0, 255).astype(np.uint8)
        out[inside] = rgb[inside]
    return out


def write_sparse_slide(path, size: int, *, islands=None, tile: int = 512, mpp: float = 0.5,
                       min_level_px: int = 1024) -> List[Tuple[int, int, int]]:
    """Write a size x size RGB pyramid (zlib tiles) with tissue only in ``islands``
    [(x, y, edge), ...] (default: 3 islands of 2048 px).  Returns the islands."""
    islands = default_islands(size) if islands is None else list(islands)
    white = zlib.compress(np.full((tile, tile, 3), 242, np.uint8).tobytes(), 6)
    nbytes_estimate = size * size // 50
    with tifffile.TiffWriter(Path(path), bigtiff=nbytes_estimate > 2**30 or size > 40000) as tif:
        level, step = 0, 1
        while True:
            w = -(-size // step)

            def tiles(step=step, w=w):
                for ty in range(-(-w // tile)):
                    for tx in range(-(-w // tile)):
                        x0, y0 = tx * tile * step, ty * tile * step
                        x1, y1 = x0 + tile * step, y0 + tile * step
                        if any(ix < x1 and x0 < ix + e and iy < y1 and y0 < iy + e for (ix, iy, e) in islands):
                            yield zlib.compress(_tissue(x0, y0, tile, islands, step).tobytes(), 6)
                        else:
                            yield white

            res = 1e4 / (mpp * step)
            tif.write(tiles(), shape=(w, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression="zlib", resolution=(res, res), resolutionunit="CENTIMETER",
                      subfiletype=0 if level == 0 else 1, metadata=None)
            if w <= min_level_px:
                break
            level, step = level + 1, step * 2
    return islands

"""Tile layout over an output grid, and the blending weight window.

Tiles of ``tile`` x ``tile`` pixels step by ``stride = tile - overlap``; the last tile of a
row/column is moved back to end at the grid edge (as MONAI's sliding window does), so only
grids smaller than one tile are padded.  The weight window is 1 in the tile core and ramps
down (raised cosine) over the ``overlap`` pixels at each edge, floored at a small positive
value: in an overlap the two ramps cross-fade, so tile borders leave no seams.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from wsss.errors import WsssError

__all__ = ["tile_starts", "TileGrid", "weight_window"]


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles covering [0, length): stride tile - overlap, last one snapped to the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = int(math.ceil((length - tile) / stride)) + 1
    starts = sorted({min(i * stride, length - tile) for i in range(n)})
    return starts


@dataclass
class TileGrid:
    """All tile positions over a ``width`` x ``height`` grid.

    xs, ys: tile starts along x and y; ``tiles``: (x, y) of the tiles to run, in raster order
    (a tissue filter may drop some).
    """

    width: int
    height: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if self.tile < 16:
            raise WsssError(f"--tile-size must be at least 16 pixels, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise WsssError(f"--overlap must be in [0, tile size {self.tile}), got {self.overlap}")
        if self.width < 1 or self.height < 1:
            raise WsssError(f"grid must be at least 1 x 1 pixels, got {self.width} x {self.height}")
        self.xs = tile_starts(self.width, self.tile, self.overlap)
        self.ys = tile_starts(self.height, self.tile, self.overlap)
        self.tiles: List[Tuple[int, int]] = [(x, y) for y in self.ys for x in self.xs]

    @property
    def total(self) -> int:
        return len(self.xs) * len(self.ys)

    def select(self, keep) -> None:
        """Keep only tiles where keep(x, y) is true (raster order is preserved)."""
        self.tiles = [(x, y) for (x, y) in self.tiles if keep(x, y)]


def weight_window(tile: int, overlap: int, *, floor: float = 1e-3) -> np.ndarray:
    """float32 [tile, tile] separable window: raised-cosine ramps over ``overlap`` px at each edge.

    NB: strictly positive (>= floor) everywhere, so pixels covered by a single tile (slide
    borders) are still normalised exactly; any positive window reproduces a constant field.
    An overlap of more than half the tile makes the two ramps cross: the window is their
    minimum there (it rises, then falls, with no jump).
    """
    ramp = np.ones(tile, np.float64)
    if overlap > 0:
        t = (np.arange(overlap) + 0.5) / overlap  # (0, 1)
        up = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:overlap] = np.maximum(up, floor)
        ramp[tile - overlap:] = np.minimum(ramp[tile - overlap:], np.maximum(up[::-1], floor))
    return np.outer(ramp, ramp).astype(np.float32)

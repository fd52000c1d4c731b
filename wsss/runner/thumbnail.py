"""The slide's overview picture assembled from the tiles as they are read.

On a slide without a usable pyramid (a flat TIFF, or one whose coarsest level is still the
level the tiles come from) a thumbnail read decodes the whole level a second time after the
tile stage.  When every tile of the grid runs anyway (no tissue detection), each reader
thread instead reduces the part of its tile that no other tile owns into a sum canvas at the
label pyramid's overview level: the same picture for a fraction of the work, on threads that
wait for the model most of the time.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["TileThumbnail"]


class TileThumbnail:
    """Box mean of a ``width`` x ``height`` view over ``factor`` x ``factor`` blocks (partial
    blocks at the right and bottom edges: the label pyramid's grid, so each thumbnail pixel
    sits exactly on its overview-level label), from tiles at the grid's positions.

    Each view pixel is counted once: the tile starting at ``xs[i]`` owns columns
    ``[xs[i], xs[i + 1])`` (the last one up to ``width``), rows likewise.  ``add`` is
    thread-safe; ``image`` returns None until every pixel has been added.
    """

    def __init__(self, width: int, height: int, factor: int, xs: Sequence[int], ys: Sequence[int]) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.width, self.height, self.factor = int(width), int(height), int(factor)
        self.shape = (-(-self.height // self.factor), -(-self.width // self.factor))
        # NB: uint32 holds factor^2 x 255 for factors up to 4096
        self._sum = np.zeros(self.shape + (3,), np.uint32)
        self._x_end = dict(zip(xs, list(xs[1:]) + [self.width]))
        self._y_end = dict(zip(ys, list(ys[1:]) + [self.height]))
        self._pixels = 0
        rows = np.minimum(self.factor, self.height - np.arange(self.shape[0]) * self.factor)
        self._row_need = rows * self.width  # view pixels per thumbnail row
        self._row_pixels = np.zeros(self.shape[0], np.int64)  # ... added so far
        self.rows_done = 0  # leading thumbnail rows complete
        self._lock = threading.Lock()
        self.on_complete: Optional[Callable[[], None]] = None  # called by the add that completes it
        self.on_rows: Optional[Callable[[], None]] = None  # called by an add that makes rows_done grow

    def add(self, x: int, y: int, tile: np.ndarray) -> None:
        """uint8 [>= core h, >= core w, 3] pixels of the tile at grid position (x, y)."""
        f = self.factor
        x1, y1 = self._x_end[x], self._y_end[y]
        h, w = y1 - y, x1 - x
        oy, ox = y % f, x % f
        rows, cols = -(-(oy + h) // f), -(-(ox + w) // f)
        if f <= 16:
            # summed by f strided adds per axis in uint16 (16^2 x 255 fits): ~0.13 ms for a
            # 224^2 core (np.add.reduceat: ~1 ms; decoding the tile: ~1 ms); a core that does
            # not start and end on block edges is first placed in whole blocks, zeros around it
            if oy == ox == 0 and h % f == 0 and w % f == 0:
                src = tile[:h, :w]
            else:
                src = np.empty((rows * f, cols * f, 3), np.uint16)
                src[:oy] = 0
                src[oy + h:] = 0
                src[oy:oy + h, :ox] = 0
                src[oy:oy + h, ox + w:] = 0
                src[oy:oy + h, ox:ox + w] = tile[:h, :w]
            band = src[0::f].astype(np.uint16)
            for k in range(1, f):
                band += src[k::f]
            sums = band[:, 0::f].copy()
            for k in range(1, f):
                sums += band[:, k::f]
        else:  # few, big blocks per tile: one segmented sum per axis
            cuts_y = np.r_[0, np.arange(f - oy, h, f)]
            cuts_x = np.r_[0, np.arange(f - ox, w, f)]
            sums = np.add.reduceat(np.add.reduceat(tile[:h, :w], cuts_y, axis=0, dtype=np.uint32), cuts_x, axis=1)
        r0, c0 = y // f, x // f
        rr = np.arange(r0, r0 + rows)
        row_pixels = (np.minimum(y1, (rr + 1) * f) - np.maximum(y, rr * f)) * w
        with self._lock:
            self._sum[r0:r0 + rows, c0:c0 + cols] += sums
            self._pixels += h * w
            done = self._pixels == self.width * self.height
            self._row_pixels[r0:r0 + rows] += row_pixels
            before = self.rows_done
            while self.rows_done < self.shape[0] and self._row_pixels[self.rows_done] == self._row_need[self.rows_done]:
                self.rows_done += 1
            grew = self.rows_done > before
        if grew and self.on_rows is not None:
            self.on_rows()
        if done and self.on_complete is not None:  # (exactly one add completes it)
            self.on_complete()

    @property
    def complete(self) -> bool:
        return self._pixels == self.width * self.height

    def image(self) -> Optional[np.ndarray]:
        """uint8 [ceil(h / factor), ceil(w / factor), 3], rounded means; None if incomplete."""
        if not self.complete:
            return None
        return self.rows(0, self.shape[0])

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of ``image()``, all below ``rows_done`` (complete: no add touches them again)."""
        assert r1 <= self.rows_done, (r1, self.rows_done)
        f = self.factor
        rows = np.minimum(f, self.height - np.arange(r0, r1) * f)
        cols = np.minimum(f, self.width - np.arange(self.shape[1]) * f)
        count = (rows[:, None] * cols[None, :]).astype(np.uint32)[..., None]
        return ((self._sum[r0:r1] + count // 2) // count).astype(np.uint8)

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
from collections import Counter
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["TileBlocks", "TileThumbnail"]


class TileBlocks:
    """Block sums of tiles' cores on a thumbnail's grid: the part of TileThumbnail a reader does
    (in a reader thread or a reader process: ``settings`` rebuilds it there).  See TileThumbnail."""

    def __init__(self, width: int, height: int, factor: int, xs: Sequence[int], ys: Sequence[int]) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.width, self.height, self.factor = int(width), int(height), int(factor)
        self.settings = (self.width, self.height, self.factor, tuple(int(x) for x in xs), tuple(int(y) for y in ys))
        self.x_end = dict(zip(xs, list(xs[1:]) + [self.width]))
        self.y_end = dict(zip(ys, list(ys[1:]) + [self.height]))

    def batch_sums(self, positions, tiles: np.ndarray):
        """(parts, group) for ``TileThumbnail.add_sums`` of uint8 [n, >= core h, >= core w, 3]
        tiles at grid positions ``positions``, in a few numpy calls.  The tiles whose core has
        the batch's commonest size and starts and ends on block edges (all but a slide's last
        column and row, when the factor divides the grid's stride) are summed in two reductions
        over the whole batch (``group``); the others tile by tile (``parts``).

        NB: on a GPU host the readers share the GIL with a dozen threads, and each numpy call
        that gives it up waits to take it back: summing tile by tile makes 2 to 2f such calls
        per tile, more than reading the tile (beside one GIL-holding thread at a 1-ms interval,
        4.7 against 2.1 ms per 256-px tile read with and without it, at f = 16)."""
        f = self.factor
        positions = [(int(x), int(y)) for x, y in positions]
        cores = [(self.x_end[x] - x, self.y_end[y] - y) for x, y in positions]
        aligned = [j for j, ((x, y), (w, h)) in enumerate(zip(positions, cores))
                   if x % f == 0 and y % f == 0 and w % f == 0 and h % f == 0]
        group = None
        if len(aligned) > 1:
            w, h = Counter(cores[j] for j in aligned).most_common(1)[0][0]
            members = [j for j in aligned if cores[j] == (w, h)]
            j0 = members[0]
            block = tiles[j0:members[-1] + 1, :h, :w]  # (usually the batch but its last tile or two)
            n = len(block)
            # NB: one axis at a time (a reduction over two strided axes at once was ~12x slower)
            band = block.reshape(n, h // f, f, w, 3).sum(axis=2, dtype=np.uint32)
            sums = band.reshape(n, h // f, w // f, f, 3).sum(axis=3, dtype=np.uint32)
            group = (np.array([positions[j] for j in members]), sums[np.array(members) - j0], w, h)
            rest = sorted(set(range(len(positions))) - set(members))
        else:
            rest = range(len(positions))
        return [(*positions[j], self.tile_sums(*positions[j], tiles[j])) for j in rest], group

    def tile_sums(self, x: int, y: int, tile: np.ndarray) -> np.ndarray:
        """Block sums [rows, cols, 3] of the core of the tile at (x, y), on the thumbnail's grid."""
        f = self.factor
        x1, y1 = self.x_end[x], self.y_end[y]
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
        return sums


class TileThumbnail:
    """Box mean of a ``width`` x ``height`` view over ``factor`` x ``factor`` blocks (partial
    blocks at the right and bottom edges: the label pyramid's grid, so each thumbnail pixel
    sits exactly on its overview-level label), from tiles at the grid's positions.

    Each view pixel is counted once: the tile starting at ``xs[i]`` owns columns
    ``[xs[i], xs[i + 1])`` (the last one up to ``width``), rows likewise.  ``add``,
    ``add_batch`` and ``add_sums`` are thread-safe; ``image`` returns None until every pixel
    has been added.
    """

    def __init__(self, width: int, height: int, factor: int, xs: Sequence[int], ys: Sequence[int]) -> None:
        self.blocks = TileBlocks(width, height, factor, xs, ys)
        self.width, self.height, self.factor = self.blocks.width, self.blocks.height, self.blocks.factor
        self.shape = (-(-self.height // self.factor), -(-self.width // self.factor))
        # NB: uint32 holds factor^2 x 255 for factors up to 4096
        self._sum = np.zeros(self.shape + (3,), np.uint32)
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
        self.add_sums([(x, y, self.blocks.tile_sums(x, y, tile))])

    def add_batch(self, positions, tiles: np.ndarray) -> None:
        """``add`` for a batch: uint8 [n, >= core h, >= core w, 3] tiles at grid positions
        ``positions`` (see TileBlocks.batch_sums)."""
        self.add_sums(*self.blocks.batch_sums(positions, tiles))

    def add_sums(self, parts, group=None) -> None:
        """Add [(x, y, block sums of the tile's core)], and ``group`` = ((x, y) [n, 2], sums
        [n, rows, cols, 3], core w, core h) of tiles whose cores start and end on block edges,
        to the canvas and the row counts (``TileBlocks.batch_sums``' result)."""
        f = self.factor
        grew = done = False
        with self._lock:
            for x, y, sums in parts:
                x1, y1 = self.blocks.x_end[x], self.blocks.y_end[y]
                h, w = y1 - y, x1 - x
                r0, c0 = y // f, x // f
                rows, cols = sums.shape[:2]
                self._sum[r0:r0 + rows, c0:c0 + cols] += sums
                self._pixels += h * w
                rr = np.arange(r0, r0 + rows)
                self._row_pixels[r0:r0 + rows] += (np.minimum(y1, (rr + 1) * f) - np.maximum(y, rr * f)) * w
            if group is not None:
                xy, sums, w, h = group
                n, rows, cols = sums.shape[:3]
                rr = (xy[:, 1] // f)[:, None] + np.arange(rows)  # [n, rows]
                cc = (xy[:, 0] // f)[:, None] + np.arange(cols)  # [n, cols]
                self._sum[rr[:, :, None], cc[:, None, :]] += sums  # (owned cores never overlap)
                self._pixels += n * h * w
                np.add.at(self._row_pixels, rr.ravel(), f * w)
            done = self._pixels == self.width * self.height
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

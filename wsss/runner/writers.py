"""Per-slide output files, each written atomically (temp file in the same folder + os.replace).

- labels.tiff: tiled pyramidal TIFF (one page per level, so OpenSlide's generic-tiff reader
  sees every level), palette colormap, resolution tags in pixels per centimetre (mpp), levels
  built by 2x2 majority vote from the level below (not max, not nearest).
- probs.tiff (optional): float16 blended class probabilities, K planes, tiled, level 0 only.
- overlay.png, tissue_qc.png: thumbnails for a human check.
- areas.json / areas.csv: pixels, mm2 and % of tissue per class.
- polygons.geojson: one MultiPolygon feature per class (QuPath annotations, level-0 slide
  pixel coordinates of the input slide).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from wsss import files
from wsss.runner.stitching import TileSpool

__all__ = [
    "atomic_path", "temp_tag", "remove_stale_temporaries", "write_json_atomic", "downsample_majority", "LabelPyramid", "build_label_pyramid",
    "write_label_tiff", "write_probs_tiff", "palette_image", "write_overlay", "OverlayWriter", "write_tissue_qc", "inner_boundary",
    "overview_level", "polygon_level",
    "class_areas", "write_areas", "label_polygons", "write_geojson", "write_geojson_features", "geojson_extent",
]


def temp_tag() -> str:
    """'<host>.<pid>': what the runner's temporary names carry, so a later run on the same host
    can tell the leftovers of a killed process (see ``remove_stale_temporaries``)."""
    return f"{socket.gethostname().replace('.', '-') or 'host'}.{os.getpid()}"


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporaries (``.<name>.<host>.<pid>.<random>.tmp`` files and folders) that a
    process of this host which no longer runs left in ``folder`` (a run killed by a signal or
    a batch system's time limit gets no chance to clean up; a spool folder can hold gigabytes).
    Returns how many were removed.  NB: leftovers of other hosts (a shared file system) and of
    live processes are kept."""
    host = temp_tag().split(".")[0]
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        parts = entry.name.split(".")
        if len(parts) < 6 or parts[0] != "" or parts[-1] != "tmp" or parts[-4] != host or not parts[-3].isdigit():
            continue
        pid = int(parts[-3])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive
        except ProcessLookupError:
            pass  # gone: its leftovers go
        except OSError:
            continue  # e.g. PermissionError: another user's live process
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path next to ``final``; on success os.replace it into place, else delete it.

    NB: the temp name starts with '.' and ends with '.tmp', so an interrupted run never
    leaves a file that looks like a result; it carries ``temp_tag()`` for the clean-up.
    """
    with files.atomic_path(final, tag=f"{temp_tag()}.") as tmp:
        yield tmp


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Label pyramid
# --------------------------------------------------------------------------------------
def downsample_majority(labels: np.ndarray) -> np.ndarray:
    """uint8 [2h, 2w] -> [h, w]: the most frequent value of each 2x2 block (``wsss::majority_downsample``).

    Ties: a 2-2 split or four different values keep the top-left value's class when it is
    among the most frequent, else the first most frequent in reading order.
    NB: one op call; the numpy version (a table look-up built from these rules) made about
    ten array calls, each giving up the GIL beside the runner's other threads.
    """
    import torch

    from wsss.ops import majority_downsample

    labels = np.ascontiguousarray(labels)
    if not labels.flags.writeable:  # (torch.from_numpy warns on read-only arrays)
        labels = labels.copy()
    return majority_downsample(torch.from_numpy(labels)).numpy()


class _Rows:
    """Consecutive rows ``y0 ..`` of one pyramid level, ``n`` of them: ``data`` holds tile columns
    ``[c0, c0 + data.shape[1] // T)`` of them (the others are fill), ``active`` marks the tile
    columns that may differ from fill (None: all fill; then data is None too)."""

    __slots__ = ("y0", "n", "c0", "data", "active")

    def __init__(self, y0: int, n: int, c0: int, data: Optional[np.ndarray], active: Optional[np.ndarray]) -> None:
        self.y0, self.n, self.c0, self.data, self.active = y0, n, c0, data, active


class LabelPyramid:
    """Levels 1.. of a label spool (each half the size of the one below, until one tile covers
    it), streamed up from level 0 one tile row at a time.

    Each level-0 tile row is read once, as soon as it is final, and voted up through every
    level at once: its rows are T/2 rows of level 1, T/4 of level 2, ... (2x2 majority votes are
    local), so a level's rows are final as soon as the level-0 rows under them are, and a
    level's tile row is compressed and stored once its last rows arrive.  Nothing is read back
    from the spools of levels 1..; ``watch_rows`` hands a level's rows on as they are made (the
    GeoJSON's outlines, traced while the tiles run).  One worker thread takes the level-0 rows
    in order, a second reads (and votes into level 1) the next one meanwhile.  Above level 1 a
    level's rows wait until ``vote_rows`` of them (default T/2) are in before they are voted up
    (fewer, larger calls; the result is the same for any value).

    Edges: pixels past the edge of the level below (its last row and column, inside a partial
    block or tile) repeat its last valid pixel, so an edge half-block is not outvoted by padding.
    A parent tile none of whose children was ever stored is fill and is not stored either.

    With ``expected`` (level-0 pixels per tile, what the stitcher's OutputTiles waits for) the
    level-0 rows become final through ``tiles_stored`` while the tiles still run, so the pyramid
    is built during the tile stage; without it ``finish`` builds it all.  The bytes of every
    level do not depend on the order the level-0 tiles were stored in (tested).
    """

    KEPT_STRIPS = 4  # level-0 rows waiting to be voted whose strips are kept (T x width bytes each)

    def __init__(self, level0: TileSpool, tmp_dir: Path, *, fill: int, expected: Optional[np.ndarray] = None,
                 vote_rows: Optional[int] = None) -> None:
        self.fill = fill
        self.tile = T = level0.tile
        if T % 2:
            raise ValueError(f"label pyramid: the tile edge must be even, got {T}")
        self.levels = [level0] + [
            TileSpool(str(Path(tmp_dir) / f".level{i}.spool.tmp"), T, w, h, np.uint8, fill=fill)
            for i, (w, h) in enumerate(level_sizes(level0.width, level0.height, T)) if i]
        self._lock = threading.Condition()
        self._final = [np.zeros(s.rows, bool) for s in self.levels]  # tile rows in the spool, final
        self._next0 = 0  # the next level-0 tile row to vote up
        self._queued = False  # a pump task is queued or running
        self._pending: List[Optional[_Rows]] = [None] * len(self.levels)  # a level's rows waiting to be voted up
        self.vote_rows = max(2, T // 2) if vote_rows is None else vote_rows
        self._strip: List[Optional[np.ndarray]] = [None] * len(self.levels)  # a level's tile row being filled
        self._active: List[np.ndarray] = [np.zeros(s.cols, bool) for s in self.levels]  # ... and its columns to store
        self._sinks: dict = {}  # level -> [sink(rows)]
        self._strips0: dict = {}  # level-0 row -> the stitcher's strip of its tiles
        self._error: Optional[BaseException] = None
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wsss-pyramid")
        # NB: the next level-0 row is read (inflated, on the late path) and voted on a second thread
        # while the levels above are made from this one (under GIL contention, half the hand-overs each)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="wsss-pyramid-read")
        self._ahead: dict = {}  # level-0 row -> Future of (its _Rows, their parents)
        self._waiting: Optional[np.ndarray] = None
        if expected is not None:
            assert expected.shape == (level0.rows, level0.cols), (expected.shape, level0.rows, level0.cols)
            self._waiting = (expected > 0).sum(axis=1)  # level-0 tiles still to come, per row
            # NB: rows no tile will come to are final now, but voted up only from the first
            # tiles_stored (or finish) on: watch_rows may still be called until then
            self._final[0][self._waiting == 0] = True

    def tile_stored(self, row: int, col: int) -> None:
        """Level-0 tile (row, col) is in the spool, final."""
        self.tiles_stored(row, [col])

    def tiles_stored(self, row: int, cols: Sequence[int], strip: Optional[np.ndarray] = None) -> None:
        """OutputTiles' callback: level-0 tiles ``cols`` of ``row`` are in the spool, final (one
        lock acquisition for all of them).  strip: the row's tiles [cols, T, T] they were stored
        from (fill where none will be; kept, not copied: the stitcher never writes a stored tile
        again), so the pyramid need not read them back."""
        if self._waiting is None or not len(cols):
            return
        with self._lock:
            if strip is not None and (row in self._strips0 or len(self._strips0) < self.KEPT_STRIPS):
                self._strips0[row] = strip  # (more rows behind: read back from the spool, memory bounded)
            self._waiting[row] -= len(cols)
            if self._waiting[row] == 0:
                self._final[0][row] = True
                self._lock.notify_all()  # (iter_final_compressed)
            self._kick()

    def watch_rows(self, level: int, sink) -> None:
        """``sink(rows)`` gets every row of ``level`` (uint8 [n, width]), in order, as they are
        made (on the pyramid's thread: it must not wait for the pyramid).  Call it before the
        first level-0 row is final.  An exception in the sink fails the pyramid (``finish``)."""
        with self._lock:
            if self._next0 or self._queued:
                raise RuntimeError("label pyramid: watch_rows() after rows were voted")
            self._sinks.setdefault(level, []).append(sink)

    def finish(self) -> List[TileSpool]:
        """Every level, complete (waits for the rows in flight; builds the rest)."""
        with self._lock:
            self._final[0][:] = True  # NB: with expected, every tile is stored by now
            self._lock.notify_all()
            self._kick()
            # NB: every level-0 row voted up (and handed to its sinks), every level's tile rows stored
            while (self._next0 < self.levels[0].rows or not all(f.all() for f in self._final)) and self._error is None:
                self._lock.wait()
            if self._error is not None:
                raise self._error
        return self.levels

    def iter_final_compressed(self, level: int) -> Iterator[bytes]:
        """``levels[level].iter_compressed()``, each tile row as soon as it is final (waits for
        it): the label TIFF written while the tiles run.  Raises if the pyramid fails or closes first."""
        spool = self.levels[level]
        for r in range(spool.rows):
            with self._lock:
                while not self._final[level][r] and self._error is None and not self._closed:
                    self._lock.wait()
                if self._error is not None:
                    raise self._error
                if not self._final[level][r]:
                    raise RuntimeError("label pyramid closed before it was complete")
            yield from spool.iter_compressed([r])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._reader.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "LabelPyramid":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the worker ---------------------------------------------------------------------
    def _kick(self) -> None:  # NB: holds self._lock
        """Start the worker if the next level-0 row is final and it is idle."""
        r = self._next0
        if not self._queued and not self._closed and r < len(self._final[0]) and self._final[0][r]:
            self._queued = True
            self._pool.submit(self._pump)

    def _pump(self) -> None:
        """Vote up the final level-0 rows, in order, while the next one is final."""
        while True:
            with self._lock:
                r = self._next0
                if r >= len(self._final[0]) or not self._final[0][r] or self._error is not None or self._closed:
                    self._queued = False
                    return
            try:
                ahead = self._ahead.pop(r, None)
                dense, up = ahead.result() if ahead is not None else self._read_and_vote(r)
                ahead = None
                with self._lock:  # the next row read and voted on a thread of its own meanwhile
                    if r + 1 < len(self._final[0]) and self._final[0][r + 1] and not self._closed:
                        self._ahead[r + 1] = self._reader.submit(self._read_and_vote, r + 1)
                for sink in self._sinks.get(0, ()):
                    sink(dense)
                dense = None
                if up is not None:
                    self._push(1, up)
                up = None
            except BaseException as e:  # noqa: B036 - handed to finish(), which raises it
                with self._lock:
                    self._error = self._error or e
                    self._queued = False
                    self._lock.notify_all()
                return
            with self._lock:
                self._next0 = r + 1
                self._lock.notify_all()  # (finish)

    def _read_and_vote(self, r: int) -> tuple:
        """Level-0 tile row ``r`` for its sinks (None: it has none) and its parents (None: no
        level above): the largest read and vote, made on the reader thread while the pyramid
        thread takes the levels above.  NB: the row itself is not kept (T x width bytes)."""
        rows = self._level0_rows(r)
        dense = self._dense(0, rows) if self._sinks.get(0) else None
        up = self._vote(0, rows, rows.y0 + rows.n == self.levels[0].height) if len(self.levels) > 1 else None
        return dense, up

    def _level0_rows(self, r: int) -> _Rows:
        """Tile row ``r`` of level 0: the window of its stored tiles, from the strip the stitcher
        stored them from (``tiles_stored``) or read back in one call."""
        spool, T = self.levels[0], self.tile
        n = min(T, spool.height - r * T)
        active = np.array([(r, c) in spool for c in range(spool.cols)])
        with self._lock:
            strip = self._strips0.pop(r, None)
        if not active.any():
            return _Rows(r * T, n, 0, None, None)
        c0, c1 = int(np.argmax(active)), len(active) - int(np.argmax(active[::-1]))
        if strip is None:
            strip = np.empty((c1 - c0, T, T), np.uint8)
            spool.get_many([(r, c) for c in range(c0, c1)], strip)
        else:
            strip = strip[c0:c1]
        return _Rows(r * T, n, c0, strip.transpose(1, 0, 2).reshape(T, (c1 - c0) * T)[:n], active)

    def _push(self, level: int, rows: _Rows) -> None:
        """``rows`` of ``level`` (>= 1) are final: hand them to its sinks, put them in its tile
        row (stored once complete) and vote them up into the level above."""
        spool = self.levels[level]
        last = rows.y0 + rows.n == spool.height
        for sink in self._sinks.get(level, ()):
            sink(self._dense(level, rows))
        self._fill_strip(level, rows, last)
        if level + 1 == len(self.levels):
            return
        # rows wait for more of their tile row (fewer, larger votes: each call gives up the GIL)
        # until vote_rows of them are in, the tile row or the level ends; an odd row left over
        # waits for its pair (the level's last row pairs with itself)
        pending = self._pending[level]
        if pending is not None:
            rows = self._concat(pending, rows)
        self._pending[level] = None
        if not last and rows.n < self.vote_rows and (rows.y0 + rows.n) % self.tile:
            self._pending[level] = rows
            return
        if rows.n % 2 and not last:
            self._pending[level] = self._take_last(rows)
            rows = self._drop_last(rows)
        if rows.n:
            self._push(level + 1, self._vote(level, rows, last))

    def _vote(self, level: int, rows: _Rows, last: bool) -> _Rows:
        """The parents of ``rows`` (an even number of them, or the level's last rows), edges
        repeated as in the class docstring.  After the level's last rows the parents run on to
        the end of their tile row: its padding, voted from the last row repeated."""
        below, above, T = self.levels[level], self.levels[level + 1], self.tile
        y_up, n_up = rows.y0 // 2, -(-rows.n // 2)
        if rows.data is None:
            return _Rows(y_up, n_up, 0, None, None)
        n_out = -(-(y_up + n_up) // T) * T - y_up if last else n_up
        p0, p1 = rows.c0 // 2, -(-(rows.c0 + rows.data.shape[1] // T) // 2)  # parent tile columns
        x0, x1 = 2 * p0 * T, 2 * p1 * T  # the children's pixel columns
        a = rows.c0 * T - x0
        if a == 0 and rows.data.shape[1] == x1 - x0 and 2 * n_out == rows.n and x1 <= below.width:
            block = rows.data[:rows.n]  # (pairs of whole tiles, no edge: voted as they are)
        else:
            block = np.full((2 * n_out, x1 - x0), self.fill, np.uint8)
            block[:rows.n, a:a + rows.data.shape[1]] = rows.data[:rows.n]
            if 2 * n_out > rows.n:  # past the bottom edge: the last valid row
                block[rows.n:] = block[rows.n - 1:rows.n]
            if x1 > below.width:  # past the right edge: the last valid column
                block[:, below.width - x0:] = block[:, below.width - x0 - 1:below.width - x0]
        parents = downsample_majority(block)
        active = np.zeros(above.cols, bool)
        act = rows.active[:2 * (len(rows.active) // 2)].reshape(-1, 2).any(axis=1)
        active[:len(act)] = act
        if len(rows.active) % 2:
            active[len(act)] |= rows.active[-1]
        return _Rows(y_up, n_up, p0, parents, active)

    def _dense(self, level: int, rows: _Rows) -> np.ndarray:
        """uint8 [n, width] of ``rows``."""
        spool, T = self.levels[level], self.tile
        out = np.full((rows.n, spool.width), self.fill, np.uint8)
        if rows.data is not None:
            x0 = rows.c0 * T
            x1 = min(spool.width, x0 + rows.data.shape[1])
            out[:, x0:x1] = rows.data[:rows.n, :x1 - x0]
        return out

    def _concat(self, a: _Rows, b: _Rows) -> _Rows:
        """Rows ``a`` then ``b`` (consecutive rows of one tile row)."""
        T, n = self.tile, a.n + b.n
        if a.data is None and b.data is None:
            return _Rows(a.y0, n, 0, None, None)
        parts = [p for p in (a, b) if p.data is not None]
        c0 = min(p.c0 for p in parts)
        c1 = max(p.c0 + p.data.shape[1] // T for p in parts)
        data = np.full((n, (c1 - c0) * T), self.fill, np.uint8)
        for p, y in ((a, 0), (b, a.n)):
            if p.data is not None:
                x = (p.c0 - c0) * T
                data[y:y + p.n, x:x + p.data.shape[1]] = p.data[:p.n]
        active = np.logical_or.reduce([p.active for p in parts])
        return _Rows(a.y0, n, c0, data, active)

    @staticmethod
    def _take_last(rows: _Rows) -> _Rows:
        data = None if rows.data is None else rows.data[rows.n - 1:rows.n].copy()
        return _Rows(rows.y0 + rows.n - 1, 1, rows.c0, data, rows.active)

    @staticmethod
    def _drop_last(rows: _Rows) -> _Rows:
        data = None if rows.data is None else rows.data[:rows.n - 1]
        return _Rows(rows.y0, rows.n - 1, rows.c0, data, rows.active)

    def _fill_strip(self, level: int, rows: _Rows, last: bool) -> None:
        """Put ``rows`` in the level's tile row; store it once complete."""
        spool, T = self.levels[level], self.tile
        r, y = divmod(rows.y0, T)
        if rows.data is not None:
            if self._strip[level] is None:
                self._strip[level] = np.full((spool.cols, T, T), self.fill, np.uint8)
            strip = self._strip[level]  # tile-major [cols, T, T]: each tile contiguous for put_many
            w = rows.data.shape[1] // T  # (the last rows come with their tile row's padding)
            strip[rows.c0:rows.c0 + w, y:y + len(rows.data)] = rows.data.reshape(len(rows.data), w, T).transpose(1, 0, 2)
            self._active[level] |= rows.active
        if y + rows.n < T and not last:
            return
        strip, active = self._strip[level], np.flatnonzero(self._active[level])
        self._strip[level] = None
        self._active[level] = np.zeros(spool.cols, bool)
        if strip is not None and len(active):
            spool.put_many(r, active.tolist(), strip, at=active.tolist())
        with self._lock:
            self._final[level][r] = True
            self._lock.notify_all()


def build_label_pyramid(level0: TileSpool, tmp_dir: Path, *, fill: int) -> List[TileSpool]:
    """Spools for levels 1.. of a complete level-0 spool (see LabelPyramid)."""
    with LabelPyramid(level0, tmp_dir, fill=fill) as pyramid:
        return pyramid.finish()


def palette_lut(palette: Sequence[Sequence[int]], background_index: int) -> np.ndarray:
    """uint8 [256, 3]: each label value's colour in every output (label TIFF, overlay, areas,
    GeoJSON); background and values the palette does not list are white."""
    lut = np.full((256, 3), 255, np.uint8)
    for i, rgb in enumerate(palette):
        if i < 256 and i != background_index:
            lut[i] = rgb[:3]
    return lut


def _colormap(palette: Sequence[Sequence[int]], background_index: int) -> np.ndarray:
    """uint16 [3, 256] TIFF colormap of ``palette_lut``."""
    return palette_lut(palette, background_index).T.astype(np.uint16) * 257


def write_label_tiff(path: Path, levels: List[TileSpool], *, mpp: float, palette, background_index: int,
                     class_names: Sequence[str], tiles=None) -> None:
    """The pyramidal palette TIFF (atomically).  mpp: microns per level-0 pixel.  tiles(i): the
    zlib tiles of level i in raster order (default: as stored; LabelPyramid.iter_final_compressed
    writes each row once it is final)."""
    import tifffile

    T = levels[0].tile
    cmap = _colormap(palette, background_index)
    nbytes = sum(s.width * s.height for s in levels)
    description = json.dumps({"wsss": "labels", "classes": list(class_names),
                              "background_index": background_index, "mpp": mpp})
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=nbytes > 2**31) as tif:
            for i, spool in enumerate(levels):
                level_mpp = mpp * 2 ** i  # (level i halves level i - 1, rounding up)
                res = 1e4 / level_mpp  # pixels per centimetre
                tif.write(
                    spool.iter_compressed() if tiles is None else tiles(i), shape=(spool.height, spool.width),
                    dtype=np.uint8,
                    tile=(T, T), photometric="palette", colormap=cmap, compression="zlib",
                    resolution=(res, res), resolutionunit="CENTIMETER",
                    subfiletype=0 if i == 0 else 1, description=description if i == 0 else None,
                    metadata=None, software="wsss",
                )


def write_probs_tiff(path: Path, spool: TileSpool, *, mpp: float, class_names: Sequence[str]) -> None:
    """float16 [K, H, W] class probabilities, tiled, planar (one plane per class).

    NB: the spool's streams are the TIFF's tiles as they are (zlib, no predictor): the file is
    written without inflating or deflating anything (3000x2600 px, 6 classes: 2.47 -> 0.04 s;
    the file ~10% larger, at the spool's zlib level 1)."""
    import tifffile

    def tiles():
        for k in range(spool.channels):
            yield from spool.iter_compressed(channel=k)

    res = 1e4 / mpp
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=spool.width * spool.height * spool.channels * 2 > 2**31) as tif:
            tif.write(tiles(), shape=(spool.channels, spool.height, spool.width), dtype=np.float16,
                      tile=(spool.tile, spool.tile), photometric="minisblack", planarconfig="separate",
                      compression="zlib", predictor=False, resolution=(res, res), resolutionunit="CENTIMETER",
                      description=json.dumps({"wsss": "class probabilities (blended, gated)",
                                              "classes": list(class_names), "mpp": mpp}),
                      metadata=None, software="wsss")


OVERVIEW_MAX_PX = 1024  # overlay / QC pictures: longest side at most this
POLYGON_MIN_MPP = 2.0  # GeoJSON outlines: traced at >= 2 um per pixel (about a fifth of a cell) ...
POLYGON_MAX_PIXELS = 2048 * 2048  # ... and from at most this many label pixels


def level_sizes(width: int, height: int, tile: int) -> List[tuple]:
    """(width, height) of each label pyramid level: halved (rounding up) until one tile covers it."""
    sizes = [(width, height)]
    while max(sizes[-1]) > tile:
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    return sizes


def overview_level(sizes: List[tuple], max_px: int = OVERVIEW_MAX_PX) -> int:
    """Index of the finest level (sizes: level_sizes) whose longest side is <= max_px (else the coarsest)."""
    return next((i for i, wh in enumerate(sizes) if max(wh) <= max_px), len(sizes) - 1)


def polygon_level(levels: List[TileSpool], mpp: float, *, min_mpp: float = POLYGON_MIN_MPP,
                  max_pixels: int = POLYGON_MAX_PIXELS) -> int:
    """Index of the finest level at >= min_mpp microns/pixel (within 5%: the tolerance of
    wsss.slide.plan_scale, which reads a 0.499 um/px scan as is for a 0.5 um/px model) with
    <= max_pixels pixels.

    NB: tracing level 0 costs seconds even on small slides (marching squares assembles rings
    in Python) and gives QuPath outlines finer than the model's own resolution; the
    majority-vote level at ~2 um/px keeps outlines at cell scale with bounded cost.  (With a
    0.1% slack the 0.499 um/px grid's 1.996 um/px level was passed over for 3.99 um/px.)
    """
    for i, s in enumerate(levels):
        level_mpp = mpp * 2 ** i
        if level_mpp >= min_mpp * 0.95 and s.width * s.height <= max_pixels:
            return i
    return len(levels) - 1


# --------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------
def palette_image(labels: np.ndarray, palette, background_index: int) -> np.ndarray:
    """uint8 [h, w, 3] colour picture of labels (``palette_lut``: background and unknown values white)."""
    return palette_lut(palette, background_index)[labels]


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        # NB: fast zlib level; these are previews, size matters less than seconds
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)


def write_overlay(path: Path, thumb: np.ndarray, labels: np.ndarray, palette, background_index: int,
                  alpha: float = 0.45, class_names: Optional[Sequence[str]] = None) -> None:
    """Slide thumbnail with class colours blended in where a class was assigned (left), beside
    the class colours alone (right), with a legend strip below them where ``class_names`` are
    given; labels of another size are resized to the thumbnail's."""
    from PIL import Image

    h, w = thumb.shape[:2]
    if labels.shape != (h, w):
        labels = np.asarray(Image.fromarray(labels).resize((w, h), resample=Image.NEAREST))
    with OverlayWriter(path, w, h, palette, background_index, alpha=alpha, class_names=class_names) as out:
        out.set_thumbnail(thumb)
        out.add_labels(labels)
        out.finish()


class OverlayWriter:
    """overlay.png (see ``write_overlay``) encoded row by row as its inputs arrive: label rows
    in order (``add_labels``: the runner hands it the overview level's rows as the pyramid makes
    them) and the thumbnail, whole (``set_thumbnail``) or as a source whose leading rows are
    complete (``watch_thumbnail``: a TileThumbnail summed from the tiles).  Every row both
    inputs have is blended and compressed at once, on whichever thread brought the last piece,
    so after the last tile only the last rows are left to do (at 32768^2 on an H100 the overlay
    took 0.63 s of that tail).

    With ``class_names``, a legend strip (a colour swatch and the name of each class) follows
    the rows, so the picture reads without areas.json beside it; its height is known from the
    start (the PNG header comes first).

    NB: the PNG is written here, not by PIL, because PIL cannot take an image a band at a time.
    It is a plain 8-bit RGB PNG: each row with the Sub filter (the byte three to the left
    subtracted, which suits both a photograph and flat colours), zlib level 1 (a preview: size
    matters less than seconds).  Written to a temporary name next to ``path`` and moved there
    by ``finish``; ``close`` without ``finish`` deletes it.
    """

    def __init__(self, path: Path, width: int, height: int, palette, background_index: int, *,
                 alpha: float = 0.45, class_names: Optional[Sequence[str]] = None) -> None:
        import zlib

        self.path, self.width, self.height = Path(path), int(width), int(height)
        self.background_index = background_index
        self._lut = palette_lut(palette, background_index)
        self._legend = None if not class_names else legend_strip(class_names, palette, 2 * self.width)
        self._weight = np.uint16(round(alpha * 256))
        self._labels: List[np.ndarray] = []  # label rows received, not yet written
        self._label_rows = 0
        self._thumb: Optional[np.ndarray] = None
        self._thumb_source = None
        self._written = 0
        self._error: Optional[OSError] = None
        self._lock = threading.Lock()
        self._zlib = zlib.compressobj(1)
        self._compressed = bytearray()  # (not yet in an IDAT chunk)
        fd, tmp = files.new_temp_file(self.path.parent, f".{self.path.name}.{temp_tag()}.", ".tmp")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        total_height = self.height + (0 if self._legend is None else len(self._legend))
        self._chunk(b"IHDR", np.array([2 * self.width, total_height], ">u4").tobytes() + bytes([8, 2, 0, 0, 0]))

    def set_thumbnail(self, thumb: np.ndarray) -> None:
        """The whole thumbnail, uint8 [h, w, 3] (box-resized to the overlay's size if it differs)."""
        from PIL import Image

        if thumb.shape[:2] != (self.height, self.width):
            thumb = np.asarray(Image.fromarray(thumb).resize((self.width, self.height), resample=Image.BOX))
        with self._lock:
            self._thumb = thumb
            self._advance()

    def watch_thumbnail(self, source) -> None:
        """``source.rows_done`` (complete leading rows) and ``source.rows(r0, r1)`` (uint8
        [r1 - r0, width, 3]): call ``thumbnail_rows`` whenever rows_done grows."""
        with self._lock:
            self._thumb_source = source
            self._advance()

    def thumbnail_rows(self) -> None:
        """The thumbnail source has more complete rows."""
        with self._lock:
            self._advance()

    def add_labels(self, rows: np.ndarray) -> None:
        """The next rows of the overlay's labels, uint8 [n, width]."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.width or self._label_rows + len(rows) > self.height:
            raise ValueError(f"overlay: label rows [n, {self.width}] for {self.height} rows, got {list(rows.shape)} "
                             f"after {self._label_rows}")
        with self._lock:
            self._labels.append(rows)
            self._label_rows += len(rows)
            self._advance()

    def finish(self) -> None:
        """Write the end of the file and move it into place (every row must have come)."""
        with self._lock:
            if self._written != self.height:
                raise RuntimeError(f"overlay: {self._written} of {self.height} rows written "
                                   f"({self._label_rows} label rows, thumbnail {'set' if self._thumb is not None else 'not set'})")
            if self._legend is not None:
                self._idat(self._zlib.compress(_sub_filtered(self._legend)))
            self._idat(self._zlib.flush(), last=True)
            self._chunk(b"IEND", b"")
            if self._error is not None:
                raise self._error
            self._file.close()
            os.replace(self._tmp, self.path)

    def close(self) -> None:
        """Delete the file unless ``finish`` moved it into place."""
        with self._lock:
            if not self._file.closed:
                self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)

    def __enter__(self) -> "OverlayWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _chunk(self, kind: bytes, data: bytes) -> None:
        """Write one PNG chunk.  NB: a failed write (a full disk) is kept and raised by ``finish``,
        where the runner names the file: not on the pyramid's or a reader's thread, whose work
        it is not."""
        import zlib

        if (kind == b"IDAT" and not data) or self._error is not None:
            return
        try:
            if kind == b"IHDR":
                self._write(b"\x89PNG\r\n\x1a\n")
            self._write(len(data).to_bytes(4, "big") + kind + data + zlib.crc32(data, zlib.crc32(kind)).to_bytes(4, "big"))
        except OSError as e:
            self._error = e

    def _write(self, data: bytes) -> None:
        self._file.write(data)

    def _advance(self) -> None:  # NB: holds self._lock
        """Encode every row both inputs have."""
        thumb_rows = self.height if self._thumb is not None else \
            self._thumb_source.rows_done if self._thumb_source is not None else 0
        r0, r1 = self._written, min(self._label_rows, thumb_rows)
        if r1 <= r0:
            return
        labels = self._labels[0] if len(self._labels) == 1 else np.concatenate(self._labels)
        self._labels = [labels[r1 - r0:]] if r1 - r0 < len(labels) else []
        labels = labels[:r1 - r0]
        thumb = self._thumb[r0:r1] if self._thumb is not None else self._thumb_source.rows(r0, r1)
        colour = self._lut[labels]
        # NB: integer blend (weight 0 keeps a background pixel as it is): no float copies
        weight = np.where(labels != self.background_index, self._weight, np.uint16(0))[..., None]
        blend = thumb.astype(np.uint16)
        blend *= 256 - weight
        blend += colour * weight
        blend >>= 8
        w3 = 3 * self.width
        raw = np.empty((r1 - r0, 1 + 2 * w3), np.uint8)
        raw[:, 1:1 + w3] = blend.reshape(r1 - r0, w3)
        raw[:, 1 + w3:] = colour.reshape(r1 - r0, w3)
        self._idat(self._zlib.compress(_sub_filtered(raw, filled=True)))
        self._written = r1

    IDAT_BYTES = 1 << 16

    def _idat(self, data: bytes, last: bool = False) -> None:
        """Compressed bytes into IDAT chunks of IDAT_BYTES each (the last one shorter), so the
        file does not depend on how the rows arrived (the same zlib stream either way)."""
        self._compressed += data
        n = len(self._compressed) if last else len(self._compressed) // self.IDAT_BYTES * self.IDAT_BYTES
        for i in range(0, n, self.IDAT_BYTES):
            self._chunk(b"IDAT", bytes(self._compressed[i:min(n, i + self.IDAT_BYTES)]))
        del self._compressed[:n]


def _sub_filtered(rows: np.ndarray, filled: bool = False) -> np.ndarray:
    """PNG scanlines of RGB ``rows`` (uint8 [n, w, 3]) with the Sub filter: a filter byte, then
    each byte minus the one three to its left (mod 256).  ``filled``: ``rows`` already is
    [n, 1 + 3w] with the pixels from column 1 (filtered in place)."""
    if filled:
        raw = rows
    else:
        raw = np.empty((len(rows), 1 + rows.shape[1] * 3), np.uint8)
        raw[:, 1:] = rows.reshape(len(rows), -1)
    raw[:, 0] = 1
    raw[:, 4:] -= raw[:, 1:-3].copy()
    return raw


def legend_strip(class_names: Sequence[str], palette, width: int) -> np.ndarray:
    """uint8 [h, width, 3]: a white strip with a colour swatch and the name of each class, left
    to right, wrapped onto more lines where ``width`` is too narrow (the overlay's legend).

    NB: DejaVu Sans where the machine has it (most Linux systems), else PIL's built-in font (a
    scalable one since Pillow 10.1, else its bitmap font), which has ASCII only: other letters
    (Ñ, µ) came out as boxes.  The text is sized to the picture (11-28 px)."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(min(28, max(11, width // 60)))
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # (Pillow < 10.1)
            font = ImageFont.load_default()
    pad, gap = max(4, size // 2), size
    line_h = size + pad
    entries, x, lines = [], pad, 1
    for k, name in enumerate(class_names):
        name = " ".join(str(name).split())  # (a line break in a name failed the layout, and the slide)
        text_w = int(math.ceil(font.getlength(name)))
        entry_w = size + pad // 2 + text_w
        if x > pad and x + entry_w > width - pad:
            x, lines = pad, lines + 1
        entries.append((x, pad + (lines - 1) * line_h, k, name))
        x += entry_w + gap
    img = Image.new("RGB", (int(width), pad + lines * line_h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for x, y, k, name in entries:
        colour = tuple(int(v) for v in palette[k])
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=colour, outline=(96, 96, 96))
        if isinstance(font, ImageFont.FreeTypeFont):
            draw.text((x + size + pad // 2, y + size / 2), name, fill=(0, 0, 0), font=font, anchor="lm")
        else:  # (the bitmap font takes no anchor)
            draw.text((x + size + pad // 2, y), name, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def inner_boundary(mask: np.ndarray) -> np.ndarray:
    """bool [h, w]: pixels of ``mask`` with a 4-neighbour outside it (image edges do not count).

    Same as skimage.segmentation.find_boundaries(mask, mode="inner") for a binary mask, in a
    few vectorised shifts (NB: that function alone costs seconds of scipy import + work).
    """
    m = np.asarray(mask, bool)
    interior = m.copy()
    interior[1:] &= m[:-1]
    interior[:-1] &= m[1:]
    interior[:, 1:] &= m[:, :-1]
    interior[:, :-1] &= m[:, 1:]
    return m & ~interior


def _resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    if mask.shape == (h, w):
        return mask.astype(bool, copy=False)
    ys = (np.arange(h) * mask.shape[0] // h).clip(0, mask.shape[0] - 1)
    xs = (np.arange(w) * mask.shape[1] // w).clip(0, mask.shape[1] - 1)
    return mask.astype(bool, copy=False)[ys[:, None], xs[None, :]]


QC_TISSUE, QC_TILES, QC_DIMMED = (0, 200, 0), (40, 90, 255), (141, 141, 141)


def write_tissue_qc(path: Path, thumb: np.ndarray, mask: np.ndarray, tiles_box: Optional[np.ndarray] = None,
                    legend: bool = True) -> None:
    """Thumbnail with non-tissue dimmed and the tissue outline in green; processed tiles outlined
    blue; below it (``legend``) a strip saying which is which."""
    h, w = thumb.shape[:2]
    mask = _resize_mask(mask, h, w)
    # NB: integer blend 0.45 x pixel + 0.55 x grey off the tissue (a LUT per pixel value; no
    # float copy and no boolean gather of the thumbnail)
    if mask.all():  # (no tissue detection)
        out = thumb.copy()
    else:
        dimmed = ((np.arange(256, dtype=np.uint16) * 115 + 141 * 128) >> 8).astype(np.uint8)
        out = np.where(mask[..., None], thumb, dimmed[thumb])
    if tiles_box is not None:
        out[inner_boundary(_resize_mask(tiles_box, h, w))] = QC_TILES
    out[inner_boundary(mask)] = QC_TISSUE
    if legend:
        names, colours = ["tissue found"], [QC_TISSUE]
        if tiles_box is not None:
            names, colours = names + ["tiles run"], colours + [QC_TILES]
        if not mask.all():
            names, colours = names + ["not tissue (dimmed)"], colours + [QC_DIMMED]
        out = np.concatenate([out, legend_strip(names, colours, w)])
    _save_png(path, out)


# --------------------------------------------------------------------------------------
# Tables and shapes
# --------------------------------------------------------------------------------------
def class_areas(class_pixels: np.ndarray, *, mpp: float, class_names: Sequence[str], background_index: int,
                palette: Optional[Sequence] = None) -> dict:
    """Per class: pixels, area in mm2, % of tissue (tissue = every non-background pixel) and,
    with ``palette``, the colour the overlay and the label TIFF give it ("#rrggbb").

    Areas are rounded to 1e-9 mm2 (0.001 um2, far below a pixel) and percentages to 1e-6, so the
    JSON shows 0.052262, not the product's 0.052261999999999996; ``pixels`` are exact."""
    px_mm2 = (mpp * 1e-3) ** 2
    mm2 = lambda n: round(n * px_mm2, 9)  # noqa: E731
    tissue = int(sum(int(class_pixels[k]) for k in range(len(class_names)) if k != background_index))
    rows = []
    lut = None if palette is None else palette_lut(palette, background_index)
    for k, name in enumerate(class_names):
        if k == background_index:
            continue
        n = int(class_pixels[k])
        rows.append({"index": k, "class": name, "pixels": n, "area_mm2": mm2(n),
                     "percent_of_tissue": round(100.0 * n / tissue, 6) if tissue else 0.0})
        if lut is not None:
            rows[-1]["colour"] = "#%02x%02x%02x" % tuple(int(v) for v in lut[k])
    return {"mpp": mpp, "pixel_area_mm2": px_mm2, "tissue_pixels": tissue, "tissue_area_mm2": mm2(tissue),
            "background_pixels": int(class_pixels[background_index]) if background_index < 256 else 0,
            "classes": rows}


def write_areas(json_path: Path, csv_path: Path, areas: dict) -> None:
    write_json_atomic(json_path, areas)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    colours = all("colour" in row for row in areas["classes"])
    writer.writerow(["index", "class", "pixels", "area_mm2", "percent_of_tissue"] + (["colour"] if colours else []))
    for row in areas["classes"]:
        writer.writerow([row["index"], row["class"], row["pixels"], f"{row['area_mm2']:.6f}",
                         f"{row['percent_of_tissue']:.3f}"] + ([row["colour"]] if colours else []))
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")  # (class names may be any text)


def label_polygons(labels: np.ndarray, class_index: int, *, scale: float, simplify: float = 0.4,
                   min_area_px: int = 4, extent: Optional[tuple] = None, slab_rows: Optional[int] = None):
    """shapely MultiPolygon (or None) of the pixels equal to class_index, in units of ``scale``
    x label pixels: wsss.runner.outlines (traced in slabs of ``slab_rows`` rows) for one class."""
    from wsss.runner.outlines import SLAB_ROWS, trace_outlines

    return trace_outlines(labels, [class_index], slab_rows=slab_rows or SLAB_ROWS, scale=scale, simplify=simplify,
                          min_area_px=min_area_px, extent=extent, threads=1)[class_index]


def geojson_extent(bounds: Optional[tuple], scale: float) -> Optional[tuple]:
    """label_polygons' extent of a slide ``bounds`` (width, height) in output units."""
    return None if bounds is None else (bounds[0] / scale, bounds[1] / scale)


def write_geojson(path: Path, labels: np.ndarray, *, scale: float, class_names: Sequence[str], palette,
                  background_index: int, min_area_px: int = 4, bounds: Optional[tuple] = None,
                  threads: Optional[int] = None, slab_rows: Optional[int] = None) -> int:
    """QuPath-style FeatureCollection of a label map: one annotation per class (see
    write_geojson_features).  Returns the number of features.

    bounds: (width, height) of the slide in output coordinates: outlines end at its edges (the
    last label pixel of a row reaches past the slide's edge; see outlines' extent).
    threads: slabs traced at once (None: one per core); the file is the same whatever the number."""
    from wsss.runner.outlines import SLAB_ROWS, trace_outlines

    classes = [k for k in range(len(class_names)) if k != background_index]
    geoms = trace_outlines(labels, classes, slab_rows=slab_rows or SLAB_ROWS, scale=scale, min_area_px=min_area_px,
                           extent=geojson_extent(bounds, scale), threads=threads, output="geojson")
    return write_geojson_features(path, geoms, class_names=class_names, palette=palette, threads=threads)


def write_geojson_features(path: Path, geoms: dict, *, class_names: Sequence[str], palette,
                           threads: Optional[int] = None) -> int:
    """The FeatureCollection of {class index: MultiPolygon, its GeoJSON geometry text (see
    OutlineBuilder's output="geojson"), or None} (atomically), in class order; returns the
    number of features (empty classes have none).

    NB: GEOS writes the coordinates (shortest round-trip floats, as json would) in C, releasing
    the GIL: the classes given as geometries are serialised on threads."""
    def text_of(g) -> str:
        if isinstance(g, str):
            return g
        import shapely  # (not for texts: the GPU path's first slide need not import it after its last tile)

        return shapely.to_geojson(g)

    classes = sorted(k for k, g in geoms.items() if g is not None and (isinstance(g, str) or not g.is_empty))
    workers = min(sum(not isinstance(geoms[k], str) for k in classes), threads or os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="wsss-geojson") as pool:
            texts = list(pool.map(lambda k: text_of(geoms[k]), classes))
    else:
        texts = [text_of(geoms[k]) for k in classes]
    # NB: written piece by piece: the geometry texts are tens of MB for noisy labels, and
    # formatting them into one string copied them twice more (29 MB: 0.037 -> 0.011 s)
    lut = palette_lut(palette, -1)  # (the classes traced are never background)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for i, (k, text) in enumerate(zip(classes, texts)):
            name = class_names[k]
            props = {"objectType": "annotation", "name": name,
                     "classification": {"name": name, "color": [int(v) for v in lut[k]]}}
            f.write((", " if i else "") + '{"type": "Feature", "geometry": ')
            f.write(text)
            f.write(', "properties": %s}' % json.dumps(props))
        f.write("]}")
    return len(classes)

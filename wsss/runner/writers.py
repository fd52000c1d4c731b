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
import os
import shutil
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from wsss.runner.stitching import TileSpool

__all__ = [
    "atomic_path", "temp_tag", "remove_stale_temporaries", "write_json_atomic", "downsample_majority", "LabelPyramid", "build_label_pyramid",
    "read_tile_row", "LevelRowFeed", "write_label_tiff", "write_probs_tiff", "palette_image", "write_overlay", "write_tissue_qc", "inner_boundary",
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
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{temp_tag()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


class LabelPyramid:
    """Levels 1.. of a label spool (each half the size of the one below, until one tile covers
    it), built row by row as soon as the rows below are final.

    Row p of level L+1 is built (tiles in a thread pool: zlib and numpy release the GIL) once
    rows 2p and 2p+1 of level L hold every tile they ever will.  With ``expected`` (level-0
    pixels per tile, what the stitcher's OutputTiles waits for) the level-0 rows become final
    through ``tiles_stored`` while the tiles still run, so the pyramid is built during the tile
    stage on cores the model leaves idle (a GPU's host); without it, ``finish`` builds it all.
    Either way a level's bytes do not depend on the order its tiles were stored in, and every
    parent is made from final children: the same TIFF (tested).
    """

    TILES_PER_JOB = 4  # parent tiles per pool task, at least (see _submit_row)

    def __init__(self, level0: TileSpool, tmp_dir: Path, *, fill: int, threads: Optional[int] = None,
                 expected: Optional[np.ndarray] = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.fill = fill
        self.levels = [level0] + [
            TileSpool(str(Path(tmp_dir) / f".level{i}.spool.tmp"), level0.tile, w, h, np.uint8, fill=fill)
            for i, (w, h) in enumerate(level_sizes(level0.width, level0.height, level0.tile)) if i]
        self._lock = threading.Condition()
        self._final = [np.zeros(s.rows, bool) for s in self.levels]
        self._rows_to_build = sum(s.rows for s in self.levels[1:])
        self._error: Optional[BaseException] = None
        self._threads = threads or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=self._threads,
                                        thread_name_prefix="wsss-pyramid")
        self._waiting: Optional[np.ndarray] = None
        self._watchers: dict = {}  # level -> [callback(row)]
        self._closed = False
        if expected is not None:
            assert expected.shape == (level0.rows, level0.cols), (expected.shape, level0.rows, level0.cols)
            self._waiting = (expected > 0).sum(axis=1)  # level-0 tiles still to come, per row
            with self._lock:
                for r in np.flatnonzero(self._waiting == 0):
                    self._row_final(0, int(r))

    def tile_stored(self, row: int, col: int) -> None:
        """Level-0 tile (row, col) is in the spool, final."""
        self.tiles_stored(row, [col])

    def tiles_stored(self, row: int, cols: Sequence[int]) -> None:
        """OutputTiles' callback: level-0 tiles ``cols`` of ``row`` are in the spool, final (one
        lock acquisition for all of them)."""
        if self._waiting is None or not len(cols):
            return
        with self._lock:
            self._waiting[row] -= len(cols)
            if self._waiting[row] == 0:
                self._row_final(0, row)

    def watch(self, level: int, callback) -> None:
        """callback(row) once row ``row`` of ``level`` is final (in the spool), from whichever
        thread made it so (holding the pyramid's lock: it must only hand the row on), for rows
        already final at once."""
        with self._lock:
            self._watchers.setdefault(level, []).append(callback)
            for r in np.flatnonzero(self._final[level]):
                callback(int(r))

    def finish(self) -> List[TileSpool]:
        """Every level, complete (waits for the rows in flight; builds the rest)."""
        with self._lock:
            for r in range(self.levels[0].rows):
                self._row_final(0, r)  # NB: with expected, every tile is stored by now
            while self._rows_to_build and self._error is None:
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

    def __enter__(self) -> "LabelPyramid":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _row_final(self, level: int, row: int) -> None:  # NB: holds self._lock
        if self._final[level][row]:
            return
        self._final[level][row] = True
        self._lock.notify_all()  # (iter_final_compressed)
        for callback in self._watchers.get(level, ()):
            callback(row)
        if level + 1 < len(self.levels):
            rows = [r for r in (row - row % 2, row - row % 2 + 1) if r < self.levels[level].rows]
            if self._final[level][rows].all():
                self._submit_row(level + 1, row // 2)

    def _submit_row(self, level: int, row: int) -> None:  # NB: holds self._lock
        """Build row ``row`` of ``level`` in pieces of a few tiles on the pool, so that the last
        rows (the only work left once the tiles are done) use every pool thread; the piece that
        finishes last marks the row final."""
        below, spool = self.levels[level - 1], self.levels[level]
        # (a parent of four never-stored tiles is fill: so is this one, left unstored)
        cols = [c for c in range(spool.cols)
                if any((2 * row + i, 2 * c + j) in below for i in (0, 1) for j in (0, 1))]
        # runs of adjacent columns (a task's strip): one per pool thread, TILES_PER_JOB at least
        # (NB: wider strips, fewer numpy calls per parent tile: each gives up the GIL)
        per_job = max(self.TILES_PER_JOB, -(-len(cols) // self._threads))
        pieces: List[List[int]] = []
        for c in cols:
            if pieces and len(pieces[-1]) < per_job and c == pieces[-1][-1] + 1:
                pieces[-1].append(c)
            else:
                pieces.append([c])
        pieces = pieces or [[]]
        left = [len(pieces)]
        for piece in pieces:
            self._pool.submit(self._build_piece, level, row, piece, left)

    def _build_piece(self, level: int, row: int, cols: List[int], left: List[int]) -> None:
        try:
            below, spool = self.levels[level - 1], self.levels[level]
            _build_parents(below, spool, row, cols, fill=self.fill)
        except BaseException as e:  # noqa: B036 - handed to finish(), which raises it
            with self._lock:
                self._error = self._error or e
                self._lock.notify_all()
            return
        with self._lock:
            left[0] -= 1
            if left[0] == 0:
                self._rows_to_build -= 1
                self._row_final(level, row)
                self._lock.notify_all()


def read_tile_row(spool: TileSpool, row: int) -> np.ndarray:
    """The pixel rows of tile row ``row`` of a single-channel spool: [<= tile, width]."""
    T = spool.tile
    band = np.concatenate([spool.get(row, c) for c in range(spool.cols)], axis=1)
    return band[:min(T, spool.height - row * T), :spool.width]


class LevelRowFeed:
    """Hands the tile rows of one pyramid level, in order, to ``sink(rows)`` as they become
    final (on a thread of its own: a pyramid's callbacks must not wait).  ``finish`` waits
    for the last row; ``close`` stops it wherever it is."""

    def __init__(self, pyramid: "LabelPyramid", level: int, sink) -> None:
        self.spool = pyramid.levels[level]
        self.sink = sink
        self._next = 0
        self._final: set = set()
        self._error: Optional[BaseException] = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="wsss-rowfeed")
        pyramid.watch(level, self._row_final)

    def _row_final(self, row: int) -> None:
        with contextlib.suppress(RuntimeError):  # (closed: the run is over)
            self._thread.submit(self._pump, row)

    def _pump(self, row: int) -> None:
        if self._error is not None:
            return
        try:
            self._final.add(row)
            while self._next in self._final:
                self.sink(read_tile_row(self.spool, self._next))
                self._final.discard(self._next)
                self._next += 1
        except BaseException as e:  # noqa: B036 - raised by finish()
            self._error = e

    def finish(self) -> None:
        self._thread.shutdown(wait=True)
        if self._error is not None:
            raise self._error
        if self._next != self.spool.rows:
            raise RuntimeError(f"level rows fed: {self._next} of {self.spool.rows}")

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


def build_label_pyramid(level0: TileSpool, tmp_dir: Path, *, fill: int, threads: Optional[int] = None) -> List[TileSpool]:
    """Spools for levels 1.. of a complete level-0 spool (see LabelPyramid)."""
    with LabelPyramid(level0, tmp_dir, fill=fill, threads=threads) as pyramid:
        return pyramid.finish()


def _build_parents(below: TileSpool, spool: TileSpool, r: int, cols: Sequence[int], *, fill: int) -> None:
    """Tiles ``cols`` of row ``r`` of ``spool`` (sorted), by majority vote over 2x2 blocks of
    the level below.

    NB: one strip for the columns' range: the children are decompressed into it, voted on in one
    pass and split into tiles with one copy (per parent tile a handful of numpy calls fewer, each
    of which gives up the GIL and waits to take it back beside the runner's other threads)."""
    if not len(cols):
        return
    T = below.tile
    c0, c1 = cols[0], cols[-1] + 1
    # the children, tile-major [2, 2n, T, T], read and inflated in one call (fill where the level
    # below has no tile: past its edge or never stored), then laid out as one [2T, 2nT] block
    kids = np.empty((2, 2 * (c1 - c0), T, T), np.uint8)
    keys = [(2 * r + i, 2 * c0 + k) for i in (0, 1) for k in range(2 * (c1 - c0))]
    below.get_many(keys, kids.reshape(-1, T, T))
    block = kids.transpose(0, 2, 1, 3).reshape(2 * T, 2 * T * (c1 - c0))
    # NB: pixels past the edge of the level below are fill; mask them out of the vote
    # by copying the nearest valid pixel so an edge half-block is not outvoted by padding.
    vh = min(2 * T, below.height - 2 * r * T)
    vw = min(block.shape[1], below.width - 2 * c0 * T)
    if vh < 2 * T:
        block[vh:] = block[vh - 1:vh]
    if vw < block.shape[1]:
        block[:, vw:] = block[:, vw - 1:vw]
    parents = downsample_majority(block).reshape(T, c1 - c0, T).transpose(1, 0, 2).copy()
    spool.put_many(r, cols, parents, at=[c - c0 for c in cols])


def _colormap(palette: Sequence[Sequence[int]], background_index: int) -> np.ndarray:
    """uint16 [3, 256] TIFF colormap; unlisted values (incl. background) are white."""
    cmap = np.full((3, 256), 65535, np.uint16)
    for i, rgb in enumerate(palette):
        if i < 256:
            cmap[:, i] = np.asarray(rgb[:3], np.uint16) * 257
    return cmap


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
    """float16 [K, H, W] class probabilities, tiled, planar (one plane per class)."""
    import tifffile

    def tiles():
        for k in range(spool.channels):
            yield from spool.iter_tiles(channel=k)

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
    """Index of the finest level at >= min_mpp microns/pixel with <= max_pixels pixels.

    NB: tracing level 0 costs seconds even on small slides (marching squares assembles rings
    in Python) and gives QuPath outlines finer than the model's own resolution; the
    majority-vote level at ~2 um/px keeps outlines at cell scale with bounded cost.
    """
    for i, s in enumerate(levels):
        level_mpp = mpp * 2 ** i
        if level_mpp >= min_mpp * 0.999 and s.width * s.height <= max_pixels:
            return i
    return len(levels) - 1


# --------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------
def palette_image(labels: np.ndarray, palette, background_index: int) -> np.ndarray:
    """uint8 [h, w, 3] colour picture of labels (background and unknown values white)."""
    lut = np.full((256, 3), 255, np.uint8)
    for i, rgb in enumerate(palette):
        if i < 256 and i != background_index:
            lut[i] = rgb[:3]
    return lut[labels]


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        # NB: fast zlib level; these are previews, size matters less than seconds
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)


def write_overlay(path: Path, thumb: np.ndarray, labels: np.ndarray, palette, background_index: int,
                  alpha: float = 0.45) -> None:
    """Slide thumbnail with class colours blended in where a class was assigned."""
    from PIL import Image

    h, w = thumb.shape[:2]
    if labels.shape != (h, w):
        labels = np.asarray(Image.fromarray(labels).resize((w, h), resample=Image.NEAREST))
    colour = palette_image(labels, palette, background_index)
    # NB: integer blend over whole arrays (weight 0 keeps a background pixel as it is): no
    # float copies and no boolean gathers of a 1k x 1k picture (those took 3/4 of the time)
    weight = np.where(labels != background_index, np.uint16(round(alpha * 256)), np.uint16(0))[..., None]
    blend = thumb.astype(np.uint16)
    blend *= 256 - weight
    blend += colour * weight
    blend >>= 8
    legend = np.empty((h, 2 * w, 3), np.uint8)
    legend[:, :w] = blend
    legend[:, w:] = colour
    _save_png(path, legend)


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


def write_tissue_qc(path: Path, thumb: np.ndarray, mask: np.ndarray, tiles_box: Optional[np.ndarray] = None) -> None:
    """Thumbnail with non-tissue dimmed and the tissue outline in green; processed tiles outlined blue."""
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
        out[inner_boundary(_resize_mask(tiles_box, h, w))] = (40, 90, 255)
    out[inner_boundary(mask)] = (0, 200, 0)
    _save_png(path, out)


# --------------------------------------------------------------------------------------
# Tables and shapes
# --------------------------------------------------------------------------------------
def class_areas(class_pixels: np.ndarray, *, mpp: float, class_names: Sequence[str], background_index: int) -> dict:
    """Per class: pixels, area in mm2 and % of tissue (tissue = every non-background pixel)."""
    px_mm2 = (mpp * 1e-3) ** 2
    tissue = int(sum(int(class_pixels[k]) for k in range(len(class_names)) if k != background_index))
    rows = []
    for k, name in enumerate(class_names):
        if k == background_index:
            continue
        n = int(class_pixels[k])
        rows.append({"index": k, "class": name, "pixels": n, "area_mm2": n * px_mm2,
                     "percent_of_tissue": (100.0 * n / tissue) if tissue else 0.0})
    return {"mpp": mpp, "pixel_area_mm2": px_mm2, "tissue_pixels": tissue, "tissue_area_mm2": tissue * px_mm2,
            "background_pixels": int(class_pixels[background_index]) if background_index < 256 else 0,
            "classes": rows}


def write_areas(json_path: Path, csv_path: Path, areas: dict) -> None:
    write_json_atomic(json_path, areas)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "class", "pixels", "area_mm2", "percent_of_tissue"])
    for row in areas["classes"]:
        writer.writerow([row["index"], row["class"], row["pixels"], f"{row['area_mm2']:.6f}",
                         f"{row['percent_of_tissue']:.3f}"])
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buf.getvalue())


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
    import shapely

    def text_of(g) -> str:
        return g if isinstance(g, str) else shapely.to_geojson(g)

    classes = sorted(k for k, g in geoms.items() if g is not None and (isinstance(g, str) or not g.is_empty))
    workers = min(sum(not isinstance(geoms[k], str) for k in classes), threads or os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="wsss-geojson") as pool:
            texts = list(pool.map(lambda k: text_of(geoms[k]), classes))
    else:
        texts = [text_of(geoms[k]) for k in classes]
    features = []
    for k, text in zip(classes, texts):
        name = class_names[k]
        colour = list(palette[k][:3]) if k < len(palette) else [128, 128, 128]
        props = {"objectType": "annotation", "name": name,
                 "classification": {"name": name, "color": [int(v) for v in colour]}}
        features.append('{"type": "Feature", "geometry": %s, "properties": %s}' % (text, json.dumps(props)))
    with atomic_path(path) as tmp:
        tmp.write_text('{"type": "FeatureCollection", "features": [%s]}' % ", ".join(features))
    return len(features)

"""Memory-bounded stitching of overlapping tile predictions into output tiles.

The grid is cut by every tile edge into *pieces*; every pixel of a piece is covered by the
same set of tiles.  Each piece keeps a weighted sum of class probabilities and of weights
until the last tile covering it has arrived (a counter per piece), then it is finalised:
blended probabilities -> ``wsss.ops.gate_argmax`` (with the tissue mask) -> labels, which
are copied into output tiles (``OutputTiles``); a full output tile is compressed into a
``TileSpool`` on disk and dropped from memory.

With ``start_emit_thread`` the finalising (gate+argmax, class counts, pastes, deflate of full
output tiles) runs on a second thread, fed through a bounded queue, while the first keeps
blending: on a GPU one thread could not stitch as fast as the model predicted.

NB: only pieces still waiting for a tile live in RAM: in raster order that is one row of
overlap strips across the grid (width x overlap x (K+1) floats) plus the rows of output
tiles being filled (uint8; two in raster order, see OutputTiles), never a canvas of the slide.
Arrival order does not matter for the result.
"""
from __future__ import annotations

import bisect
import math
import os
import queue
import threading
import time
import zlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["TileSpool", "OutputTiles", "Stitcher", "pixels_per_output_tile"]


def _deflate(tiles: np.ndarray, index: List[int]) -> Tuple[np.ndarray, List[int]]:
    """zlib streams of tiles[i] for i in index, in one op call (``wsss.ops.deflate_tiles``):
    (all the streams' bytes, the end of each)."""
    import torch

    from wsss.ops import deflate_tiles

    if not tiles.flags.writeable:  # (torch.from_numpy warns on read-only arrays)
        tiles = tiles.copy()
    data, ends = deflate_tiles(torch.from_numpy(np.ascontiguousarray(tiles)), index, 1)
    return data.numpy(), ends.tolist()


class TileSpool:
    """Append-only temporary file of zlib-compressed output tiles, keyed by (row, col).

    Memory: an index of (offset, length) per stored stream, and up to ``WRITE_BUFFER`` bytes of
    stored tiles not yet written to the file.  Tiles never stored read back as ``fill``.  A tile
    of ``channels`` planes is stored as one stream per plane, keyed (row, col, plane): a planar
    TIFF takes them as they are (``iter_compressed(channel=k)``).

    NB: stored tiles collect in memory and go to the file in chunks of ``WRITE_BUFFER`` bytes
    (a label tile compresses to a few kB), and reads are positional (``os.pread``) outside the
    lock: a put costs its compression and no system call, where a seek + write each gave up
    and retook the GIL (the band writer, which stores the label tiles while a GPU runs, was
    busy for 6.1 of 6.4 s of tiles on an H100 host, mostly waiting for the GIL).
    """

    WRITE_BUFFER = 1 << 20

    def __init__(self, path: str, tile: int, width: int, height: int, dtype, channels: int = 0, fill=0) -> None:
        self.path = path
        self.tile = tile
        self.width, self.height = width, height
        self.dtype = np.dtype(dtype)
        self.channels = channels  # 0: [T, T]; C: [C, T, T]
        self.fill = fill
        self.rows = -(-height // tile)
        self.cols = -(-width // tile)
        self._fh = open(path, "w+b", buffering=0)
        self._index: Dict[Tuple[int, int], Tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._written = 0  # bytes in the file; stored bytes past it are in self._pending
        self._pending = bytearray()
        self.stored_bytes = 0

    def _shape(self) -> tuple:
        return (self.channels, self.tile, self.tile) if self.channels else (self.tile, self.tile)

    def put(self, row: int, col: int, data: np.ndarray) -> None:
        """Store the full-size (padded) tile at (row, col)."""
        self.put_many(row, [col], data[None])

    def put_many(self, row: int, cols: Sequence[int], tiles: np.ndarray, at: Optional[Sequence[int]] = None) -> None:
        """Store ``tiles[at[j]]`` (default ``tiles[j]``) at (row, cols[j]) for every j, full-size
        tiles [n, (C,) T, T], all compressed in one op call (NB: the GIL is given up once, not
        once per tile: on a GPU host each give-up cost about a switch interval of waiting)."""
        cols = [int(c) for c in cols]
        if not cols:
            return
        at = list(range(len(cols))) if at is None else [int(i) for i in at]
        assert tiles.shape[1:] == self._shape() and tiles.dtype == self.dtype, (tiles.shape, tiles.dtype)
        keys = self._keys([(row, c) for c in cols])
        if self.channels:  # (each plane its own stream)
            C = self.channels
            tiles = tiles.reshape(-1, *tiles.shape[2:])
            at = [i * C + k for i in at for k in range(C)]
        data, ends = _deflate(tiles, at)
        with self._lock:
            offset = self._written + len(self._pending)
            self._pending += memoryview(data)
            start = 0
            for key, end in zip(keys, ends):
                self._index[key] = (offset + start, end - start)
                start = end
            self.stored_bytes += len(data)
            if len(self._pending) >= self.WRITE_BUFFER:
                self._write_pending()

    def _write_pending(self) -> None:  # NB: holds self._lock
        _pwrite(self._fh, self._pending, self._written)
        self._written += len(self._pending)
        self._pending = bytearray()

    def _keys(self, tiles: Sequence[Tuple[int, int]]) -> list:
        """The index keys of the streams of ``tiles`` [(row, col)], in storage order."""
        if not self.channels:
            return list(tiles)
        return [(r, c, k) for r, c in tiles for k in range(self.channels)]

    def get(self, row: int, col: int) -> np.ndarray:
        """The tile at (row, col), full size: [T, T] or [C, T, T] (a new array)."""
        blobs = self._blobs(self._keys([(row, col)]))
        if blobs[0] is None:
            return np.full(self._shape(), self.fill, self.dtype)
        return np.frombuffer(b"".join(zlib.decompress(b) for b in blobs), self.dtype).reshape(self._shape()).copy()

    def _blobs(self, keys: Sequence[Tuple[int, int]]) -> List[Optional[bytes]]:
        """The stored streams of ``keys`` (None: never stored): those in memory copied under the
        lock, those in the file read after it (written bytes never change) in one positional
        read where they lie close together (NB: one GIL give-up, not one per tile)."""
        parts: List[Optional[bytes]] = []
        written: List[Tuple[int, int, int]] = []  # (j, offset, length) of streams in the file
        with self._lock:
            for j, key in enumerate(keys):
                entry = self._index.get(key)
                if entry is None:
                    parts.append(None)
                elif entry[0] >= self._written:
                    start = entry[0] - self._written
                    parts.append(bytes(self._pending[start:start + entry[1]]))
                else:
                    parts.append(b"")
                    written.append((j, *entry))
        if written:
            lo = min(o for _, o, _ in written)
            hi = max(o + n for _, o, n in written)
            if hi - lo <= 2 * sum(n for _, _, n in written) + (1 << 16):
                span = _pread(self._fh, hi - lo, lo)
                for j, o, n in written:
                    parts[j] = span[o - lo:o - lo + n]
            else:
                for j, o, n in written:
                    parts[j] = _pread(self._fh, n, o)
        return parts

    def get_many(self, keys: Sequence[Tuple[int, int]], out: np.ndarray) -> None:
        """out[j] = the tile at keys[j] (the fill value where none was stored) for every j; out:
        a contiguous [n, (C,) T, T] array.  The streams are read in one positional read where
        they lie close together in the file and inflated in one op call (NB: one GIL give-up
        each, not one per tile: see put_many)."""
        import torch

        from wsss.ops import inflate_tiles

        assert out.shape == (len(keys), *self._shape()) and out.dtype == self.dtype and out.flags.c_contiguous
        if self.channels:  # (a stream per plane: as many single-plane tiles)
            out = out.reshape(-1, *out.shape[2:])
        keys = self._keys(keys)
        parts = self._blobs(keys)
        stored = [j for j, p in enumerate(parts) if p is not None]
        if len(stored) < len(keys):
            out[[j for j, p in enumerate(parts) if p is None]] = self.fill
        if stored:
            blobs = [parts[j] for j in stored]
            ends = np.cumsum([len(b) for b in blobs]).tolist()
            data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
            target = torch.from_numpy(out)
            if stored != list(range(len(keys))):
                target = torch.empty((len(stored), *out.shape[1:]), dtype=target.dtype)
            inflate_tiles(data, [0] + ends[:-1], ends, target)
            if target.data_ptr() != out.ctypes.data:
                out[stored] = target.numpy()

    def __contains__(self, key) -> bool:
        return self._keys([key])[0] in self._index

    def iter_compressed(self, rows: Optional[Iterable[int]] = None, channel: Optional[int] = None) -> Iterator[bytes]:
        """Every tile's zlib stream in raster order (of ``rows``: all by default), as stored
        (fill tiles: one cached stream); of plane ``channel`` for a spool of ``channels``.

        NB: a stored blob is exactly a TIFF "Adobe deflate" (zlib) tile of a single-channel
        image, so the label TIFF is written without decoding or re-encoding anything (and
        tifffile never buffers raw tiles): writing a mostly-empty 60k x 60k level went from
        ~35 s and +256 MB to a file copy.
        """
        if (channel is None) != (not self.channels) or (channel is not None and not 0 <= channel < self.channels):
            raise ValueError(f"iter_compressed: channel {channel} of a spool of {self.channels} channels")
        fill_blob = None
        for r in range(self.rows) if rows is None else rows:
            keys = [(r, c) if channel is None else (r, c, channel) for c in range(self.cols)]
            for blob in self._blobs(keys):  # (a row at a time)
                if blob is None:
                    if fill_blob is None:
                        data, _ = _deflate(np.full((1, self.tile, self.tile), self.fill, self.dtype), [0])
                        fill_blob = data.tobytes()
                    blob = fill_blob
                yield blob

    def read_all(self) -> np.ndarray:
        """The whole image (only for small levels): [H, W] or [C, H, W]."""
        T = self.tile
        if self.channels:
            out = np.empty((self.channels, self.rows * T, self.cols * T), self.dtype)
        else:
            out = np.empty((self.rows * T, self.cols * T), self.dtype)
        for r in range(self.rows):
            for c in range(self.cols):
                out[..., r * T:(r + 1) * T, c * T:(c + 1) * T] = self.get(r, c)
        return out[..., :self.height, :self.width]

    def close(self) -> None:
        """Close and delete the spool file."""
        try:
            self._fh.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _pread(fh, n: int, offset: int) -> bytes:
    """n bytes of a file at offset, without moving (or locking) its position where the OS can."""
    if hasattr(os, "pread"):
        parts, got = [], 0
        while got < n:
            part = os.pread(fh.fileno(), n - got, offset + got)
            if not part:
                raise EOFError(f"{fh.name}: {n} bytes at {offset}: the spool file ends at {offset + got}")
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    with _SEEK_LOCK:  # pragma: no cover - no pread (Windows)
        fh.seek(offset)
        return fh.read(n)


def _pwrite(fh, data, offset: int) -> None:
    """Write all of data at offset (positionally where the OS can)."""
    view = memoryview(data)
    done = 0
    while done < len(view):  # (a write may take fewer bytes)
        if hasattr(os, "pwrite"):
            done += os.pwrite(fh.fileno(), view[done:], offset + done)
        else:  # pragma: no cover - no pwrite (Windows)
            with _SEEK_LOCK:
                fh.seek(offset + done)
                done += fh.write(view[done:])
    view.release()


_SEEK_LOCK = threading.Lock()


class OutputTiles:
    """Assembles finalised pieces into output tiles; a complete tile goes to the spool.

    ``expected`` pixels per output tile are known up front (pixels of pieces that some tile
    covers); tiles with none are never allocated and read back as the spool's fill value.

    NB: the tiles of one tile row live in one tile-major strip [cols, (C,) T, T], allocated
    when the row is first touched and dropped when its last tile is stored.  A piece's whole
    tiles are copied into it in one strided numpy copy, not one per tile, and each tile is
    contiguous for its compression: the band writer of a GPU run pastes 16384-px-wide bands, and
    every numpy copy or compression gives up the GIL and waits to retake it.  Memory: the rows
    being filled (two in raster order).
    """

    def __init__(self, spool: TileSpool, expected: np.ndarray,
                 on_stored: Optional[Callable[[int, List[int], np.ndarray], None]] = None) -> None:
        self.spool = spool
        self.remaining = expected.astype(np.int64)  # [rows, cols]
        self._tiles_left = (self.remaining > 0).sum(axis=1)  # per tile row: tiles not yet stored
        self.strips: Dict[int, np.ndarray] = {}
        self.peak_buffers = 0  # the most tile buffers (strips x cols) alive at once
        # (row, cols, strip): tiles cols of row were just stored in the spool from strip (see _strip)
        self.on_stored = on_stored

    def _strip(self, r: int) -> np.ndarray:
        strip = self.strips.get(r)
        if strip is None:
            T, cols = self.spool.tile, self.remaining.shape[1]
            shape = (cols, self.spool.channels, T, T) if self.spool.channels else (cols, T, T)
            strip = self.strips[r] = np.full(shape, self.spool.fill, self.spool.dtype)
            self.peak_buffers = max(self.peak_buffers, len(self.strips) * cols)
        return strip

    def paste(self, x: int, y: int, block: np.ndarray) -> None:
        """Copy block ([h, w] or [C, h, w]) whose top-left grid pixel is (x, y)."""
        T = self.spool.tile
        h, w = block.shape[-2:]
        c_first, c_last = x // T, (x + w - 1) // T
        # the tiles the block spans whole (their columns in [x, x + w)): one copy per tile row
        a, b = -(-x // T), (x + w) // T
        for r in range(y // T, (y + h - 1) // T + 1):
            y0, y1 = max(y, r * T), min(y + h, (r + 1) * T)
            rows = slice(y0 - r * T, y1 - r * T)
            strip = self._strip(r)
            part = block[..., y0 - y:y1 - y, :]
            if b - a >= 2:
                whole = part[..., a * T - x:b * T - x]
                if self.spool.channels:  # [C, hh, n*T] -> [n, C, hh, T]
                    strip[a:b, :, rows] = whole.reshape(whole.shape[0], y1 - y0, b - a, T).transpose(2, 0, 1, 3)
                else:  # [hh, n*T] -> [n, hh, T]
                    strip[a:b, rows] = whole.reshape(y1 - y0, b - a, T).transpose(1, 0, 2)
                self.remaining[r, a:b] -= (y1 - y0) * T
                singles = [c for c in (c_first, c_last) if not a <= c < b]
            else:
                singles = range(c_first, c_last + 1)
            for c in dict.fromkeys(singles):  # (the block's partial tiles, or all of a narrow one)
                x0, x1 = max(x, c * T), min(x + w, (c + 1) * T)
                strip[c][..., rows, x0 - c * T:x1 - c * T] = part[..., x0 - x:x1 - x]
                self.remaining[r, c] -= (y1 - y0) * (x1 - x0)
            done = (np.flatnonzero(self.remaining[r, c_first:c_last + 1] == 0) + c_first).tolist()
            if done:
                self.remaining[r, done] = -1  # (stored)
                self.spool.put_many(r, done, strip, at=done)
                if self.on_stored is not None:
                    self.on_stored(r, done, strip)
                self._tiles_left[r] -= len(done)
            if self._tiles_left[r] == 0:
                del self.strips[r]


def pixels_per_output_tile(rects, width: int, height: int, out_tile: int) -> np.ndarray:
    """int64 [rows, cols]: how many pixels of disjoint rectangles (y0, y1, x0, x1) fall in each
    ``out_tile`` output tile of a width x height grid (what an OutputTiles waits for)."""
    expected = np.zeros((-(-height // out_tile), -(-width // out_tile)), np.int64)
    for y0, y1, x0, x1 in rects:
        for r in range(y0 // out_tile, (y1 - 1) // out_tile + 1):
            h = min(y1, (r + 1) * out_tile) - max(y0, r * out_tile)
            for c in range(x0 // out_tile, (x1 - 1) // out_tile + 1):
                expected[r, c] += h * (min(x1, (c + 1) * out_tile) - max(x0, c * out_tile))
    return expected


class Stitcher:
    """Blends tile probabilities [K, t, t] into labels, piece by piece (see module docstring).

    tiles: the (x, y) of every tile that will be added (each exactly once, any order);
    finalize(x, y, probs [K, h, w] float32 normalised) -> labels uint8 [h, w] for a piece;
    labels_out / probs_out: OutputTiles receiving label pieces and (optionally) float16
    probabilities; class_pixels accumulates the count of each label value.  background_index:
    the label finalize gives pixels outside the tissue (None: any label values may occur).
    """

    def __init__(self, width: int, height: int, tile: int, xs: List[int], ys: List[int],
                 tiles: List[Tuple[int, int]], window: np.ndarray, num_classes: int,
                 finalize: Callable[[int, int, np.ndarray], np.ndarray],
                 labels_out: OutputTiles, probs_out: Optional[OutputTiles] = None,
                 background_index: Optional[int] = None) -> None:
        self.width, self.height, self.tile = width, height, tile
        self.window = window
        self.num_classes = num_classes
        self.finalize = finalize
        self.labels_out, self.probs_out = labels_out, probs_out
        self.bx = self._bounds(xs, width)
        self.by = self._bounds(ys, height)
        self.count = np.zeros((len(self.by) - 1, len(self.bx) - 1), np.int32)
        for (x, y) in tiles:
            (jy0, jy1), (jx0, jx1) = self._piece_range(y, self.by, height), self._piece_range(x, self.bx, width)
            self.count[jy0:jy1, jx0:jx1] += 1
        self.acc: Dict[Tuple[int, int], np.ndarray] = {}
        self.peak_pieces = 0
        self.peak_piece_bytes = 0
        self._live_bytes = 0
        self._scratch_buf = np.empty(0, np.float32)
        self._emit_q: Optional[queue.Queue] = None
        self._emit_thread: Optional[threading.Thread] = None
        self._emit_errors: List[BaseException] = []
        self.class_pixels = np.zeros(256, np.int64)
        # the label values finalize produces (gate_argmax: the classes and the background)
        self._label_values = (sorted(set(range(num_classes)) | {background_index})
                              if background_index is not None else [])

    def _bounds(self, starts: List[int], length: int) -> List[int]:
        cuts = {0, length}
        for s in starts:
            cuts.add(min(s, length))
            cuts.add(min(s + self.tile, length))
        return sorted(cuts)

    def _piece_range(self, start: int, bounds: List[int], length: int) -> Tuple[int, int]:
        j0 = bisect.bisect_left(bounds, start)
        j1 = bisect.bisect_left(bounds, min(start + self.tile, length))
        return j0, j1

    def covered_pixels_per_output_tile(self, out_tile: int) -> np.ndarray:
        """int64 [rows, cols]: pixels of each output tile that some selected tile covers."""
        return pixels_per_output_tile(((self.by[jy], self.by[jy + 1], self.bx[jx], self.bx[jx + 1])
                                       for jy, jx in zip(*np.nonzero(self.count))),
                                      self.width, self.height, out_tile)

    def add(self, x: int, y: int, probs: np.ndarray) -> None:
        """probs: float32 [K, t, t] (gated) probabilities of the tile at (x, y).

        NB: pieces covered by this tile alone (the tile's centre) are finalised straight from
        ``probs`` (their blend is the tile itself); only overlap strips are weighted into
        accumulators, with in-place multiply-adds (no per-piece temporaries).  The pieces this
        tile completes are finalised together: in raster order they form one rectangle (the
        tile minus its right and bottom strips), so each tile costs one gate+argmax call, one
        class count and one paste rather than four (in other orders: one per row run).
        """
        K = self.num_classes
        (jy0, jy1), (jx0, jx1) = self._piece_range(y, self.by, self.height), self._piece_range(x, self.bx, self.width)
        done: List[Tuple[int, int, np.ndarray]] = []  # (jy, jx, blended [K, h, w]) completed by this tile
        for jy in range(jy0, jy1):
            py0, py1 = self.by[jy], self.by[jy + 1]
            for jx in range(jx0, jx1):
                px0, px1 = self.bx[jx], self.bx[jx + 1]
                sub_p = probs[:, py0 - y:py1 - y, px0 - x:px1 - x]
                key = (jy, jx)
                acc = self.acc.get(key)
                if self.count[jy, jx] == 1 and acc is None:
                    done.append((jy, jx, sub_p))  # single-tile piece: no accumulator needed
                    self.count[jy, jx] = 0
                    continue
                sub_w = self.window[py0 - y:py1 - y, px0 - x:px1 - x]
                if acc is None:
                    acc = self.acc[key] = np.zeros((K + 1, py1 - py0, px1 - px0), np.float32)
                    self._live_bytes += acc.nbytes
                    self.peak_pieces = max(self.peak_pieces, len(self.acc))
                    self.peak_piece_bytes = max(self.peak_piece_bytes, self._live_bytes)
                scratch = self._scratch(acc[:K].shape)
                np.multiply(sub_p, sub_w, out=scratch)
                acc[:K] += scratch
                acc[K] += sub_w
                self.count[jy, jx] -= 1
                if self.count[jy, jx] == 0:
                    del self.acc[key]
                    self._live_bytes -= acc.nbytes
                    weighted = acc[:K]
                    weighted /= acc[K][None]
                    done.append((jy, jx, weighted))
        if done:
            if self._emit_q is None:
                self._emit_pieces(done)
            else:
                if self._emit_errors:
                    raise self._emit_errors[0]
                self._emit_q.put(done)

    # -- optional second stage: finalise (gate+argmax, counts, paste, deflate) on another thread
    def start_emit_thread(self, init: Optional[Callable[[], None]] = None, maxsize: int = 4,
                          timer: Optional[Callable[[float], None]] = None) -> None:
        """Finalise completed pieces on a second thread from now on, so blending (this thread)
        and finalising overlap.  ``init`` runs first on that thread; at most ``maxsize`` tiles'
        pieces wait for it (bounded memory); ``timer(seconds)`` gets its busy time per tile.
        Call ``finish()`` before reading results."""
        if self._emit_thread is not None:
            return
        self._emit_q = queue.Queue(maxsize=maxsize)

        def work() -> None:
            # NB: every error, ``init``'s and ``timer``'s too, is kept for the blending thread
            # and the queue drained: a thread that died would leave the producer blocked on it
            try:
                if init is not None:
                    init()
            except BaseException as e:
                self._emit_errors.append(e)
            while True:
                item = self._emit_q.get()
                if item is None:
                    return
                if self._emit_errors:
                    continue  # drain after a failure
                t0 = time.perf_counter()
                try:
                    self._emit_pieces(item)
                    if timer is not None:
                        timer(time.perf_counter() - t0)
                except BaseException as e:  # re-raised in the blending thread
                    self._emit_errors.append(e)

        self._emit_thread = threading.Thread(target=work, name="wsss-finalise", daemon=True)
        self._emit_thread.start()

    def finish(self, raise_errors: bool = True) -> None:
        """Wait for the finalising thread (if any) to drain; re-raise its first error."""
        if self._emit_thread is not None:
            self._emit_q.put(None)
            self._emit_thread.join()
            self._emit_thread, self._emit_q = None, None
        if raise_errors and self._emit_errors:
            raise self._emit_errors[0]

    def _emit_pieces(self, done: List[Tuple[int, int, np.ndarray]]) -> None:
        """Finalise completed pieces, merged into rectangles: the whole set when it fills its
        bounding box of pieces (the raster-order case), else each row's runs of neighbours."""
        rows = sorted({jy for jy, _, _ in done})
        cols = sorted({jx for _, jx, _ in done})
        if (len(done) == len(rows) * len(cols) and rows[-1] - rows[0] + 1 == len(rows)
                and cols[-1] - cols[0] + 1 == len(cols)):
            self._emit_block(done, rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
            return
        by_row: Dict[int, List[Tuple[int, int, np.ndarray]]] = {}
        for item in sorted(done, key=lambda d: (d[0], d[1])):
            by_row.setdefault(item[0], []).append(item)
        for jy, items in by_row.items():
            run = [items[0]]
            for item in items[1:]:
                if item[1] == run[-1][1] + 1:
                    run.append(item)
                else:
                    self._emit_block(run, jy, jy + 1, run[0][1], run[-1][1] + 1)
                    run = [item]
            self._emit_block(run, jy, jy + 1, run[0][1], run[-1][1] + 1)

    def _emit_block(self, pieces: List[Tuple[int, int, np.ndarray]], jy0: int, jy1: int, jx0: int, jx1: int) -> None:
        """The pieces exactly tile the block of pieces [jy0, jy1) x [jx0, jx1): emit them as one."""
        if len(pieces) == 1:
            self._emit(self.bx[jx0], self.by[jy0], pieces[0][2])
            return
        x0, y0 = self.bx[jx0], self.by[jy0]
        block = np.empty((self.num_classes, self.by[jy1] - y0, self.bx[jx1] - x0), np.float32)
        for jy, jx, piece in pieces:
            py, px = self.by[jy] - y0, self.bx[jx] - x0
            block[:, py:py + piece.shape[1], px:px + piece.shape[2]] = piece
        self._emit(x0, y0, block)

    def _scratch(self, shape) -> np.ndarray:
        n = math.prod(shape)
        buf = self._scratch_buf
        if buf.size < n:
            buf = self._scratch_buf = np.empty(n, np.float32)
        return buf[:n].reshape(shape)

    def _emit(self, x: int, y: int, probs: np.ndarray) -> None:
        """probs: float32 [K, h, w] blended probabilities of the piece at (x, y)."""
        labels = self.finalize(x, y, probs)
        self._count_classes(labels)
        self.labels_out.paste(x, y, labels)
        if self.probs_out is not None:
            self.probs_out.paste(x, y, probs.astype(np.float16))

    def _count_classes(self, labels: np.ndarray) -> None:
        """class_pixels += the count of each label value.

        NB: np.bincount widens the uint8 labels to int64 first; a count_nonzero per expected
        value (the classes and the background) is ~3x cheaper for a few classes."""
        values = self._label_values
        if 0 < len(values) <= 16:
            counts = [int(np.count_nonzero(labels == v)) for v in values]
            if sum(counts) == labels.size:
                self.class_pixels[values] += counts
                return
        self.class_pixels += np.bincount(labels.ravel(), minlength=256)

    @property
    def pending(self) -> int:
        """Pieces still waiting for tiles (0 once every selected tile was added)."""
        return int(self.count.sum())

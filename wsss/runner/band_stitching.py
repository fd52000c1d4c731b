"""Blending on the model's device, one band of tile rows at a time (the CUDA default).

On a GPU the model outruns CPU stitching (measured on an H200: one stitch thread needed as
long as the model).  ``BandStitcher`` keeps the blend where the probabilities already are:

- an accumulator ``acc`` [K+1, tile, W] on the device holds the weighted class sums and the
  weight sum of the rows [base, base + tile), ``base`` being the current tile row's start;
- each tile adds ``probs * window`` and ``window`` into its columns (the ``wsss::band_accumulate``
  op with the window, one call per tile row of a batch: the batch's products, then the in-place
  adds tile by tile in C++; all queued on the model's stream: no host round trip);
- when the first tile of the next row arrives (tiles come in raster order), the rows above
  it are final: ``wsss::band_finalize`` normalises them, gates and arg-maxes them with the tissue
  mask (the fused ``gate_argmax`` op), counts their labels on the device and moves the rest of
  ``acc`` up, in one call; only uint8 labels (and optional float16 probabilities) go to pinned
  host memory;
- a writer thread waits for each band's download and pastes its covered columns into the
  same ``OutputTiles`` the CPU ``Stitcher`` feeds (compressing full output tiles).

The sums are the CPU stitcher's, term for term and in the same order (``0 + p1*w1 + p2*w2 ...``
then one division), so pixels covered by two or more tiles get bit-identical blends.  Pixels
covered by one tile get ``(p*w)/w`` where the CPU stitcher takes ``p`` itself: equal or one
float32 rounding apart (a label can differ only where two classes tie to the last bit).

Memory on the device: ``acc`` plus up to twice as much again while a band is finalised, i.e.
about 3 x (K+1) x tile x W x 4 bytes (W: the grid width); ``device_bytes`` gives the estimate the
runner checks against free device memory before choosing this path.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["BandStitcher", "band_plan"]

Interval = Tuple[int, int]


def _merge(intervals: List[Interval]) -> List[Interval]:
    out: List[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def band_plan(tiles: Sequence[Tuple[int, int]], tile: int, width: int, height: int) -> List[Tuple[int, int, List[Interval]]]:
    """The bands a raster-ordered tile list produces: [(y0, y1, column intervals)].

    A band runs from one tile row's start to the next one's (at most ``tile`` rows: rows below
    a gap that no tile covers form no band); its intervals are the merged column spans of every
    tile that covers any of its rows.  These rectangles are what ``BandStitcher`` pastes, each
    pixel exactly once (pixels inside them that no tile covers get the background label).
    """
    rows: dict = {}
    for x, y in tiles:
        rows.setdefault(y, []).append((x, min(x + tile, width)))
    starts = sorted(rows)
    plan = []
    for i, a in enumerate(starts):
        b = min(a + tile, height, starts[i + 1] if i + 1 < len(starts) else height)
        spans = [s for y in starts[max(0, i - tile):i + 1] if y + tile > a for s in rows[y]]
        plan.append((a, b, _merge(spans)))
    return plan


class BandStitcher:
    """Blends tile probabilities on their device into labels, band by band (module docstring).

    tiles: the (x, y) of every tile, in the raster order they will be added; window: float32
    [tile, tile]; tissue: a ``TissueMask`` (None: everything is tissue) sampled at ``grid_mpp``;
    labels_out / probs_out: ``OutputTiles`` (set before the first ``add_batch``).  timer(s): the
    writer thread's time per band; wait_timer(s): the producer's time blocked on a full writer queue.
    ``device_bytes(K, tile, width)`` estimates the device memory it needs.
    """

    def __init__(self, width: int, height: int, tile: int, tiles: Sequence[Tuple[int, int]], window: np.ndarray,
                 num_classes: int, device, *, tissue=None, grid_mpp: float = 1.0, background_index: int = 0,
                 timer: Optional[Callable[[float], None]] = None,
                 wait_timer: Optional[Callable[[float], None]] = None) -> None:
        self.width, self.height, self.tile = width, height, tile
        self.num_classes = K = num_classes
        self.device = torch.device(device)
        self.background_index = background_index
        self.plan = band_plan(tiles, tile, width, height)
        self.labels_out = None
        self.probs_out = None
        self.class_pixels = np.zeros(256, np.int64)
        self._left = len(tiles)
        self._band = -1  # index into plan of the band being accumulated
        # NB: host -> device copies here are non-blocking: a blocking one waits for the model's
        # batch queued before this stitcher was made (31 ms per slide on an H200, the host idle
        # while the device's queue ran dry).  Their sources are pageable: CUDA stages them at once.
        upload = lambda array: torch.from_numpy(array).to(self.device, non_blocking=True)  # noqa: E731
        self.acc = torch.zeros((K + 1, min(tile, height), width), dtype=torch.float32, device=self.device)
        self._window = upload(np.ascontiguousarray(window, np.float32))
        values = sorted(set(range(K)) | {background_index})
        self._values = upload(np.asarray(values, np.uint8))
        self._value_index = np.asarray(values)
        self._counts = torch.zeros(len(values), dtype=torch.int64, device=self.device)
        self._counted = 0
        self._tissue = tissue
        if tissue is not None:
            # NB: the (low-resolution) mask sampled at the grid's columns once, plus an all-outside
            # row for grid rows outside the mask: a band's mask is then one gather (two torch
            # calls per band, not seven: each gives up the GIL on a GPU host).  Memory: (mask
            # rows + 1) x W bytes: a detected mask is at most ~1k pixels high, a user's may be
            # more (device_bytes counts it, so "auto" blends on the host where it does not fit)
            mask = upload(np.ascontiguousarray(tissue.mask, dtype=bool))
            rows, rows_inside = tissue.sample_index(0, height, grid_mpp, axis=0)
            cols, cols_inside = tissue.sample_index(0, width, grid_mpp, axis=1)
            sampled = mask[:, upload(cols)] & upload(cols_inside)
            self._mask_by_row = torch.cat([sampled, sampled.new_zeros((1, width))])
            self._mask_row_of = upload(np.where(rows_inside, rows, mask.shape[0]))
        self._pin = self.device.type == "cuda"
        # peak device bytes (accumulator + the largest band's temporaries), for run.json
        self.peak_piece_bytes = self.device_bytes(K, self.acc.shape[1], width,
                                                  None if tissue is None else tissue.mask.shape[0])
        self.peak_pieces = 1
        self._timer = timer  # the writer's own time per band
        self._wait_timer = wait_timer  # the producer's time blocked on a full writer queue
        self._q: "queue.Queue" = queue.Queue(maxsize=4)
        self._errors: List[BaseException] = []
        self._writer = threading.Thread(target=self._write_bands, name="wsss-band-writer", daemon=True)
        self._writer.start()

    @staticmethod
    def device_bytes(num_classes: int, tile: int, width: int, mask_rows: Optional[int] = None) -> int:
        """Device memory the stitcher needs (accumulator and finalising temporaries; with a
        tissue mask of ``mask_rows`` rows, its rows sampled at the grid's columns)."""
        return 3 * (num_classes + 1) * tile * width * 4 + (0 if mask_rows is None else (mask_rows + 1) * width)

    @property
    def pending(self) -> int:
        """Tiles not yet added (0 once every planned tile was)."""
        return self._left

    def covered_pixels_per_output_tile(self, out_tile: int) -> np.ndarray:
        """int64 [rows, cols]: pixels of each output tile this stitcher will paste."""
        from wsss.runner.stitching import pixels_per_output_tile

        return pixels_per_output_tile(((y0, y1, x0, x1) for y0, y1, spans in self.plan for x0, x1 in spans),
                                      self.width, self.height, out_tile)

    # -- producer side (the thread that runs the model, on its stream) ------------------------
    def add_batch(self, positions: Sequence[Tuple[int, int]], probs: torch.Tensor) -> None:
        """probs: [N, K, tile, tile] gated class probabilities of the tiles at ``positions``."""
        if self._errors:
            raise self._errors[0]
        from wsss.ops import band_accumulate

        t, n = self.tile, len(positions)
        with torch.inference_mode():
            i = 0
            while i < n:  # one op call per tile row in the batch (NB: not two torch calls per tile)
                y = positions[i][1]
                if self._band < 0 or y != self.plan[self._band][0]:
                    self._next_band(y)
                j = i + 1
                while j < n and positions[j][1] == y:
                    j += 1
                tiles = probs if (i, j) == (0, n) else probs[i:j]
                band_accumulate(self.acc, tiles, [x for x, _ in positions[i:j]], min(t, self.height - y), self._window)
                self._left -= j - i
                i = j

    def _next_band(self, y: int) -> None:
        nxt = self._band + 1
        if nxt >= len(self.plan) or self.plan[nxt][0] != y:
            raise RuntimeError(f"internal error: tile row y={y} arrived out of raster order "
                               f"(expected y={self.plan[nxt][0] if nxt < len(self.plan) else 'none'})")
        if self._band >= 0:
            self._finalise_band(shift=y - self.plan[self._band][0])
        self._band = nxt

    def _finalise_band(self, shift: int) -> None:
        """The current band's rows to labels on the device (``wsss::band_finalize``: normalise,
        gate + argmax with the tissue mask, uncovered -> background, class counts, then the
        accumulator moves up by ``shift`` rows), downloaded to pinned memory for the writer.

        NB: one op call for what were about twenty torch calls, each of which gave up the GIL
        and waited to take it back on a GPU host where the readers and the writer want it too.
        Counting is one comparison per value summed on the device, not torch.bincount, which
        on CUDA reads the input's maximum back to the host (a stream sync)."""
        from wsss.ops import band_finalize

        y0, y1, spans = self.plan[self._band]
        n = y1 - y0
        mask = None if self._tissue is None else self._mask_by_row[self._mask_row_of[y0:y1]]
        labels, half = band_finalize(self.acc, n, shift, mask, self.background_index, self._values, self._counts,
                                     self.probs_out is not None)
        self._counted += labels.numel()
        labels_host = torch.empty(labels.shape, dtype=torch.uint8, pin_memory=self._pin)
        labels_host.copy_(labels, non_blocking=self._pin)
        probs_host = None
        if self.probs_out is not None:
            probs_host = torch.empty(half.shape, dtype=torch.float16, pin_memory=self._pin)
            probs_host.copy_(half, non_blocking=self._pin)
        done = None
        if self._pin:
            done = torch.cuda.Event(blocking=True)
            done.record(torch.cuda.current_stream(self.device))
        self._put((y0, spans, labels_host, probs_host, done))

    def _put(self, item) -> None:
        try:
            self._q.put_nowait(item)
            return
        except queue.Full:
            pass
        t0 = time.perf_counter()
        try:
            while True:  # NB: never block forever on a writer that died
                if self._errors:
                    raise self._errors[0]
                try:
                    self._q.put(item, timeout=0.5)
                    return
                except queue.Full:
                    continue
        finally:
            if self._wait_timer is not None:
                self._wait_timer(time.perf_counter() - t0)

    def finish(self, raise_errors: bool = True) -> None:
        """Finalise the last band, wait for the writer, and collect the class counts.

        ``raise_errors=False`` (a run already failing): only stop the writer and let the memory
        go; nothing is finalised or counted, so nothing here can raise in place of the run's own
        error (a second finish after a failed one found ``acc`` gone)."""
        if not raise_errors:
            self._stop_writer()
            return
        try:
            if not self._errors and self._band >= 0 and self._left == 0:
                with torch.inference_mode():
                    self._finalise_band(shift=0)
                self._band = len(self.plan)
        finally:
            self._stop_writer()
        if self._errors:
            raise self._errors[0]
        counts = self._counts.cpu().numpy()
        if counts.sum() != self._counted:  # pragma: no cover - gate_argmax's contract broken
            raise RuntimeError(f"internal error: {self._counted - counts.sum()} label values outside the classes "
                               "and the background")
        self.class_pixels[self._value_index] += counts

    def _stop_writer(self) -> None:
        if self._writer.is_alive():
            self._q.put(None)
            self._writer.join()
        self.acc = None  # the device memory goes back now, not at garbage collection

    # -- writer thread ------------------------------------------------------------------------
    def _write_bands(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._errors:
                continue
            y0, spans, labels_host, probs_host, done = item
            try:
                if done is not None:
                    done.synchronize()  # releases the GIL (the wait is not the writer's work)
                t0 = time.perf_counter()
                labels = labels_host.numpy()
                probs = probs_host.numpy() if probs_host is not None else None
                for x0, x1 in spans:
                    self.labels_out.paste(x0, y0, labels[:, x0:x1])
                    if probs is not None:
                        self.probs_out.paste(x0, y0, probs[:, :, x0:x1])
                if self._timer is not None:
                    self._timer(time.perf_counter() - t0)
            except BaseException as e:  # re-raised on the producer's side
                self._errors.append(e)

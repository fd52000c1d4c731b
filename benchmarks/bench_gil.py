"""The runner's helper-thread work alone and beside threads that hold the GIL (a GPU host's case).

On a GPU host the runner's threads (readers, the thread that feeds the model, the band writer,
the pyramid, the label TIFF writer, the outlines) share one GIL under a 1-ms switch interval
(wsss.runner.pipeline.SWITCH_INTERVAL_S).  There every call that gives up the GIL (a numpy
copy, a torch op, a compression, a file read) waits to take it back, so the *number* of such
calls sets a thread's time more than its work does.  This file times each piece of that work
on the CPU, alone and with 3 threads that hold the GIL (pure Python plus a small numpy call in
a loop) and the 1-ms interval; ``extra_info`` has the parameters.

- test_band_writer: OutputTiles.paste of 16384-px-wide label bands (224 rows) into 256-px tiles
  (the band writer: pastes, deflate of each finished tile row in one ``wsss::deflate_tiles`` call).
- test_label_pyramid: the label pyramid of a complete WSSS_BENCH_GIL_PYRAMID^2 level 0 (default
  4096), as after the tiles: each level-0 tile row read back (TileSpool.get_many +
  ``wsss::inflate_tiles``) and voted up through every level on the pyramid's one thread.
- test_band_producer: BandStitcher on CPU tensors, 32-px tiles so that compute is small, batches
  of 32 (the thread that feeds the GPU: ``band_accumulate`` with the window, ``band_finalize``).
- test_label_pyramid_during_tiles: the same pyramid as the GPU path builds it, each level-0 tile
  row handed over with the strip it was stored from (nothing read back).
- test_label_tiff_rows: TileSpool.iter_compressed of the pyramid's level 0 (the label TIFF writer).
- test_tile_reads: the readers' work per 256-px tile of a flat zlib TIFF (WSSS_BENCH_GIL_READS^2,
  default 4096, overlap 32): SlideView.read, the copy into the batch ring, and the overview
  thumbnail's sums per tile (TileThumbnail.add, before session 14), per batch of 32
  (add_batch, the runner's) or none.
- test_read_batches: the runner's ``read_batches`` (wsss/runner/reading.py) over the same
  slide (4 readers, batches of 32, the overview sums), as the thread that feeds the model sees
  it, with reader threads or reader processes (the GPU path's); also beside "held" GIL holders
  (below).
- test_outline_slabs: the GeoJSON's OutlineBuilder on a noisy WSSS_BENCH_GIL_OUTLINES^2 polygon
  level (default 2048, the largest the runner traces; one dominant class with thousands of
  holes, like a random-weight network's map) fed 32 rows at a time, its slabs traced on two
  threads or in two worker processes (the GPU path's); extra_info: the builder's finish
  timings (waiting for slabs, joins).

Measured (2-core VM, 2026-11-26, session 12; one-off scripts with the same work, old code vs new
in one process each, three repetitions; docs/runner-measurements.md, "Twelfth session"), contended:
band writer (24 bands) 4.70-4.90 -> 0.72-0.83 s, pyramid (8192^2) 5.2-5.9 -> 2.3-2.4 s, producer
(24 bands of 73 tiles) 2.0-2.6 -> 0.61-0.94 s, label TIFF rows (1024 tiles) 3-494 -> 1-13 ms.

Session 14 (2-core VM, 2026-11-27), test_tile_reads (361 tiles), medians of 3: alone 0.11 s
with no thumbnail, 0.13 s with per-tile sums, 0.14 s per batch; contended 4.34 / 9.56 / 5.50 s.
test_read_batches: alone 0.10-0.11 s, contended 1.40-1.61 s (with one task per tile, as before,
the same loop in a /tmp script: 0.11-0.12 / 1.88-2.09 s).  test_outline_slabs, 3 rounds: on threads alone 0.94-0.99 s,
contended 9.97-11.1 s; in worker processes alone 0.63-0.80 s, contended 2.05-2.07 s (the hogs
and the two workers share 2 cores here).

Session 15 (2-core VM, 2026-11-27), test_read_batches, medians of 3 (threads / processes):
alone 0.09 / 0.17 s (the processes' first-touch of a new ring, per-process tile caches, and 4
processes on 2 cores), contended 0.94 / 0.41 s, held 0.94 / 0.27 s.

Run: pytest benchmarks/bench_gil.py --benchmark-only   (CI: --benchmark-disable)
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch

from wsss.runner.band_stitching import BandStitcher
from wsss.runner.stitching import OutputTiles, TileSpool, pixels_per_output_tile
from wsss.runner.writers import build_label_pyramid

BANDS = int(os.environ.get("WSSS_BENCH_GIL_BANDS", "12"))
PYRAMID = int(os.environ.get("WSSS_BENCH_GIL_PYRAMID", "4096"))
OUTLINES = int(os.environ.get("WSSS_BENCH_GIL_OUTLINES", "2048"))
READS = int(os.environ.get("WSSS_BENCH_GIL_READS", "4096"))
HOGS = 3


@pytest.fixture(params=["alone", "contended"])
def gil(request):
    """Nothing, or HOGS threads that hold the GIL, under a 1-ms switch interval: "contended",
    pure Python plus a small numpy call in a loop (a core each, so on this 2-core VM they also
    take the CPU); "held" (tests that ask for it), a C call that sleeps 0.5 ms holding the GIL
    (a host with cores to spare, as a GPU host has: only the GIL is contended)."""
    stop = threading.Event()
    if request.param == "held":
        import ctypes

        usleep = ctypes.PyDLL(None).usleep  # (PyDLL: the call keeps the GIL)

    def hog():
        x = np.zeros(16)
        while not stop.is_set():
            if request.param == "held":
                usleep(500)
                continue
            s = 0
            for i in range(200):
                s += i
            x += 1

    saved = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    threads = [threading.Thread(target=hog, daemon=True) for _ in range(0 if request.param == "alone" else HOGS)]
    for t in threads:
        t.start()
    try:
        yield request.param
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(saved)


def _labels(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Blocky labels of four classes with 2% noise (a model's map, roughly)."""
    rng = np.random.default_rng(seed)
    base = (np.add.outer(np.arange(h) // 37, np.arange(w) // 53) % 4).astype(np.uint8)
    return np.where(rng.random((h, w)) < 0.02, (base + 1) % 4, base).astype(np.uint8)


def test_band_writer(benchmark, gil, tmp_path):
    W, BAND, T = 16384, 224, 256
    H = BAND * BANDS
    bands = [_labels(BAND, W, seed) for seed in range(2)]
    runs = []

    def run():
        spool = TileSpool(str(tmp_path / f"s{len(runs)}"), T, W, H, np.uint8)
        out = OutputTiles(spool, pixels_per_output_tile([(0, H, 0, W)], W, H, T))
        for i in range(BANDS):
            out.paste(0, i * BAND, bands[i % 2])
        runs.append(all((r, c) in spool for r in range(spool.rows) for c in range(spool.cols)))
        spool.close()

    benchmark.pedantic(run, rounds=3, iterations=1)
    assert runs[-1]  # every tile stored
    benchmark.extra_info.update(gil=gil, bands=BANDS, width=W, tiles=-(-H // T) * (W // T))


@pytest.fixture(scope="module")
def level0(tmp_path_factory):
    T = 256
    spool = TileSpool(str(tmp_path_factory.mktemp("gil") / "l0"), T, PYRAMID, PYRAMID, np.uint8, fill=255)
    labels = _labels(T, PYRAMID)
    for r in range(spool.rows):
        spool.put_many(r, range(spool.cols), np.ascontiguousarray(labels.reshape(T, spool.cols, T).transpose(1, 0, 2)))
    yield spool
    spool.close()


def test_label_pyramid(benchmark, gil, level0, tmp_path):
    runs = []

    def run():
        folder = tmp_path / f"p{len(runs)}"
        folder.mkdir()
        levels = build_label_pyramid(level0, folder, fill=255)
        runs.append(len(levels))
        for spool in levels[1:]:
            spool.close()

    benchmark.pedantic(run, rounds=3, iterations=1)
    assert runs[-1] >= 2
    benchmark.extra_info.update(gil=gil, level0=PYRAMID, levels=runs[-1])


def test_label_pyramid_during_tiles(benchmark, gil, level0, tmp_path):
    """The GPU path's pyramid: each level-0 tile row handed over with the strip it was stored
    from (``tiles_stored``, as OutputTiles does), voted up through every level on the pyramid's
    thread; nothing read back."""
    from wsss.runner.writers import LabelPyramid

    T = level0.tile
    labels = _labels(T, level0.width)
    strip = np.ascontiguousarray(labels.reshape(T, level0.cols, T).transpose(1, 0, 2))  # (every row alike)
    expected = np.ones((level0.rows, level0.cols), np.int64)
    runs = []

    def run():
        folder = tmp_path / f"e{len(runs)}"
        folder.mkdir()
        with LabelPyramid(level0, folder, fill=255, expected=expected) as pyramid:
            for r in range(level0.rows):
                pyramid.tiles_stored(r, range(level0.cols), strip)
            runs.append(len(pyramid.finish()))
            for spool in pyramid.levels[1:]:
                spool.close()

    benchmark.pedantic(run, rounds=3, iterations=1)
    assert runs[-1] >= 2
    benchmark.extra_info.update(gil=gil, level0=PYRAMID, levels=runs[-1])


def test_label_tiff_rows(benchmark, gil, level0):
    n = benchmark.pedantic(lambda: sum(1 for _ in level0.iter_compressed()), rounds=3, iterations=1)
    assert n == level0.rows * level0.cols
    benchmark.extra_info.update(gil=gil, tiles=n)


def test_band_producer(benchmark, gil, tmp_path):
    T, S, K, B = 32, 28, 4, 32
    W = 73 * S + (T - S)
    tiles = [(x, y * S) for y in range(2 * BANDS) for x in range(0, W - T + 1, S)]
    H = tiles[-1][1] + T
    probs = torch.rand(B, K, T, T, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    counted = []

    def run():
        st = BandStitcher(W, H, T, tiles, np.ones((T, T), np.float32), K, "cpu", background_index=K)
        spool = TileSpool(str(tmp_path / f"s{len(counted)}"), T, W, H, np.uint8, fill=K)
        st.labels_out = OutputTiles(spool, st.covered_pixels_per_output_tile(T))
        for i in range(0, len(tiles), B):
            st.add_batch(tiles[i:i + B], probs[:len(tiles[i:i + B])])
        st.finish()
        counted.append(int(st.class_pixels.sum()))
        spool.close()

    try:
        benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert counted[-1] == W * H
    benchmark.extra_info.update(gil=gil, bands=2 * BANDS, tiles=len(tiles), batch=B)


@pytest.fixture(scope="module")
def noisy_level():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    fields = np.stack([gaussian_filter(rng.standard_normal((OUTLINES, OUTLINES)).astype(np.float32), 1.5)
                       for _ in range(4)])
    fields[0] += 0.4  # one dominant class: one region with ~27k holes at 2048^2
    return fields.argmax(0).astype(np.uint8)


@pytest.mark.parametrize("where", ["threads", "processes"])
def test_outline_slabs(benchmark, gil, noisy_level, where):
    from wsss.runner import outlines

    n = len(noisy_level)
    kw = {"threads": 2} if where == "threads" else {"processes": 2}
    if where == "processes":
        outlines._WORKERS.reserve(2)  # (started once per process, as in a run: untimed)
    runs = []

    def run():
        with outlines.OutlineBuilder(n, n, range(4), output="geojson", **kw) as b:
            for r in range(0, n, 32):
                b.add(noisy_level[r:r + 32])
            texts = b.finish()
            runs.append(dict(b.timings))
        assert all(texts.values())

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(gil=gil, where=where, size=n,
                                finish_s={k: float(np.median([r[k] for r in runs])) for k in runs[0]})


@pytest.fixture(scope="module")
def flat_slide(tmp_path_factory):
    from wsss.synthetic import write_synthetic_slide

    path = tmp_path_factory.mktemp("reads") / "flat.tif"
    write_synthetic_slide(str(path), READS, READS, seed=2, compression="zlib", max_levels=1)
    return path


@pytest.mark.parametrize("thumbnail", ["none", "per-tile", "per-batch"])
def test_tile_reads(benchmark, gil, flat_slide, thumbnail):
    from wsss.runner.thumbnail import TileThumbnail
    from wsss.runner.tiling import TileGrid
    from wsss.slide import SlideView, open_slide
    from wsss.slide.scale import plan_scale

    T, B = 256, 32
    reader = open_slide(flat_slide)
    view = SlideView(reader, plan_scale(reader, reader.mpp))
    grid = TileGrid(READS, READS, T, 32)
    ring = np.empty((B, T, T, 3), np.uint8)
    done = []

    def run():
        thumb = TileThumbnail(READS, READS, 16, grid.xs, grid.ys) if thumbnail != "none" else None
        for i, (x, y) in enumerate(grid.tiles):
            ring[i % B] = view.read(x, y, T, T)
            if thumbnail == "per-tile":
                thumb.add(x, y, ring[i % B])
            elif thumbnail == "per-batch" and (i % B == B - 1 or i == len(grid.tiles) - 1):
                b = i // B * B
                thumb.add_batch(grid.tiles[b:i + 1], ring[:i + 1 - b])
        done.append(thumb is None or thumb.complete)

    try:
        benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        view.close()
    assert done[-1]
    benchmark.extra_info.update(gil=gil, thumbnail=thumbnail, tiles=len(grid.tiles), factor=16)


@pytest.mark.parametrize("gil", ["alone", "contended", "held"], indirect=True)
@pytest.mark.parametrize("readers", ["threads", "processes"])
def test_read_batches(benchmark, gil, flat_slide, readers):
    from wsss.runner import reading
    from wsss.runner.pipeline import RunOptions, _StageTimer
    from wsss.runner.thumbnail import TileThumbnail
    from wsss.runner.tiling import TileGrid
    from wsss.slide import SlideView, open_slide
    from wsss.slide.scale import plan_scale

    reader = open_slide(flat_slide)
    view = SlideView(reader, plan_scale(reader, reader.mpp))
    grid = TileGrid(READS, READS, 256, 32)
    options = RunOptions(batch_size=32, workers=4)
    done = []
    if readers == "processes":
        reading.reserve(4)  # (started once per process, as in a run: untimed)

    def run():
        thumb = TileThumbnail(READS, READS, 16, grid.xs, grid.ys)
        views: list = []
        try:
            n = sum(len(positions) for positions, _ in reading.read_batches(
                view, grid, options, _StageTimer(), views, lambda: None, thumb, readers == "processes"))
        finally:
            for v in views:
                v.close()
        done.append(n == len(grid.tiles) and thumb.complete)

    try:
        benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        view.close()
    assert done[-1]
    assert readers == "threads" or not reading._WORKERS.broken
    benchmark.extra_info.update(gil=gil, tiles=len(grid.tiles), readers=4, batch=32, kind=readers)

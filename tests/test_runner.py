"""wsss.runner: exact reconstruction with trivial predictors, outputs, memory bound, resume, failures."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsss.errors import BundleError
from wsss.runner import RunOptions, TileGrid, run_slide, run_slides, tile_starts, weight_window
from wsss.runner.stitching import OutputTiles, Stitcher, TileSpool
from wsss.runner.writers import downsample_majority

from runner_kit import REAL_SLIDE  # noqa: E402

from runner_kit import (GEOMETRIES, K, PALETTE, colour_slide, dies_at, model, opts, red_class, run_python,  # noqa: E402,F401
                        soft_colour, write_pyramid)


@pytest.mark.parametrize("length,tile,overlap", [(1, 32, 0), (31, 32, 8), (32, 32, 8), (33, 32, 8), (100, 32, 0),
                                                 (101, 32, 31), (517, 64, 12)])
def test_tile_starts_cover_and_end_at_edge(length, tile, overlap):
    s = tile_starts(length, tile, overlap)
    assert s[0] == 0 and s == sorted(set(s))
    covered = np.zeros(length, bool)
    for a in s:
        covered[a:a + tile] = True
    assert covered.all()
    if length >= tile:
        assert s[-1] == length - tile
        assert all(b - a <= tile - overlap for a, b in zip(s, s[1:]))


def test_weight_window_positive_symmetric():
    w = weight_window(32, 8)
    assert w.shape == (32, 32) and w.min() > 0 and w.max() == 1.0
    np.testing.assert_allclose(w, w[::-1, ::-1])
    np.testing.assert_allclose(w, w.T)
    # in an overlap the two ramps cross-fade: they sum to a constant
    ramp = w[16]
    np.testing.assert_allclose(ramp[24:] + ramp[:8], 1.0, atol=1e-6)
    assert weight_window(32, 0).min() == 1.0
    # overlap > tile / 2 (any overlap below the tile is accepted): the ramps cross, and the
    # window still rises to the middle and falls, symmetric, with no jump (the second ramp
    # overwrote the first: 0.135 next to 0.688 at tile 16, overlap 12)
    for tile, overlap in ((16, 12), (32, 31), (33, 20)):
        row = weight_window(tile, overlap)[tile // 2]
        np.testing.assert_allclose(row, row[::-1])
        half = row[: (tile + 1) // 2]
        assert (np.diff(half) >= 0).all() and np.abs(np.diff(row)).max() < 2.5 / overlap, (tile, overlap)


def test_majority_vote_downsample_is_the_mode():
    vals = list(itertools.product(range(3), repeat=4))
    blocks = np.array(vals, np.uint8).reshape(-1, 2, 2)
    img = np.concatenate(list(blocks), axis=1)  # [2, 2 * n]
    got = downsample_majority(img)[0]
    for (a, b, c, d), g in zip(vals, got):
        counts = {v: (a, b, c, d).count(v) for v in (a, b, c, d)}
        assert counts[g] == max(counts.values()), (a, b, c, d, g)
        if counts[a] == max(counts.values()):
            assert g == a  # ties keep the top-left class


@pytest.mark.parametrize("top", [2, 5, 16, 17, 256])
def test_majority_vote_op_agrees_with_the_reference(top):
    import torch

    from wsss import reference

    rng = np.random.default_rng(top)
    img = (rng.random((64, 96)) * top).astype(np.uint8)
    want = reference.majority_downsample(torch.from_numpy(img)).numpy()
    np.testing.assert_array_equal(downsample_majority(img), want)
    np.testing.assert_array_equal(downsample_majority(img[:, ::-1]), reference.majority_downsample(
        torch.from_numpy(img[:, ::-1].copy())).numpy())  # (a strided view: copied for the op)


# --------------------------------------------------------------------------------------
# exact reconstruction
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,tile,overlap,out_tile", GEOMETRIES)
def test_exact_reconstruction_one_hot(tmp_path, h, w, tile, overlap, out_tile):
    img = colour_slide(h, w)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img])
    res = run_slide(path, model(tile=tile), tmp_path / "out", opts(overlap=overlap, output_tile=out_tile,
                                                                    write_probs=True))
    assert res.status == "done"
    labels = tifffile.imread(tmp_path / "out" / "labels.tiff", key=0)
    np.testing.assert_array_equal(labels, (img[..., 0] // 64).clip(0, K - 1))
    probs = tifffile.imread(tmp_path / "out" / "probs.tiff")
    assert probs.shape == (K, h, w) and probs.dtype == np.float16
    onehot = np.eye(K, dtype=np.float16)[labels].transpose(2, 0, 1)
    np.testing.assert_allclose(probs, onehot, atol=1e-3)


def test_exact_reconstruction_smooth_predictor(tmp_path):
    """Blending is a weighted mean: a per-pixel predictor comes back unchanged at every pixel."""
    img = colour_slide(70, 85, seed=3, block=1)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img])
    run_slide(path, model(soft_colour, tile=32), tmp_path / "out", opts(overlap=11, write_probs=True))
    want = soft_colour(torch.from_numpy(img.transpose(2, 0, 1))[None])[0].numpy()
    probs = tifffile.imread(tmp_path / "out" / "probs.tiff").astype(np.float32)
    np.testing.assert_allclose(probs, want, atol=1e-3)  # float16 storage
    labels = tifffile.imread(tmp_path / "out" / "labels.tiff", key=0)
    agree = labels == want.argmax(0)
    margin = np.sort(want, 0)[-1] - np.sort(want, 0)[-2]
    assert agree[margin > 1e-5].all()


@pytest.mark.parametrize("target_mpp,level", [(1.0, 1), (2.0, 2)])
def test_exact_reconstruction_on_pyramid_level(tmp_path, target_mpp, level):
    l0 = colour_slide(256, 192, block=8)
    levels = [l0, l0[::2, ::2].copy(), l0[::4, ::4].copy()]
    path = tmp_path / "p.tif"
    write_pyramid(path, levels, mpp=0.5)
    run_slide(path, model(tile=32, mpp=target_mpp), tmp_path / "out", opts(overlap=6))
    with tifffile.TiffFile(tmp_path / "out" / "labels.tiff") as t:
        labels = t.pages[0].asarray()
        res = t.pages[0].tags["XResolution"].value
    np.testing.assert_array_equal(labels, (levels[level][..., 0] // 64).clip(0, K - 1))
    assert 1e4 / (res[0] / res[1]) == pytest.approx(target_mpp)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["scale"]["level"] == level and run["scale"]["scale"] == 1.0


def test_resampled_read_matches_pil(tmp_path):
    from PIL import Image

    img = np.repeat(np.repeat(colour_slide(40, 50, block=4), 3, 0), 3, 1)  # 120 x 150, blocks of 12 px
    path = tmp_path / "r.tif"
    write_pyramid(path, [img], mpp=0.5)
    run_slide(path, model(tile=32, mpp=1.5), tmp_path / "out", opts(overlap=8, write_probs=True))
    labels = tifffile.imread(tmp_path / "out" / "labels.tiff", key=0)
    assert labels.shape == (40, 50)
    small = np.asarray(Image.fromarray(img).resize((50, 40), Image.BILINEAR))
    assert (labels == (small[..., 0] // 64).clip(0, K - 1)).mean() > 0.97


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------
def test_outputs_open_in_openslide_and_agree(tmp_path):
    import openslide
    from shapely.geometry import shape

    img = colour_slide(300, 260, block=20)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img])
    res = run_slide(path, model(tile=64), tmp_path / "out", opts(overlap=16, min_polygon_um2=0.0))
    out = tmp_path / "out"
    for name in ("labels.tiff", "overlay.png", "tissue_qc.png", "areas.json", "areas.csv", "polygons.geojson",
                 "run.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*")), "temporary files left behind"
    o = openslide.OpenSlide(str(out / "labels.tiff"))
    assert o.level_dimensions[0] == (260, 300) and o.level_count >= 3
    assert float(o.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    # palette image: OpenSlide shows the class colours
    rgb = np.asarray(o.read_region((0, 0), 0, (260, 300)))[..., :3]
    labels = tifffile.imread(out / "labels.tiff", key=0)
    np.testing.assert_array_equal(rgb, np.asarray(PALETTE, np.uint8)[labels])
    # majority-vote levels: level 1 equals the mode of 2x2 blocks of level 0
    l1 = tifffile.imread(out / "labels.tiff", key=1)
    np.testing.assert_array_equal(l1, downsample_majority(labels[:300, :260]))
    # areas
    areas = json.loads((out / "areas.json").read_text())
    counts = np.bincount(labels.ravel(), minlength=K)
    px_mm2 = (0.5e-3) ** 2
    for row in areas["classes"]:
        assert row["pixels"] == counts[row["index"]]
        assert row["area_mm2"] == pytest.approx(counts[row["index"]] * px_mm2)
    assert sum(r["percent_of_tissue"] for r in areas["classes"]) == pytest.approx(100.0)
    # each class's colour in the overlay and the label TIFF (the overlay has no legend)
    assert [r["colour"] for r in areas["classes"]] == ["#%02x%02x%02x" % tuple(c) for c in PALETTE[:K]]
    csv_lines = (out / "areas.csv").read_text().splitlines()
    assert csv_lines[0] == "index,class,pixels,area_mm2,percent_of_tissue,colour"
    assert csv_lines[1].endswith(",#%02x%02x%02x" % tuple(PALETTE[0]))
    # polygons: per-class area matches the pixel count (coarse: simplified outlines)
    gj = json.loads((out / "polygons.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    for f in gj["features"]:
        k = ["A", "B", "C", "D"].index(f["properties"]["classification"]["name"])
        assert shape(f["geometry"]).area == pytest.approx(counts[k], rel=0.05)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["model"]["identity"] == "test-red_class"
    assert run["tiles"]["run"] == len(tile_starts(300, 64, 16)) * len(tile_starts(260, 64, 16))
    assert {"read (worker time)", "infer", "stitch", "pyramid", "total"} <= set(run["timings_s"])
    assert res.areas == areas


def test_tissue_mask_limits_tiles_and_labels(tmp_path):
    from PIL import Image

    img = colour_slide(128, 128, block=8)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img])
    mask = np.zeros((16, 16), np.uint8)
    mask[:8, :8] = 1  # top-left quarter (64 x 64 px) is tissue
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")
    run_slide(path, model(tile=32), tmp_path / "out", opts(overlap=0, tissue=str(tmp_path / "mask.png")))
    labels = tifffile.imread(tmp_path / "out" / "labels.tiff", key=0)
    want = np.full((128, 128), 4, np.uint8)
    want[:64, :64] = (img[:64, :64, 0] // 64).clip(0, K - 1)
    np.testing.assert_array_equal(labels, want)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["tiles"]["run"] == 4 and run["tiles"]["grid"] == 16
    areas = json.loads((tmp_path / "out" / "areas.json").read_text())
    assert areas["tissue_pixels"] == 64 * 64


@pytest.mark.parametrize("tissue,mpp,k", [("auto", 4.0, 1), ("auto", 0.5, 2), ("none", 4.0, 1)])
def test_one_thumbnail_read_per_slide(tmp_path, monkeypatch, tissue, mpp, k):
    """One low-resolution read of the slide per run, shared by tissue detection and the overlay:
    at 4 um/px detection's thumbnail is as fine as the overview level and makes the overlay; at
    0.5 um/px the overview level is finer (detection wants >= 4 um/px), is read first and
    detection resizes it; without detection, on this flat TIFF, the reader threads sum the
    overlay's thumbnail from the tiles (no read at all)."""
    from PIL import Image

    from wsss.slide import SlideView

    img = colour_slide(320 * k, 300 * k, block=8)
    img[:, :110 * k] = 240  # glass: detection keeps the right part
    path = tmp_path / "s.tif"
    write_pyramid(path, [img], mpp=mpp)
    calls = []
    real = SlideView.read_downsampled
    monkeypatch.setattr(SlideView, "read_downsampled", lambda self, f, **kw: calls.append(f) or real(self, f, **kw))
    res = run_slide(path, model(tile=32, mpp=mpp), tmp_path / "out", opts(overlap=8, tissue=tissue))
    # the overview level here is level 0
    assert res.status == "done" and calls == ([] if tissue == "none" else [1.0])
    overlay = np.asarray(Image.open(tmp_path / "out" / "overlay.png"))
    # thumbnail | label colours, at the overview level; then the legend strip (class names)
    assert overlay.shape[1:] == (2 * 300 * k, 3) and 320 * k < overlay.shape[0] <= 320 * k + 80
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["tiles"]["thumbnail_from_tiles"] is (tissue == "none")
    if tissue == "auto":
        assert 0.5 < run["tissue"]["fraction"] < 0.7  # the right 190 of 300 columns
    if tissue == "auto":
        np.testing.assert_array_equal(overlay[:320 * k, :100], 240)  # glass: background, no tint


def _box_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Reference thumbnail: rounded mean over f x f blocks, partial blocks at the far edges."""
    h, w = img.shape[:2]
    H, W = -(-h // f), -(-w // f)
    total = np.zeros((H * f, W * f, 3))
    count = np.zeros((H * f, W * f, 1))
    total[:h, :w], count[:h, :w] = img, 1
    return np.floor(total.reshape(H, f, W, f, 3).sum((1, 3)) / count.reshape(H, f, W, f, 1).sum((1, 3)) + 0.5)


@pytest.mark.parametrize("h,w,tile,overlap,f", [(97, 131, 32, 8, 4), (31, 29, 32, 8, 2), (150, 64, 48, 20, 1),
                                                (77, 200, 32, 0, 16), (700, 900, 256, 0, 17), (513, 1025, 128, 64, 64),
                                                (2000, 1500, 256, 32, 512)])
def test_tile_thumbnail_is_the_box_mean_of_the_view(h, w, tile, overlap, f):
    """Summed from overlapping tiles (each pixel once: a tile owns up to the next tile's start),
    added from several threads in any order: exactly the rounded block mean of the view, on
    the label pyramid's grid (partial blocks at the far edges); both summing paths (strided
    adds for f <= 16, segmented sums above); None while a tile is missing."""
    from concurrent.futures import ThreadPoolExecutor

    from wsss.runner.thumbnail import TileThumbnail

    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    grid = TileGrid(w, h, tile, overlap)
    padded = np.full((max(h, tile), max(w, tile), 3), 255, np.uint8)  # (a grid smaller than a tile)
    padded[:h, :w] = img
    thumb = TileThumbnail(w, h, f, grid.xs, grid.ys)
    order = np.random.default_rng(1).permutation(len(grid.tiles))
    first, last = order[:-1], order[-1]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: thumb.add(*grid.tiles[i], padded[grid.tiles[i][1]:, grid.tiles[i][0]:][:tile, :tile]),
                      first))
    assert thumb.image() is None  # one tile short
    x, y = grid.tiles[last]
    thumb.add(x, y, padded[y:y + tile, x:x + tile])
    got = thumb.image()
    assert got.dtype == np.uint8 and got.shape == (-(-h // f), -(-w // f), 3)
    np.testing.assert_array_equal(got, _box_mean(img, f))


@pytest.mark.parametrize("f", [1, 3, 8, 16, 32, 64])
def test_tile_thumbnail_in_batches_is_the_same(f):
    """add_batch (the readers' path: tiles whose cores start and end on block edges summed
    together) gives add's image, row counts and callbacks, batches cut anywhere, in any order."""
    from wsss.runner.thumbnail import TileThumbnail

    rng = np.random.default_rng(f)
    for h, w, tile, overlap in [(1000, 1300, 256, 32), (517, 389, 96, 12), (64, 64, 64, 0), (300, 700, 128, 0)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        grid = TileGrid(w, h, tile, overlap)
        padded = np.full((h + tile, w + tile, 3), 255, np.uint8)
        padded[:h, :w] = img
        tiles = np.stack([padded[y:y + tile, x:x + tile] for x, y in grid.tiles])
        one, many = TileThumbnail(w, h, f, grid.xs, grid.ys), TileThumbnail(w, h, f, grid.xs, grid.ys)
        events = {id(one): [], id(many): []}
        for t in (one, many):
            t.on_rows = lambda t=t: events[id(t)].append(("rows", t.rows_done))
            t.on_complete = lambda t=t: events[id(t)].append(("complete", t.rows_done))
        for i, pos in enumerate(grid.tiles):
            one.add(*pos, tiles[i])
        cuts = np.unique(np.r_[0, rng.integers(0, len(grid.tiles), 4), len(grid.tiles)])
        for a, b in zip(cuts[:-1], cuts[1:]):
            many.add_batch(grid.tiles[a:b], tiles[a:b])
        np.testing.assert_array_equal(many.image(), one.image())
        np.testing.assert_array_equal(many.image(), _box_mean(img, f))
        assert many.rows_done == one.rows_done == one.shape[0]
        assert events[id(many)][-1] == ("complete", one.shape[0]) and events[id(one)][-1] == ("complete", one.shape[0])
        assert [e for e in events[id(many)] if e[0] == "rows"] == sorted(set(e for e in events[id(many)] if e[0] == "rows"))


def test_overlay_of_a_flat_slide_comes_from_the_tiles(tmp_path, monkeypatch):
    """A flat TIFF (no coarser level) without tissue detection: the overlay is the overview
    level's labels over the box mean of the slide, summed while the tiles were read; the slide
    is never read again for it.  With tissue detection (or a pyramid) nothing changes."""
    from PIL import Image

    from wsss.runner import writers
    from wsss.slide import SlideView

    img = colour_slide(1100, 1300, block=8)
    path = tmp_path / "flat.tif"
    write_pyramid(path, [img])
    calls = []
    real = SlideView.read_downsampled
    monkeypatch.setattr(SlideView, "read_downsampled", lambda self, f, **kw: calls.append(f) or real(self, f, **kw))
    res = run_slide(path, model(tile=64), tmp_path / "out", opts(overlap=16, output_tile=64))
    assert res.status == "done" and calls == []
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["tiles"]["thumbnail_from_tiles"] is True
    labels = tifffile.imread(tmp_path / "out" / "labels.tiff", key=1)  # the overview level (1100 / 2 <= 1024)
    writers.write_overlay(tmp_path / "want.png", _box_mean(img, 2).astype(np.uint8), labels, PALETTE, 4,
                          class_names=model(tile=64).class_names)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "overlay.png")),
                                  np.asarray(Image.open(tmp_path / "want.png")))
    # a slide with a level as coarse as the overview: that level is read (cheaper than summing)
    write_pyramid(tmp_path / "pyramid.tif", [img, np.ascontiguousarray(img[::2, ::2])])
    res = run_slide(tmp_path / "pyramid.tif", model(tile=64), tmp_path / "out2", opts(overlap=16, output_tile=64))
    assert res.status == "done" and calls == [2.0]
    assert json.loads((tmp_path / "out2" / "run.json").read_text())["tiles"]["thumbnail_from_tiles"] is False


def test_stitcher_memory_is_one_overlap_row():
    """Live accumulators in raster order: about one row of overlap strips, never the canvas."""
    W, H, tile, ov = 2000, 1500, 64, 8
    grid = TileGrid(W, H, tile, ov)
    spool = TileSpool("/dev/null", 64, W, H, np.uint8, fill=4)
    spool.put = lambda *a: None  # noqa: E731  (count only)
    finalize = lambda x, y, p: p.argmax(0).astype(np.uint8)  # noqa: E731
    st = Stitcher(W, H, tile, grid.xs, grid.ys, grid.tiles, weight_window(tile, ov), K, finalize, labels_out=None)
    st.labels_out = OutputTiles(spool, st.covered_pixels_per_output_tile(64))
    p = np.random.default_rng(0).random((K, tile, tile), dtype=np.float32)
    for (x, y) in grid.tiles:
        st.add(x, y, p)
    assert st.pending == 0 and not st.acc
    # the snapped last row overlaps its neighbour by more than ``ov``
    max_ov = max(a + tile - b for a, b in zip(grid.ys, grid.ys[1:]))
    strip_row = W * max_ov * (K + 1) * 4
    assert st.peak_piece_bytes <= 2 * strip_row + (K + 1) * 4 * tile * tile
    assert st.peak_piece_bytes < 0.05 * W * H * (K + 1) * 4
    assert st.labels_out.peak_buffers <= 2 * (W // 64 + 2)


@pytest.mark.parametrize("order", ["raster", "reversed", "shuffled", "columns"])
def test_stitcher_result_does_not_depend_on_arrival_order(tmp_path, order):
    """Pieces a tile completes are finalised merged (one rectangle in raster order, row runs
    otherwise): every order gives the labels and class counts of per-pixel blending."""
    W, H, tile, ov = 301, 233, 64, 12
    grid = TileGrid(W, H, tile, ov)
    window = weight_window(tile, ov)
    rng = np.random.default_rng(1)
    probs = {pos: rng.random((K, tile, tile), dtype=np.float32) for pos in grid.tiles}
    # per-pixel reference: weighted average over covering tiles, then argmax; class 1 is gated
    # out as background where its blended share is highest and below 0.3 (a finalize with a rule)
    num = np.zeros((K, H, W), np.float64)
    den = np.zeros((H, W), np.float64)
    for (x, y), p in probs.items():
        num[:, y:y + tile, x:x + tile] += p * window
        den[y:y + tile, x:x + tile] += window
    blended = (num / den).astype(np.float32)

    def finalize(x, y, p):
        lab = p.argmax(0).astype(np.uint8)
        lab[(lab == 1) & (p.max(0) < 0.3)] = K
        return lab

    want = finalize(0, 0, blended)
    tiles = list(grid.tiles)
    if order == "reversed":
        tiles = tiles[::-1]
    elif order == "shuffled":
        tiles = [tiles[i] for i in rng.permutation(len(tiles))]
    elif order == "columns":
        tiles = sorted(tiles)
    spool = TileSpool(str(tmp_path / "l.spool"), 64, W, H, np.uint8, fill=K)
    st = Stitcher(W, H, tile, grid.xs, grid.ys, grid.tiles, window, K, finalize, labels_out=None, background_index=K)
    st.labels_out = OutputTiles(spool, st.covered_pixels_per_output_tile(64))
    for pos in tiles:
        st.add(*pos, probs[pos])
    assert st.pending == 0 and not st.acc
    got = spool.read_all()
    # NB: float32 blending in another order than the float64 reference: ties may flip
    assert (got == want).mean() > 0.999
    np.testing.assert_array_equal(st.class_pixels[:K + 1], np.bincount(got.ravel(), minlength=K + 1))
    assert st.class_pixels.sum() == W * H


def test_heap_trimmer_trims_only_on_growth_past_the_first_level():
    """malloc_trim also hands back the model's freed activations (re-faulted every forward pass:
    17% of a tiny model's time here): trim only when RSS creeps 32 MB past its level at the
    first check, and never lower that level, so the activations' come-back never re-triggers."""
    from wsss.runner.tile_stage import _HeapTrimmer

    t = _HeapTrimmer(slack_mb=32)
    calls = []
    t._trim = lambda pad: calls.append(pad)
    rss = iter(int(mb * 2**20) for mb in (500, 520, 531, 540, 450, 500, 533, 600))
    t._rss = lambda: next(rss)
    for _ in range(8):
        t()
    # 500 sets the level; 540 (> 532), 533 and 600 trim; 450/500 after a trim do not lower it
    assert len(calls) == 3 and t.trims == 3 and t._base == 500 * 2**20


# --------------------------------------------------------------------------------------
# failures, many slides, resume
# --------------------------------------------------------------------------------------
def test_model_with_wrong_output_shape(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(40, 40)])
    bad = model(lambda x: torch.zeros(x.shape[0], K, 16, 16), tile=32)
    with pytest.raises(BundleError, match=r"expected \[\d+, K, 32, 32\]"):
        run_slide(path, bad, tmp_path / "out", opts())
    assert not (tmp_path / "out" / "labels.tiff").exists()
    assert not list((tmp_path / "out").glob(".*"))


def test_many_slides_bad_one_skipped(tmp_path):
    good = tmp_path / "a.tif"
    write_pyramid(good, [colour_slide(40, 50)])
    bad = tmp_path / "b.tif"
    bad.write_bytes(b"II*\x00garbage")
    res = run_slides([bad, good], model(), [tmp_path / "o" / "b", tmp_path / "o" / "a"], opts(), log=lambda s: None)
    assert [r.status for r in res] == ["failed", "done"]
    assert "b.tif" in res[0].message
    assert (tmp_path / "o" / "a" / "run.json").is_file()


# --------------------------------------------------------------------------------------
# many slides: outputs written in the background while the next slide's tiles run
# --------------------------------------------------------------------------------------
def _four_slides(tmp_path):
    paths = []
    for name, (h, w) in zip("abcd", [(90, 70), (0, 0), (64, 131), (45, 45)]):
        p = tmp_path / f"{name}.tif"
        if h:
            write_pyramid(p, [colour_slide(h, w, seed=ord(name))])
        else:
            p.write_bytes(b"II*\x00not a slide")
        paths.append(p)
    return paths


@pytest.mark.parametrize("first_fails", [False, True])
def test_background_outputs_equal_sequential_ones(tmp_path, first_fails):
    slides = _four_slides(tmp_path)
    if first_fails:
        slides = slides[1:] + slides[:1]
    names = [p.stem for p in slides]
    logs = {}
    for mode in (False, True):
        logs[mode] = []
        res = run_slides(slides, model(), [tmp_path / str(mode) / n for n in names],
                         opts(overlap=8, background_outputs=mode, write_probs=True), log=logs[mode].append)
        assert [r.slide for r in res] == [str(p) for p in slides]
        assert [r.status for r in res] == ["failed" if n == "b" else "done" for n in names]
    for n in names:
        if n == "b":
            continue
        for f in ("labels.tiff", "probs.tiff", "areas.json", "areas.csv", "polygons.geojson", "overlay.png",
                  "tissue_qc.png"):
            assert (tmp_path / "True" / n / f).read_bytes() == (tmp_path / "False" / n / f).read_bytes(), (n, f)
    # one result line per slide, in the slides' order, either way
    ends = {m: [line.split(":")[0] for line in logs[m] if ": done in" in line or "FAILED" in line] for m in logs}
    assert ends[False] == ends[True] == [f"{n}.tif" for n in names]


def test_background_outputs_overlap_the_next_slides_tiles(tmp_path, monkeypatch):
    """Slide a's GeoJSON waits until the model has seen slide c's tiles: only possible when a's
    outputs are written while c's tile stage runs (else it times out and a fails)."""
    import threading

    from wsss.runner import writers

    slides = [p for p in _four_slides(tmp_path) if p.stem != "b"]
    next_slide_running = threading.Event()
    real = writers.write_geojson

    def geojson(path, *args, **kw):
        if path.parent.name == "a" and not next_slide_running.wait(timeout=30):
            raise TimeoutError("slide c's tiles never ran while a's outputs were written")
        return real(path, *args, **kw)

    calls = []

    def predict(x):  # NB: batch_size 64: each slide's tiles are one batch, so call 2 is slide c's
        calls.append(x.shape[0])
        if len(calls) == 2:
            next_slide_running.set()
        return red_class(x)

    monkeypatch.setattr(writers, "write_geojson", geojson)
    res = run_slides(slides, model(predict), [tmp_path / "o" / p.stem for p in slides],
                     opts(overlap=8, background_outputs=True, batch_size=64), log=lambda s: None)
    assert [r.status for r in res] == ["done"] * 3, [r.message for r in res]
    assert next_slide_running.is_set() and len(calls) == 3


def test_many_slides_need_their_own_folders(tmp_path):
    from wsss.errors import WsssError

    a, _, c, _ = _four_slides(tmp_path)
    with pytest.raises(WsssError, match="would write to the same folder"):
        run_slides([a, c], model(), [tmp_path / "o", tmp_path / "x" / ".." / "o"], opts())
    assert not (tmp_path / "o").exists()


def test_background_output_failure_is_its_slides_alone(tmp_path, monkeypatch):
    from wsss.runner import writers

    slides = [p for p in _four_slides(tmp_path) if p.stem != "b"]
    real = writers.OverlayWriter.finish

    def finish(self):  # (the overlay's last rows, written after the slide's tiles)
        if "a" in [q.name for q in self.path.parents]:  # (written in the run's work folder inside o/a)
            raise OSError("disk full (test)")
        return real(self)

    monkeypatch.setattr(writers.OverlayWriter, "finish", finish)
    outs = [tmp_path / "o" / p.stem for p in slides]
    res = run_slides(slides, model(), outs, opts(overlap=8, background_outputs=True), log=lambda s: None)
    assert [r.status for r in res] == ["failed", "done", "done"]
    assert "disk full" in res[0].message
    assert not (outs[0] / "run.json").exists() and not list(outs[0].glob(".*")), "partial results left"
    assert not outs[0].exists(), "the folder the failed run made (and left empty) is removed"
    assert all((o / "run.json").is_file() for o in outs[1:])


class Interrupt(Exception):
    pass


def test_resume_after_kill_gives_identical_outputs(tmp_path):
    img = colour_slide(150, 140, block=9)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img])
    o = opts(overlap=8, resume=True)
    # 1. uninterrupted reference run
    run_slide(path, model(tile=32), tmp_path / "ref", o)
    # 2. a run killed part way (predictor dies on the 4th batch)
    dying = dies_at(4, Interrupt("killed"))
    dying.__name__ = "red_class"
    with pytest.raises(Interrupt):
        run_slide(path, model(dying, tile=32), tmp_path / "out", o)
    assert not (tmp_path / "out" / "run.json").exists()
    assert not (tmp_path / "out" / "labels.tiff").exists()
    assert not list((tmp_path / "out").glob(".*")), "temporary files left behind"
    # 3. resume: runs (nothing complete), then a second resume skips
    r = run_slide(path, model(tile=32), tmp_path / "out", o)
    assert r.status == "done"
    for name in ("labels.tiff", "areas.json", "areas.csv", "polygons.geojson", "overlay.png", "tissue_qc.png"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert run_slide(path, model(tile=32), tmp_path / "out", o).status == "skipped"
    # other options or another model: not skipped
    assert run_slide(path, model(tile=32), tmp_path / "out", opts(overlap=4, resume=True)).status == "done"
    assert run_slide(path, model(soft_colour, tile=32), tmp_path / "out", opts(overlap=4, resume=True)).status == "done"
    # a deleted output means not complete
    (tmp_path / "out" / "areas.csv").unlink()
    assert run_slide(path, model(soft_colour, tile=32), tmp_path / "out", opts(overlap=4, resume=True)).status == "done"


def test_workers_zero_and_many_agree(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(100, 90)])
    run_slide(path, model(soft_colour), tmp_path / "a", opts(workers=0, batch_size=1, overlap=8))
    run_slide(path, model(soft_colour), tmp_path / "b", opts(workers=3, batch_size=7, overlap=8))
    assert (tmp_path / "a" / "labels.tiff").read_bytes() == (tmp_path / "b" / "labels.tiff").read_bytes()



def test_read_ahead_is_bounded_and_reads_ahead(tmp_path, monkeypatch):
    """Reader threads keep up to batch x (workers + 2) tiles read beyond what the model has
    been given (memory bound), topped up once per batch - and do read ahead while it runs."""
    import threading
    import time

    from wsss.runner import tile_stage
    from wsss.slide import SlideView

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(200, 200)])
    lock, reads = threading.Lock(), [0]
    real = SlideView.read

    def counting_read(self, *a, **kw):
        out = real(self, *a, **kw)
        with lock:
            reads[0] += 1
        return out

    monkeypatch.setattr(SlideView, "read", counting_read)
    monkeypatch.setattr(tile_stage, "READER_PROCESSES", 0)  # (reads counted in this process)
    given, ahead = [0], []

    def slow(x):  # NB: the readers have time to fill the read-ahead while a batch "runs"
        given[0] += x.shape[0]
        time.sleep(0.03)
        with lock:
            ahead.append(reads[0] - given[0])
        return red_class(x)

    batch, workers = 3, 2
    res = run_slide(path, model(slow), tmp_path / "out", opts(overlap=8, batch_size=batch, workers=workers))
    assert res.status == "done" and given[0] == 64 and reads[0] == 64  # 8 x 8 tiles, each read once
    assert max(ahead) <= batch * (workers + 2)
    assert max(ahead) >= batch  # at least the next batch was read while this one ran

# --------------------------------------------------------------------------------------
# the real slide
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(not REAL_SLIDE.is_file(), reason=f"real test slide absent: {REAL_SLIDE}")
def test_real_slide_end_to_end(tmp_path):
    import openslide

    def brightness_class(x):  # a trivial "model": class by darkness
        g = x.float().mean(1)
        c = torch.bucketize(g, torch.tensor([90.0, 150.0, 200.0]))
        return torch.nn.functional.one_hot(c, K).permute(0, 3, 1, 2).float()

    res = run_slide(REAL_SLIDE, model(brightness_class, tile=256), tmp_path / "out",
                    RunOptions(overlap=32, progress=False, workers=2, batch_size=4))
    out = tmp_path / "out"
    run = json.loads((out / "run.json").read_text())
    # (an SVS of JPEG tiles: auto reads it with tifffile, to the same pixels as OpenSlide)
    assert run["slide"]["reader"] == "tifffile" and run["scale"]["mpp"] == pytest.approx(0.499)
    run_slide(REAL_SLIDE, model(brightness_class, tile=256), tmp_path / "os",
              RunOptions(overlap=32, progress=False, workers=2, batch_size=4, reader="openslide"))
    assert json.loads((tmp_path / "os" / "run.json").read_text())["slide"]["reader"] == "openslide"
    for name in ("labels.tiff", "areas.json", "polygons.geojson", "overlay.png", "tissue_qc.png"):
        assert (out / name).read_bytes() == (tmp_path / "os" / name).read_bytes(), name
    assert 0 < run["tiles"]["run"] < run["tiles"]["grid"]  # glass tiles skipped
    o = openslide.OpenSlide(str(out / "labels.tiff"))
    assert o.dimensions == (2220, 2967)
    labels = tifffile.imread(out / "labels.tiff", key=0)
    assert (labels[:100, :100] == 4).all()  # glass corner: background
    assert 0.2 < (labels != 4).mean() < 0.7
    gj = json.loads((out / "polygons.geojson").read_text())
    xs = [pt[0] for f in gj["features"] for poly in (f["geometry"]["coordinates"] if f["geometry"]["type"] == "MultiPolygon"
                                                     else [f["geometry"]["coordinates"]]) for pt in poly[0]]
    assert gj["features"] and 0 <= min(xs) and max(xs) <= 2220
    assert res.timings["total"] > 0


# --------------------------------------------------------------------------------------
# found by review (seventh session)
# --------------------------------------------------------------------------------------
def test_polygons_and_level_resolutions_use_powers_of_two(tmp_path):
    """A level-L label pixel covers 2^L grid pixels: on a grid whose width is not a multiple of
    2^L the ratio of the rounded-up level widths would shrink the GeoJSON (257 / 65 = 3.95, not 4)
    and mislabel the levels' resolution."""
    from shapely.geometry import shape

    img = np.full((301, 257, 3), [20, 0, 235], np.uint8)  # class 0
    img[100:200, 128:256, 0] = 2 * 64 + 20  # class 2: a block on level 2's grid
    path = tmp_path / "s.tif"
    write_pyramid(path, [img])
    run_slide(path, model(tile=64), tmp_path / "out", opts(overlap=16, min_polygon_um2=0.0))
    gj = json.loads((tmp_path / "out" / "polygons.geojson").read_text())
    block = next(f for f in gj["features"] if f["properties"]["classification"]["name"] == "C")
    assert shape(block["geometry"]).bounds == (128.0, 100.0, 256.0, 200.0)  # level 2 (2 um/px), x4
    # level 2 is 65 x 76 px = 260 x 304 grid px: its last pixels reach past the 257 x 301 slide
    for f in gj["features"]:
        x0, y0, x1, y1 = shape(f["geometry"]).bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= 257 and y1 <= 301
    with tifffile.TiffFile(tmp_path / "out" / "labels.tiff") as t:
        for i, page in enumerate(t.pages):
            num, den = page.tags["XResolution"].value
            assert num / den == pytest.approx(1e4 / (0.5 * 2 ** i)), i


def test_rerun_leaves_no_stale_optional_output(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(40, 50)])
    run_slide(path, model(), tmp_path / "out", opts(write_probs=True))
    assert (tmp_path / "out" / "probs.tiff").is_file()
    run_slide(path, model(), tmp_path / "out", opts())
    assert not (tmp_path / "out" / "probs.tiff").exists()  # not this run's: not beside its run.json


class _NoAddNote(RuntimeError):
    """An exception as Python 3.10 has them: no add_note."""

    def __getattribute__(self, name):
        if name == "add_note":
            raise AttributeError(name)
        return super().__getattribute__(name)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"),
                                   _NoAddNote("CUDA error: an illegal memory access")], ids=["py311", "py310"])
def test_failed_slide_message_names_the_batch(tmp_path, error):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(97, 131)])
    res = run_slides([path], model(dies_at(2, error)), [tmp_path / "out"], opts(), log=lambda s: None)
    assert res[0].status == "failed"
    assert "illegal memory access" in res[0].message and "the model failed on batch 2 (3 tiles" in res[0].message
    assert not (tmp_path / "out" / "run.json").exists()


def test_temporaries_of_killed_runs_are_removed(tmp_path):
    """A run killed by a signal leaves its temporaries; the next run into the folder removes
    those of dead processes of this host, and keeps those of live processes and other hosts."""
    import os
    import subprocess
    import sys

    from wsss.runner.writers import temp_tag

    host = temp_tag().split(".")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "out"
    out.mkdir()
    (out / f".work.{host}.{dead}.abcd1234.tmp").mkdir()
    (out / f".work.{host}.{dead}.abcd1234.tmp" / "labels.spool").write_bytes(b"x" * 1000)
    (out / f".labels.tiff.{host}.{dead}.efgh5678.tmp").write_bytes(b"partial")
    keep = [f".work.{host}.{os.getppid()}.live0000.tmp", f".labels.tiff.other-host.{dead}.abcd1234.tmp",
            ".notes.tmp"]
    for name in keep:
        (out / name).write_bytes(b"")
    logs: list = []
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(40, 50)])
    run_slide(path, model(), out, opts(), log=logs.append)
    assert sorted(p.name for p in out.glob(".*")) == sorted(keep)
    assert any("removed 2 temporary file(s) an interrupted earlier run left" in line for line in logs)


@pytest.mark.parametrize("stage", ["tiles", "outputs"])
def test_failed_rerun_keeps_the_earlier_result(tmp_path, monkeypatch, stage):
    """A rerun into a folder that holds a complete result writes its files in its work folder and
    publishes them only when all are written: failing in the tile stage or in the last writer
    leaves the earlier result (run.json included) byte for byte, and no mix of old and new files."""
    from wsss.runner import writers

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(97, 131)])
    out = tmp_path / "out"
    assert run_slide(path, model(), out, opts(write_probs=True)).status == "done"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if stage == "tiles":
        m = model(dies_at(2, RuntimeError("out of memory (test)")))
    else:
        m = model(soft_colour)  # other labels: any file of this run that got out would show

        def no_space(*a, **k):
            raise OSError(28, "No space left on device (test)")

        monkeypatch.setattr(writers, "write_tissue_qc", no_space)
    res = run_slides([path], m, [out], opts(write_probs=False), log=lambda s: None)
    assert res[0].status == "failed"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_sees_typed_out_defaults_as_the_same_run(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(97, 131)])
    out = tmp_path / "out"
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    same = opts(resume=True, tile_size=32, overlap=4, reader="tifffile", mpp=0.5, workers=0, batch_size=5)
    assert run_slide(path, model(tile=32), out, same).status == "skipped"
    assert run_slide(path, model(tile=32), out, opts(resume=True, overlap=6)).status == "done"


@pytest.mark.parametrize("edit", ["null", "[]", '"complete"', "sizes_list", "sizes_strings", "sizes_empty"])
def test_resume_redoes_a_slide_whose_run_json_is_not_a_finished_runs(tmp_path, edit):
    """run.json that parses but is not what a finished run writes: the slide is redone (it
    failed with an AttributeError on a null run.json)."""
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(60, 70)])
    out = tmp_path / "out"
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    info = json.loads((out / "run.json").read_text())
    sizes = info["output_sizes"]
    text = {"null": "null", "[]": "[]", '"complete"': '"complete"',
            "sizes_list": json.dumps({**info, "output_sizes": list(sizes)}),
            "sizes_strings": json.dumps({**info, "output_sizes": {k: str(v) for k, v in sizes.items()}}),
            "sizes_empty": json.dumps({**info, "output_sizes": {}})}[edit]
    (out / "run.json").write_text(text)
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "skipped"


def test_min_tissue_that_drops_every_tile_is_named(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(64, 64)])
    mask = np.zeros((8, 8), np.uint8)
    mask[::2, ::2] = 255  # a quarter of the slide, spread over every tile
    from PIL import Image

    Image.fromarray(mask).save(tmp_path / "m.png")
    lines = []
    res = run_slide(path, model(tile=32), tmp_path / "out", opts(overlap=0, tissue=str(tmp_path / "m.png"),
                                                                   min_tissue=0.9), log=lines.append)
    assert res.status == "done"
    assert any("warning: no tile has more than 90% tissue (--min-tissue 0.9)" in s for s in lines), lines
    assert not any("marks none of the slide" in s for s in lines)


def test_one_run_at_a_time_per_output_folder(tmp_path):
    """Another process writing the folder (its lock held here): the slide fails naming it, and
    nothing of the folder's is touched; free again, the slide runs."""
    import fcntl

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(60, 70)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = run_slides([path], model(tile=32), [out], opts(), log=lambda s: None)[0]
        assert res.status == "failed" and res.message == f"{out}: another run is writing this output folder now " \
                                                           f"(one run at a time per folder)"
        assert sorted(os.listdir(out)) == ["keep.txt"]
    finally:
        os.close(fd)
    assert run_slide(path, model(tile=32), out, opts()).status == "done"
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "skipped"  # (released after each)


def test_an_output_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    from wsss.runner import writers

    def too_large(*a, **k):
        raise OSError(27, "File too large")

    # (the overlay is written as its rows come, on the pyramid's thread: the error is its own)
    monkeypatch.setattr(writers.OverlayWriter, "_write", too_large)
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(40, 50)])
    res = run_slides([path], model(), [tmp_path / "out"], opts(), log=lambda s: None)
    assert res[0].status == "failed"
    assert res[0].message == f"{tmp_path / 'out' / 'overlay.png'}: cannot be written: File too large"


def test_batch_size_and_readers_default_by_device(tmp_path):
    import dataclasses

    cpu, cuda = model(), dataclasses.replace(model(), description={"device": "cuda:0"})
    assert (RunOptions().for_model(cpu).batch_size, RunOptions().for_model(cpu).workers) == (8, 2)
    assert (RunOptions().for_model(cuda).batch_size, RunOptions().for_model(cuda).workers) == (32, 4)
    assert (RunOptions(batch_size=5, workers=0).for_model(cuda).batch_size,
            RunOptions(batch_size=5, workers=0).for_model(cuda).workers) == (5, 0)  # given values stay
    tifffile.imwrite(tmp_path / "s.tif", colour_slide(64, 64), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    run_slide(tmp_path / "s.tif", cpu, tmp_path / "out", opts(batch_size=None, workers=None), log=lambda s: None)
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())["options"]
    assert (recorded["batch_size"], recorded["workers"]) == (8, 2)  # run.json says what ran


def _short_of_memory(most: int, predict=red_class):
    """A predictor whose 'GPU' has room for at most ``most`` tiles per call (0: none at all)."""
    sizes = []

    def predict_within(x):
        sizes.append(len(x))
        if len(x) > most:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} tiles")
        return predict(x)

    return predict_within, sizes


class _Handle:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


@pytest.mark.parametrize("path", ["predict", "submit", "predict_device"])
def test_a_batch_the_gpu_has_no_memory_for_runs_in_halves(tmp_path, path):
    import dataclasses

    tifffile.imwrite(tmp_path / "s.tif", colour_slide(150, 170), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    fn, sizes = _short_of_memory(3)
    m = model()
    if path == "submit":
        m = dataclasses.replace(m, submit=lambda x: _Handle(fn(x)))
    elif path == "predict_device":
        m = dataclasses.replace(m, predict_device=fn)
    else:
        m = dataclasses.replace(m, predict=fn)
    lines = []
    r = run_slide(tmp_path / "s.tif", m, tmp_path / "out", opts(batch_size=8, stitch_device="model" if path == "predict_device" else "cpu"),
                  log=lines.append)
    assert r.status == "done"
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2  # halved until it fit, then kept there
    assert any("ran out of memory with batches of 8 tiles; the slide ran in batches of 2" in s for s in lines)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["tiles"]["batch_size_run"] == 2
    ref = run_slide(tmp_path / "s.tif", model(), tmp_path / "ref", opts(batch_size=8), log=lambda s: None)
    assert ref.status == "done"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "labels.tiff", key=0),
                                  tifffile.imread(tmp_path / "ref" / "labels.tiff", key=0))


def test_no_room_for_one_tile_fails_the_slide_and_other_errors_are_not_retried(tmp_path):
    import dataclasses

    tifffile.imwrite(tmp_path / "s.tif", colour_slide(64, 64), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    fn, sizes = _short_of_memory(0)
    with pytest.raises(torch.OutOfMemoryError):
        run_slide(tmp_path / "s.tif", dataclasses.replace(model(), predict=fn), tmp_path / "out", opts(batch_size=4),
                  log=lambda s: None)
    assert sizes == [4, 2, 1]
    assert not (tmp_path / "out" / "run.json").exists()
    calls = []

    def broken(x):
        calls.append(len(x))
        raise RuntimeError("a model bug, not memory")

    with pytest.raises(RuntimeError, match="a model bug"):
        run_slide(tmp_path / "s.tif", dataclasses.replace(model(), predict=broken), tmp_path / "out2",
                  opts(batch_size=4), log=lambda s: None)
    assert calls == [4]


@pytest.mark.parametrize("thumbnail", ["read for detection", "summed from the tiles"])
def test_tissue_qc_is_written_while_the_tiles_run(tmp_path, thumbnail):
    """tissue_qc.png needs no labels: it is written (into the run's staging folder) during the
    tile stage, not after the last tile: at once with a thumbnail read for tissue detection,
    else once the readers have summed the overview from the last tile (a slide without levels)."""
    import time

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(160, 160)])
    o = opts(tissue="auto" if thumbnail == "read for detection" else "none", batch_size=2)
    total = []  # tiles per run (the first run counts them)

    def counting(x):
        total.append(x.shape[0])
        return red_class(x)

    assert run_slide(path, model(counting), tmp_path / "first", o, log=lambda s: None).status == "done"
    out = tmp_path / "out"
    done, seen = [0], []

    def predict(x):
        done[0] += x.shape[0]
        waits = not seen if thumbnail == "read for detection" else done[0] == sum(total)
        if waits:  # the first (last) batch waits, up to 20 s, for the picture to appear
            deadline = time.monotonic() + 20
            while not list(out.glob(".work.*/outputs/tissue_qc.png")) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(bool(list(out.glob(".work.*/outputs/tissue_qc.png"))))
        return red_class(x)

    res = run_slide(path, model(predict), out, o, log=lambda s: None)
    assert res.status == "done" and seen == [True]
    run = json.loads((out / "run.json").read_text())
    assert run["tiles"]["thumbnail_from_tiles"] == (thumbnail == "summed from the tiles")
    assert (out / "tissue_qc.png").read_bytes() == (tmp_path / "first" / "tissue_qc.png").read_bytes()


@pytest.mark.parametrize("buffer", [1, 700, 1 << 20])
def test_spool_reads_back_every_tile_while_it_is_written(tmp_path, monkeypatch, buffer):
    """Stored tiles go to the file in chunks of WRITE_BUFFER bytes and are read positionally:
    every tile reads back (from memory or the file) while another thread keeps storing, and
    iter_compressed gives the streams as stored."""
    import threading
    import zlib

    monkeypatch.setattr(TileSpool, "WRITE_BUFFER", buffer)
    rng = np.random.default_rng(buffer)
    spool = TileSpool(str(tmp_path / "s.spool"), 16, 16 * 9, 16 * 7, np.uint8, fill=4)
    tiles = {(r, c): (rng.random((16, 16)) * rng.integers(1, 6)).astype(np.uint8) for r in range(7) for c in range(9)
             if (r + c) % 5}
    order = list(tiles)
    rng.shuffle(order)
    stored, errors = [], []

    def reader():
        try:
            while len(stored) < len(order):
                for key in list(stored):
                    np.testing.assert_array_equal(spool.get(*key), tiles[key])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for key in order:
        spool.put(*key, tiles[key])
        stored.append(key)
    t.join()
    assert not errors, errors[0]
    for r in range(7):
        for c in range(9):
            np.testing.assert_array_equal(spool.get(r, c), tiles.get((r, c), np.full((16, 16), 4, np.uint8)))
    streams = list(spool.iter_compressed())
    assert len(streams) == 63
    for (r, c), blob in zip(((r, c) for r in range(7) for c in range(9)), streams):
        np.testing.assert_array_equal(np.frombuffer(zlib.decompress(blob), np.uint8).reshape(16, 16),
                                      tiles.get((r, c), np.full((16, 16), 4, np.uint8)))
    assert spool.stored_bytes == sum(len(b) for b in spool._blobs(list(tiles)))
    spool.close()


@pytest.mark.parametrize("channels", [0, 2])
@pytest.mark.parametrize("buffer", [1, 3000, 1 << 20])
def test_spool_put_many_and_get_many_round_trip(tmp_path, monkeypatch, buffer, channels):
    """put_many stores chosen tiles of a strip under their keys (one deflate call); get_many
    reads any keys back in one inflate call, from memory, from the file (one read over a close
    span or one per stream) or as fill, and agrees with get tile by tile."""
    monkeypatch.setattr(TileSpool, "WRITE_BUFFER", buffer)
    rng = np.random.default_rng(buffer + channels)
    shape = (channels, 8, 8) if channels else (8, 8)
    spool = TileSpool(str(tmp_path / "s.spool"), 8, 8 * 6, 8 * 5, np.float16 if channels else np.uint8,
                      channels=channels, fill=3)
    want = {}
    for r in rng.permutation(5):
        strip = (rng.random((6, *shape)) * 5).astype(spool.dtype)
        cols = [int(c) for c in rng.permutation(6)[:4]]
        spool.put_many(int(r), cols[::-1], strip, at=cols[::-1])
        want.update({(int(r), c): strip[c] for c in cols})
    fill = np.full(shape, 3, spool.dtype)
    every = [(r, c) for r in range(-1, 6) for c in range(7)]  # (some past the edges: fill)
    scattered = [every[i] for i in rng.permutation(len(every))[:9]]
    for keys in (every, scattered, [k for k in every if k in want], []):
        out = np.empty((len(keys), *shape), spool.dtype)
        spool.get_many(keys, out)
        for j, key in enumerate(keys):
            np.testing.assert_array_equal(out[j], want.get(key, fill))
            if key in want:
                np.testing.assert_array_equal(spool.get(*key), want[key])
    spool.close()


@pytest.mark.parametrize("channels", [0, 3])
@pytest.mark.parametrize("order", ["raster", "shuffled"])
def test_output_tiles_assemble_any_pieces_exactly(tmp_path, channels, order):
    """OutputTiles' strips: pieces of any shape (wide ones copied tile-row by tile-row in one
    go, narrow and partial ones tile by tile), in any order, give every tile exactly, uncovered
    pixels as fill, tiles without pixels never stored, and no strip left at the end."""
    from wsss.runner.stitching import pixels_per_output_tile

    rng = np.random.default_rng(7 + channels)
    H, W, T = 150, 230, 32
    shape = (channels, H, W) if channels else (H, W)
    image = rng.integers(0, 200, shape).astype(np.float16 if channels else np.uint8)
    ys = np.unique(np.r_[0, rng.integers(1, H, 6), H])
    # pieces of three whole tiles (96..192), one whole and partial ones, and the clipped right edge
    xs = [0, 5, 40, 96, 192, 199, W]
    rects = [(y0, y1, x0, x1) for y0, y1 in zip(ys, ys[1:]) for x0, x1 in zip(xs, xs[1:]) if rng.random() > 0.2]
    if order == "shuffled":
        rng.shuffle(rects)
    spool = TileSpool(str(tmp_path / "s"), T, W, H, image.dtype, channels=channels, fill=9)
    expected = pixels_per_output_tile(rects, W, H, T)
    stored = []
    out = OutputTiles(spool, expected, on_stored=lambda r, cs, strip: stored.extend((r, c) for c in cs))
    for y0, y1, x0, x1 in rects:
        out.paste(int(x0), int(y0), image[..., y0:y1, x0:x1])
    want = np.full(shape, 9, image.dtype)
    for y0, y1, x0, x1 in rects:
        want[..., y0:y1, x0:x1] = image[..., y0:y1, x0:x1]
    assert sorted(stored) == sorted(map(tuple, np.argwhere(expected > 0))) and not out.strips
    np.testing.assert_array_equal(spool.read_all(), want)
    spool.close()


def test_tuning_variables_that_are_not_numbers_warn_and_keep_the_default(monkeypatch):
    from wsss.runner.tile_stage import _env_number

    monkeypatch.setenv("WSSS_TEST_TUNING", "3")
    assert _env_number("WSSS_TEST_TUNING", 2) == 3
    monkeypatch.setenv("WSSS_TEST_TUNING", "0.005")
    assert _env_number("WSSS_TEST_TUNING", 0.001, float) == 0.005
    monkeypatch.setenv("WSSS_TEST_TUNING", "four")
    with pytest.warns(UserWarning, match="WSSS_TEST_TUNING='four' is not a whole number; using 2"):
        assert _env_number("WSSS_TEST_TUNING", 2) == 2
    monkeypatch.delenv("WSSS_TEST_TUNING")
    assert _env_number("WSSS_TEST_TUNING", 2) == 2


def test_a_slide_waits_for_the_preloaded_imports(tmp_path, monkeypatch):
    """run_slide starts only once preload_slide_libraries' thread has imported scikit-image: an
    import made beside it could see a half-initialised package (its lazy submodules raised
    AttributeError in ~1 of 10-20 runs of a tiny slide)."""
    import threading
    import time

    from wsss.runner import pipeline
    from wsss.slide import reader as readers

    events = []
    ready = threading.Event()

    def slow_imports():
        time.sleep(0.3)
        events.append("scikit-image imported")
        ready.set()

    thread = threading.Thread(target=slow_imports, daemon=True)
    monkeypatch.setattr(pipeline, "_preload", thread)
    monkeypatch.setattr(pipeline, "_tissue_libraries", ready)
    opened = readers.open_slide

    def open_slide(*a, **k):
        events.append("slide opened")
        return opened(*a, **k)

    monkeypatch.setattr("wsss.slide.open_slide", open_slide)
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(40, 40)])
    thread.start()
    r = run_slide(path, model(), tmp_path / "out", opts(tissue="auto"), log=lambda s: None)
    assert r.status == "done" and events == ["scikit-image imported", "slide opened"]
    assert r.timings["imports (waiting)"] > 0.1
    pipeline.preload_slide_libraries()  # (a second call while one thread exists starts none)
    assert pipeline._preload is thread


_PRELOAD_PROBE = """
import sys
from wsss.runner import pipeline
assert pipeline._preload is None and "skimage" not in sys.modules and "shapely" not in sys.modules
pipeline.preload_slide_libraries()
assert pipeline._tissue_libraries.wait(60)
assert "skimage.morphology" in sys.modules and "skimage.filters" in sys.modules
pipeline._preload.join(60)
assert "shapely" in sys.modules and "contourpy" in sys.modules
print("ok")
"""


def test_preload_imports_scikit_image_first_and_says_when():
    """The real preload thread, in a fresh process (in this one an earlier test may have run it
    already, or imported the libraries): the event the runner waits for is set once
    scikit-image's modules are in sys.modules, and the rest follows."""
    out = run_python(_PRELOAD_PROBE)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_an_empty_tissue_mask_is_named_in_the_warning(tmp_path):
    from PIL import Image

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(64, 64)])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    lines = []
    r = run_slide(path, model(), tmp_path / "out", opts(tissue=str(tmp_path / "empty.png")), log=lines.append)
    assert r.status == "done"
    warning = [s for s in lines if "no tissue found" in s]
    assert len(warning) == 1 and "the tissue mask empty.png marks none of the slide" in warning[0]
    assert "--tissue-mask takes a mask of your own" not in warning[0]
    # --probs on such a slide: said, not silently missing
    lines.clear()
    r = run_slide(path, model(), tmp_path / "out2", opts(tissue=str(tmp_path / "empty.png"), write_probs=True),
                  log=lines.append)
    assert r.status == "done" and not (tmp_path / "out2" / "probs.tiff").exists()
    assert any("--probs writes no probs.tiff" in s for s in lines), lines


def test_results_get_ordinary_permissions_without_touching_the_umask(tmp_path, monkeypatch):
    """Temporaries (mkstemp: 0600) become results with the mode a plainly created file gets.
    The umask is read, never set: setting it is process-wide, and the runner's threads writing
    outputs at once could leave it at 0 (every later file world-writable)."""
    import os

    from wsss.files import process_umask

    mask = process_umask()
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(90, 120)])

    def no_umask(_):
        raise AssertionError("os.umask called while outputs are written")

    monkeypatch.setattr(os, "umask", no_umask)
    res = run_slide(path, model(), tmp_path / "out", opts(overlap=8))
    assert res.status == "done", res.message
    for name in [*res.outputs, "run.json"]:
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.parametrize("failing", ["init", "timer"])
def test_finalise_thread_that_fails_to_start_does_not_hang_the_stitcher(failing):
    """An error in the finalising thread's ``init`` or ``timer`` reaches the blending thread; the
    thread keeps draining its queue, so ``add`` and ``finish`` never block on it."""
    import threading

    W, H, tile, ov = 300, 260, 64, 8
    grid = TileGrid(W, H, tile, ov)
    spool = TileSpool("/dev/null", 64, W, H, np.uint8, fill=4)
    spool.put = lambda *a: None  # noqa: E731
    finalize = lambda x, y, p: p.argmax(0).astype(np.uint8)  # noqa: E731
    st = Stitcher(W, H, tile, grid.xs, grid.ys, grid.tiles, weight_window(tile, ov), K, finalize, labels_out=None)
    st.labels_out = OutputTiles(spool, st.covered_pixels_per_output_tile(64))

    def boom(*_):
        raise OSError("finalise set-up failed")

    st.start_emit_thread(init=boom if failing == "init" else None, maxsize=1,
                         timer=boom if failing == "timer" else None)
    p = np.random.default_rng(0).random((K, tile, tile), dtype=np.float32)
    errors = []

    def feed():
        try:
            for (x, y) in grid.tiles:
                st.add(x, y, p)
            st.finish()
        except OSError as e:
            errors.append(e)
            st.finish(raise_errors=False)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the stitcher blocked on a dead finalising thread"
    assert errors and "finalise set-up failed" in str(errors[0])


def test_every_output_gives_a_label_the_same_colour(tmp_path):
    """One colour table for the label TIFF's colormap, the overlay, areas and the GeoJSON: a
    palette that colours background (index 4 here) still leaves it white everywhere, as the
    overlay always did."""
    import dataclasses

    palette = [list(p) for p in PALETTE]
    palette[4] = [10, 20, 30]
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(90, 120, block=30)])
    m = dataclasses.replace(model(), palette=palette)
    res = run_slide(path, m, tmp_path / "out", opts(overlap=8))
    assert res.status == "done", res.message
    with tifffile.TiffFile(tmp_path / "out" / "labels.tiff") as tif:
        cmap = tif.pages[0].colormap
        labels = tif.pages[0].asarray()
    assert cmap[:, 4].tolist() == [65535] * 3
    for k in range(K):
        assert (cmap[:, k] // 257).tolist() == palette[k]
    areas = json.loads((tmp_path / "out" / "areas.json").read_text())
    assert [r["colour"] for r in areas["classes"]] == ["#%02x%02x%02x" % tuple(palette[r["index"]]) for r in areas["classes"]]
    features = json.loads((tmp_path / "out" / "polygons.geojson").read_text())["features"]
    names = ["A", "B", "C", "D"]
    assert features
    for f in features:
        assert f["properties"]["classification"]["color"] == palette[names.index(f["properties"]["name"])]
    assert labels.max() < K


def test_probabilities_tiff_holds_the_blended_probabilities(tmp_path):
    """--probs: float16 [K, H, W], planar, tiled; the planes are the spool's streams as stored.
    The red_class predictor's one-hot scores blend to one-hot probabilities everywhere."""
    path = tmp_path / "s.tif"
    img = colour_slide(100, 140, block=20)
    write_pyramid(path, [img])
    res = run_slide(path, model(), tmp_path / "out", opts(overlap=8, write_probs=True))
    assert res.status == "done", res.message
    with tifffile.TiffFile(tmp_path / "out" / "probs.tiff") as tif:
        page = tif.pages[0]
        assert page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and page.is_tiled
        probs = page.asarray()
    assert probs.shape == (K, 100, 140) and probs.dtype == np.float16
    want = np.eye(K, dtype=np.float16)[np.clip(img[..., 0] // 64, 0, K - 1)].transpose(2, 0, 1)
    np.testing.assert_array_equal(probs, want)
    labels = tifffile.imread(tmp_path / "out" / "labels.tiff", key=0)
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_spool_of_planes_round_trips(tmp_path):
    """A multi-plane TileSpool (one stream per plane): get / get_many / read_all / iter_compressed
    agree with what was stored, and unstored tiles read back as the fill value."""
    import zlib

    C, T = 3, 16
    sp = TileSpool(str(tmp_path / "p.spool"), T, 40, 20, np.float16, channels=C, fill=0.5)
    rng = np.random.default_rng(0)
    strip = rng.random((3, C, T, T)).astype(np.float16)
    sp.put_many(0, [0, 2], strip, at=[0, 2])
    assert (0, 0) in sp and (0, 1) not in sp
    np.testing.assert_array_equal(sp.get(0, 2), strip[2])
    assert (sp.get(0, 1) == np.float16(0.5)).all() and sp.get(0, 1).shape == (C, T, T)
    out = np.empty((2, C, T, T), np.float16)
    sp.get_many([(0, 2), (1, 0)], out)
    np.testing.assert_array_equal(out[0], strip[2])
    assert (out[1] == np.float16(0.5)).all()
    plane1 = [np.frombuffer(zlib.decompress(b), np.float16).reshape(T, T) for b in sp.iter_compressed(channel=1)]
    assert len(plane1) == sp.rows * sp.cols
    np.testing.assert_array_equal(plane1[2], strip[2, 1])
    whole = sp.read_all()
    assert whole.shape == (C, 20, 40)
    np.testing.assert_array_equal(whole[:, :T, :T], strip[0])
    with pytest.raises(ValueError, match="channel None of a spool of 3 channels"):
        next(sp.iter_compressed())
    sp.close()


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_atomic_write_leaves_nothing(tmp_path, error):
    """wsss.files.write_atomic (checkpoints, metrics, masks, dataset.json): a write that fails,
    Ctrl-C included, leaves neither the result nor its temporary; an old result stays whole."""
    from wsss.files import save_png, write_atomic

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise error

    with pytest.raises(type(error)):
        write_atomic(tmp_path / "sub" / "m.json", failing)
    assert os.listdir(tmp_path / "sub") == []
    save_png(tmp_path / "a.png", np.zeros((4, 5), np.uint8), palette=[0, 0, 0, 255, 0, 0] + [0] * 762)
    before = (tmp_path / "a.png").read_bytes()
    with pytest.raises(type(error)):
        write_atomic(tmp_path / "a.png", failing)
    assert (tmp_path / "a.png").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.png", "sub"]


_CLEANUP_PROBE = """
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from runner_kit import colour_slide, dies_at, model, opts, write_pyramid
from wsss.runner import run_slide, writers

tmp = Path(sys.argv[1])
write_pyramid(tmp / "s.tif", [colour_slide(600, 600)])
real_close = writers.OverlayWriter.close

def close(self):  # as a buffered flush on a full disk does
    real_close(self)
    raise OSError(28, "No space left on device")

writers.OverlayWriter.close = close
try:
    run_slide(tmp / "s.tif", model(dies_at(5, RuntimeError("model failed"))), tmp / "out",
              opts(early_pyramid=True, tissue="none"), log=lambda s: None)
except RuntimeError as e:
    print("raised", e)
"""


def test_a_cleanup_step_that_fails_does_not_hang_the_process_or_hide_the_error(tmp_path):
    """A failing slide whose overlay cannot be closed (a full disk): the slide reports the
    model's error, not the cleanup's, and the process exits (the label TIFF's thread used to stay
    blocked on the pyramid the failed close never ended)."""
    tests = str(Path(__file__).resolve().parent)
    out = run_python(_CLEANUP_PROBE, str(tmp_path), tests)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "raised model failed", out.stdout
    assert not (tmp_path / "out" / "labels.tiff").exists()


def test_a_callable_that_reuses_its_output_buffer_gets_the_right_labels(tmp_path):
    """A plain predict callable may return the same tensor every call; the runner submits batch
    i+1 before it reads batch i, so it must own a copy (it viewed the buffer: batch i got batch
    i+1's probabilities)."""
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(120, 150, block=9)])
    buffer = {}

    def reusing(x):
        probs = red_class(x)
        buf = buffer.get(probs.shape)
        if buf is None:
            buf = buffer[probs.shape] = torch.empty(probs.shape)  # (contiguous: viewed as it is)
        buf.copy_(probs)
        return buf

    reusing.__name__ = "reusing"
    want = run_slide(path, model(), tmp_path / "a", opts(overlap=8, batch_size=2))
    got = run_slide(path, model(reusing), tmp_path / "b", opts(overlap=8, batch_size=2))
    assert want.status == got.status == "done"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b" / "labels.tiff", key=0),
                                  tifffile.imread(tmp_path / "a" / "labels.tiff", key=0))


def test_run_slides_needs_one_folder_per_slide(tmp_path):
    """zip() dropped the slides beyond the folders given, silently."""
    from wsss.errors import WsssError

    with pytest.raises(WsssError, match="2 slides and 1 output folders"):
        run_slides([tmp_path / "a.tif", tmp_path / "b.tif"], model(), [tmp_path / "a"], opts())

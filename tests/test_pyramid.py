"""wsss.runner.writers.LabelPyramid: the label pyramid built while the tiles run.

The oracle is the pyramid built after the fact from the complete level 0: the label TIFF must
be the same bytes whichever way and in whatever order the pyramid was built.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsss.runner import run_slide
from wsss.runner import writers
from wsss.runner.stitching import TileSpool
from wsss.runner.writers import LabelPyramid, build_label_pyramid, write_label_tiff

from runner_kit import GEOMETRIES, PALETTE, colour_slide, model, opts, red_class, write_pyramid  # noqa: E402


def level0(tmp_path: Path, w=300, h=170, tile=32, seed=0):
    """A level-0 spool with some tiles never stored, and its tiles (what a stitcher would put)."""
    rng = np.random.default_rng(seed)
    spool = TileSpool(str(tmp_path / f"l0-{seed}"), tile, w, h, np.uint8, fill=4)
    tiles = {(r, c): (rng.random((tile, tile)) * 5).astype(np.uint8)
             for r in range(spool.rows) for c in range(spool.cols) if (r * 7 + c) % 5}
    return spool, tiles


def tiff_bytes(path: Path, levels) -> bytes:
    write_label_tiff(path, levels, mpp=0.5, palette=PALETTE, background_index=4, class_names=list("ABCDE"))
    return path.read_bytes()


def expected_of(spool: TileSpool, tiles) -> np.ndarray:
    expected = np.zeros((spool.rows, spool.cols), np.int64)
    for (r, c) in tiles:
        expected[r, c] = 1  # any positive count: "this tile will come"
    return expected


@pytest.mark.parametrize("order", ["raster", "reversed", "shuffled"])
def test_built_during_the_tiles_gives_the_same_file(tmp_path, order):
    spool, tiles = level0(tmp_path)
    for (r, c), t in tiles.items():
        spool.put(r, c, t)
    (tmp_path / "a").mkdir()
    want = tiff_bytes(tmp_path / "after.tiff", build_label_pyramid(spool, tmp_path / "a", fill=4))

    early, tiles2 = level0(tmp_path, seed=0)
    keys = list(tiles2)
    if order == "reversed":
        keys = keys[::-1]
    elif order == "shuffled":
        np.random.default_rng(1).shuffle(keys)
    (tmp_path / "b").mkdir()
    with LabelPyramid(early, tmp_path / "b", fill=4, expected=expected_of(early, tiles2)) as pyramid:
        for (r, c) in keys:
            early.put(r, c, tiles2[(r, c)])
            pyramid.tile_stored(r, c)
        got = tiff_bytes(tmp_path / "early.tiff", pyramid.finish())
    assert got == want


def oracle_levels(image: np.ndarray, tile: int) -> list:
    """Each level from the whole level below, by the definition: pixels past its edge repeat
    its last valid row and column, then the 2x2 vote (wsss.reference.majority_downsample)."""
    import torch

    from wsss import reference

    levels = [image]
    for w, h in writers.level_sizes(image.shape[1], image.shape[0], tile)[1:]:
        below = levels[-1]
        block = np.pad(below, ((0, 2 * h - below.shape[0]), (0, 2 * w - below.shape[1])), mode="edge")
        levels.append(reference.majority_downsample(torch.from_numpy(block)).numpy())
    return levels


@pytest.mark.parametrize("w,h,tile,density", [(300, 170, 32, 0.8), (33, 517, 8, 0.5), (1, 1, 2, 1.0), (257, 64, 4, 0.1),
                                              (96, 96, 32, 0.0), (130, 250, 16, 1.0)])
def test_levels_are_the_majority_vote_of_the_level_below(tmp_path, w, h, tile, density):
    """Every level against the definition computed from the whole image; a tile is stored exactly
    where one of the level-0 tiles under it was; the same bytes for every vote_rows."""
    rng = np.random.default_rng(w * h)
    spool = TileSpool(str(tmp_path / "l0"), tile, w, h, np.uint8, fill=4)
    image = np.full((spool.rows * tile, spool.cols * tile), 4, np.uint8)
    stored = np.zeros((spool.rows, spool.cols), bool)
    for r in range(spool.rows):
        for c in range(spool.cols):
            if rng.random() < density:
                t = rng.integers(0, 4, (tile, tile)).astype(np.uint8)
                spool.put(r, c, t)
                image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = t
                stored[r, c] = True
    want = oracle_levels(image[:h, :w], tile)
    files = []
    for vote_rows in dict.fromkeys((None, 2, tile, 3 * tile)):
        folder = tmp_path / f"v{vote_rows}"
        folder.mkdir()
        with LabelPyramid(spool, folder, fill=4, vote_rows=vote_rows) as pyramid:
            levels = pyramid.finish()
            assert len(levels) == len(want)
            for i, (spool_i, level) in enumerate(zip(levels, want)):
                np.testing.assert_array_equal(spool_i.read_all(), level, err_msg=f"level {i}")
                if i:
                    under = np.zeros((spool_i.rows, spool_i.cols), bool)
                    ys, xs = np.nonzero(stored)
                    under[ys >> i, xs >> i] = True
                    assert {k for k in spool_i._index} == set(zip(*np.nonzero(under))), f"stored tiles of level {i}"
            files.append([b"".join(s.iter_compressed()) for s in levels])  # (what the label TIFF holds)
    assert all(f == files[0] for f in files)


def store_row(spool: TileSpool, tiles, r: int, pyramid: LabelPyramid) -> None:
    """Level-0 row r as the stitcher's OutputTiles stores it: its tiles in the spool, then the
    pyramid told with the strip they came from."""
    T = spool.tile
    strip = np.full((spool.cols, T, T), spool.fill, np.uint8)
    cols = [c for c in range(spool.cols) if (r, c) in tiles]
    for c in cols:
        strip[c] = tiles[(r, c)]
        spool.put(r, c, tiles[(r, c)])
    pyramid.tiles_stored(r, cols, strip)


def test_rows_reach_a_watcher_in_order_as_they_are_made(tmp_path):
    """watch_rows gets every row of its level, in order, from the stitcher's strips (never read
    back from the spool) while the tiles come; the same pyramid as one built afterwards."""
    spool, tiles = level0(tmp_path, w=300, h=170, tile=32)
    got, seen = [], []
    (tmp_path / "e").mkdir()
    with LabelPyramid(spool, tmp_path / "e", fill=4, expected=expected_of(spool, tiles)) as pyramid:
        pyramid.watch_rows(1, lambda rows: got.append(rows.copy()))
        for r in range(spool.rows):
            store_row(spool, tiles, r, pyramid)
            if r == 0:  # (its level-1 rows come before any other level-0 row is final)
                deadline = time.monotonic() + 10
                while sum(len(g) for g in got) < 16 and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen.append(sum(len(g) for g in got))
        with pytest.raises(RuntimeError, match="watch_rows"):
            pyramid.watch_rows(2, print)
        levels = pyramid.finish()
        rows = np.concatenate(got)
        np.testing.assert_array_equal(rows, levels[1].read_all())
        (tmp_path / "a").mkdir()
        after = build_label_pyramid(spool, tmp_path / "a", fill=4)
        assert tiff_bytes(tmp_path / "e.tiff", levels) == tiff_bytes(tmp_path / "a.tiff", after)
    assert seen == [16]  # (level-0 row 0's 32 rows are level 1's first 16)


def test_a_pyramid_behind_keeps_few_strips(tmp_path, monkeypatch):
    """Level-0 rows stored faster than the pyramid votes them: at most KEPT_STRIPS of the
    stitcher's strips are kept (the rest are read back from the spool); the same levels."""
    import threading

    spool, tiles = level0(tmp_path, w=300, h=170, tile=32)
    gate = threading.Event()
    real = LabelPyramid._read_and_vote
    monkeypatch.setattr(LabelPyramid, "_read_and_vote", lambda self, r: gate.wait(10) and real(self, r))
    (tmp_path / "e").mkdir()
    with LabelPyramid(spool, tmp_path / "e", fill=4, expected=expected_of(spool, tiles)) as pyramid:
        for r in range(spool.rows):
            store_row(spool, tiles, r, pyramid)
        assert len(pyramid._strips0) == LabelPyramid.KEPT_STRIPS < spool.rows
        gate.set()
        levels = pyramid.finish()
        (tmp_path / "a").mkdir()
        after = build_label_pyramid(spool, tmp_path / "a", fill=4)
        assert tiff_bytes(tmp_path / "e.tiff", levels) == tiff_bytes(tmp_path / "a.tiff", after)


def test_rows_are_built_as_soon_as_the_rows_below_are_final(tmp_path):
    spool, tiles = level0(tmp_path, w=128, h=128)  # 4 x 4 tiles: levels of 2 x 2 and 1 x 1 above
    with LabelPyramid(spool, tmp_path, fill=4, expected=expected_of(spool, tiles)) as pyramid:
        level1 = pyramid.levels[1]
        for (r, c), t in tiles.items():
            if r < 2:
                spool.put(r, c, t)
                pyramid.tile_stored(r, c)
        deadline = time.monotonic() + 10
        while not all((0, c) in level1 for c in range(2)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all((0, c) in level1 for c in range(2)), "row 0 of level 1 not built from final rows 0-1"
        assert not any((1, c) in level1 for c in range(2))  # rows 2-3 of level 0 are still to come
        assert len(pyramid.levels[2]._index) == 0
        for (r, c), t in tiles.items():
            if r >= 2:
                spool.put(r, c, t)
                pyramid.tile_stored(r, c)
        levels = pyramid.finish()
    assert (0, 0) in levels[2]


def test_a_failed_row_fails_finish(tmp_path, monkeypatch):
    spool, tiles = level0(tmp_path)

    def broken(*args, **kw):
        raise OSError("disk full (test)")

    monkeypatch.setattr(writers, "downsample_majority", broken)
    with LabelPyramid(spool, tmp_path, fill=4, expected=expected_of(spool, tiles)) as pyramid:
        for (r, c), t in tiles.items():
            spool.put(r, c, t)
            pyramid.tile_stored(r, c)
        with pytest.raises(OSError, match="disk full"):
            pyramid.finish()


def on_device(**kw):
    return dataclasses.replace(model(**kw), predict_device=red_class)


@pytest.mark.parametrize("stitch_device", ["cpu", "model"])
@pytest.mark.parametrize("h,w,tile,overlap,out_tile", GEOMETRIES)
def test_runner_early_pyramid_same_outputs(tmp_path, stitch_device, h, w, tile, overlap, out_tile):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(h, w)])
    outs = {}
    for early in (False, True):
        out = tmp_path / f"early-{early}"
        res = run_slide(path, on_device(tile=tile), out, opts(overlap=overlap, output_tile=out_tile, early_pyramid=early,
                                                              stitch_device=stitch_device))
        assert res.status == "done"
        run = json.loads((out / "run.json").read_text())
        assert run["tiles"]["pyramid_during_tiles"] is early
        outs[early] = out
    a, b = outs[False], outs[True]
    assert json.loads((a / "run.json").read_text())["fingerprint"] == json.loads((b / "run.json").read_text())["fingerprint"]
    for name in ("labels.tiff", "overlay.png", "polygons.geojson", "areas.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    with tifffile.TiffFile(b / "labels.tiff") as t:
        assert len(t.pages) > 1 or max(h, w) <= out_tile


def test_runner_early_pyramid_with_tissue_gaps(tmp_path):
    """Whole output-tile rows no tile covers: final from the start, their parents built early."""
    from PIL import Image

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(260, 230, block=8)])
    mask = np.zeros((26, 23), np.uint8)
    mask[:5, :8] = 1
    mask[17:, 10:] = 1
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")
    outs = []
    for early in (False, True):
        out = tmp_path / f"e{early}"
        assert run_slide(path, model(), out, opts(overlap=6, tissue=str(tmp_path / "mask.png"), min_tissue=0.2,
                                                  early_pyramid=early)).status == "done"
        outs.append((out / "labels.tiff").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("stitch_device", ["cpu", "model"])
def test_runner_outlines_traced_during_the_tiles(tmp_path, stitch_device):
    """With the pyramid built during the tile stage the GeoJSON's outlines are traced there too,
    slab by slab of the polygon level (here level 0, 10 tile rows): the same file as tracing the
    finished level, with objects that span many slabs."""
    import shapely
    from shapely.geometry import shape

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(300, 260, block=23)], mpp=2.0)
    files = []
    for early in (False, True):
        out = tmp_path / f"e{early}"
        assert run_slide(path, dataclasses.replace(on_device(), mpp=2.0), out,
                         opts(overlap=8, output_tile=32, early_pyramid=early, stitch_device=stitch_device)).status == "done"
        files.append((out / "polygons.geojson").read_bytes())
    assert files[0] == files[1]
    geoms = [shape(f["geometry"]) for f in json.loads(files[1])["features"]]
    assert all(g.is_valid for g in geoms)
    tall = max(b[3] - b[1] for g in geoms for b in shapely.bounds(shapely.get_parts(g)))
    assert tall > 3 * 32  # (an object across three slab boundaries at least)


def test_runner_early_outputs_a_failing_slide_leaves_nothing(tmp_path):
    """A slide that fails in the middle of its tiles, with the label TIFF and the outlines under
    way: the error surfaces, their threads end, and no output (not even a partial one) is left."""
    import threading

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(300, 260, block=23)], mpp=2.0)
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) == 12:
            raise RuntimeError("the model broke")
        return red_class(x)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the model broke"):
        run_slide(path, dataclasses.replace(model(predict=flaky), mpp=2.0), out,
                  opts(overlap=8, output_tile=32, early_pyramid=True))
    assert not any(t.name.startswith(("wsss-labels", "wsss-rowfeed", "wsss-outlines", "wsss-pyramid"))
                   for t in threading.enumerate())
    assert not out.exists() or not any(out.iterdir())

"""The two preview pictures (overlay.png, tissue_qc.png), pixel by pixel."""
from __future__ import annotations

import numpy as np
from PIL import Image

from wsss.runner.writers import QC_TILES, QC_TISSUE, legend_strip, write_overlay, write_tissue_qc

PALETTE = [[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0], [255, 255, 255]]
A = 115  # round(0.45 * 256): the overlay's integer alpha


def test_overlay_blends_class_colours_and_keeps_background(tmp_path):
    rng = np.random.default_rng(0)
    thumb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (40, 60)).astype(np.uint8)  # 4 = background
    write_overlay(tmp_path / "o.png", thumb, labels, PALETTE, 4)
    got = np.asarray(Image.open(tmp_path / "o.png"))
    assert got.shape == (40, 120, 3)
    colour = np.array(PALETTE, np.uint16)[labels]
    colour[labels == 4] = 255  # the legend shows background white
    want = (thumb.astype(np.uint16) * (256 - A) + colour * A) >> 8
    fg = labels != 4
    np.testing.assert_array_equal(got[:, :60][fg], want[fg])
    np.testing.assert_array_equal(got[:, :60][~fg], thumb[~fg])
    np.testing.assert_array_equal(got[:, 60:], colour)


def test_overlay_labels_of_another_size_are_resized_nearest(tmp_path):
    thumb = np.full((40, 60, 3), 100, np.uint8)
    labels = np.full((20, 30), 4, np.uint8)
    labels[:10, :15] = 1
    write_overlay(tmp_path / "o.png", thumb, labels, PALETTE, 4)
    got = np.asarray(Image.open(tmp_path / "o.png"))
    assert got.shape == (40, 120, 3)
    blended = (100 * (256 - A) + np.array(PALETTE[1]) * A) >> 8
    assert (got[:20, :30] == blended).all() and (got[20:, 30:60] == 100).all()
    assert (got[:20, 30:60] == 100).all() and (got[20:, :30] == 100).all()


def test_overlay_legend_names_each_class_in_its_colour(tmp_path):
    """With class names the overlay gets a legend strip below the two panels: a swatch of each
    class's colour and its name; the panels themselves are unchanged."""
    from wsss.runner.writers import legend_strip

    rng = np.random.default_rng(3)
    thumb = rng.integers(0, 256, (40, 300, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (40, 300)).astype(np.uint8)
    names = ["tumour epithelium", "necrosis", "lymphocytes", "stroma"]
    write_overlay(tmp_path / "plain.png", thumb, labels, PALETTE, 4)
    write_overlay(tmp_path / "legend.png", thumb, labels, PALETTE, 4, class_names=names)
    plain = np.asarray(Image.open(tmp_path / "plain.png"))
    got = np.asarray(Image.open(tmp_path / "legend.png"))
    strip = legend_strip(names, PALETTE, 600)
    assert got.shape == (40 + len(strip), 600, 3)
    np.testing.assert_array_equal(got[:40], plain)
    np.testing.assert_array_equal(got[40:], strip)
    for colour in PALETTE[:4]:  # each swatch, and text (dark pixels) beside it
        assert (strip == colour).all(axis=2).sum() >= 50
    assert (strip.max(axis=2) < 80).sum() > 100
    assert legend_strip(["line\nbreak", "tab\there"], PALETTE, 300).shape[1] == 300  # (a line break failed the layout)
    narrow = legend_strip(names, PALETTE, 120)  # wraps onto more lines rather than cutting names off
    assert narrow.shape[1] == 120 and len(narrow) > len(strip)
    assert all((narrow == c).all(axis=2).sum() >= 50 for c in PALETTE[:4])


def test_tissue_qc_dims_glass_and_outlines_tissue_and_tiles(tmp_path):
    thumb = np.random.default_rng(1).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    mask = np.zeros((50, 50), bool)
    mask[10:40, 10:40] = True
    tiles = np.zeros((50, 50), bool)
    tiles[5:45, 5:45] = True
    write_tissue_qc(tmp_path / "q.png", thumb, mask, tiles)
    got = np.asarray(Image.open(tmp_path / "q.png"))
    dimmed = (thumb.astype(np.uint16) * 115 + 141 * 128) >> 8
    np.testing.assert_array_equal(got[0:5], dimmed[0:5])  # glass outside the tiles: dimmed
    np.testing.assert_array_equal(got[20:30, 20:30], thumb[20:30, 20:30])  # tissue: as it is
    np.testing.assert_array_equal(got[10, 10:40], [[0, 200, 0]] * 30)  # tissue outline
    np.testing.assert_array_equal(got[5, 5:45], [[40, 90, 255]] * 40)  # tiles outline
    np.testing.assert_array_equal(got[7, 7:9], dimmed[7, 7:9])  # inside the tiles, off the tissue


def test_tissue_qc_without_detection_is_the_thumbnail(tmp_path):
    thumb = np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    full = np.ones((30, 20), bool)
    write_tissue_qc(tmp_path / "q.png", thumb, full, full)  # (edges are no boundary)
    got = np.asarray(Image.open(tmp_path / "q.png"))
    np.testing.assert_array_equal(got[:30], thumb)  # then the legend: tissue found, tiles run (nothing dimmed)
    np.testing.assert_array_equal(got[30:], legend_strip(["tissue found", "tiles run"], [QC_TISSUE, QC_TILES], 20))
    write_tissue_qc(tmp_path / "q.png", thumb, full, full, legend=False)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "q.png")), thumb)


def test_tiles_footprint_is_the_union_of_the_tiles():
    """The QC picture's footprint (one tile row at a time) against painting every tile."""
    import math
    import types

    from wsss.runner.pipeline import _tiles_footprint

    rng = np.random.default_rng(4)
    for _ in range(100):
        H, W = (int(v) for v in rng.integers(50, 3000, 2))
        tile = int(rng.integers(16, 300))
        ys = rng.choice(rng.integers(0, H, 6), 30)
        tiles = [(int(x), int(y)) for x, y in zip(rng.integers(0, W, 30), ys)]
        h, w = (int(v) for v in rng.integers(5, 300, 2))
        want = np.zeros((h, w), bool)
        for x, y in tiles:
            want[int(y * h / H):int(math.ceil((y + tile) * h / H)), int(x * w / W):int(math.ceil((x + tile) * w / W))] = True
        got = _tiles_footprint(types.SimpleNamespace(tiles=tiles), tile, types.SimpleNamespace(height=H, width=W), (h, w))
        assert (got == want).all()


def test_overlay_rows_in_any_bands_make_the_same_file(tmp_path):
    """OverlayWriter encodes rows as both inputs have them: label rows in bands of any size and a
    thumbnail whose rows complete bit by bit give the bytes of write_overlay's one pass; a file
    with a row missing is not finished, and closing leaves nothing behind."""
    import pytest

    from wsss.runner.writers import OverlayWriter

    rng = np.random.default_rng(5)
    thumb = rng.integers(0, 256, (300, 70, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (300, 70)).astype(np.uint8)
    write_overlay(tmp_path / "whole.png", thumb, labels, PALETTE, 4)

    class Source:  # (a TileThumbnail's interface: complete leading rows)
        rows_done = 0

        def rows(self, r0, r1):
            assert r1 <= self.rows_done
            return thumb[r0:r1]

    source = Source()
    with OverlayWriter(tmp_path / "bands.png", 70, 300, PALETTE, 4) as out:
        out.watch_thumbnail(source)
        r = 0
        while r < 300:
            n = int(rng.integers(1, 40))
            out.add_labels(labels[r:r + n])
            r += n
            source.rows_done = min(299, source.rows_done + int(rng.integers(1, 60)))
            out.thumbnail_rows()
        source.rows_done = 299
        out.thumbnail_rows()
        with pytest.raises(RuntimeError, match="299 of 300 rows"):
            out.finish()
        source.rows_done = 300
        out.thumbnail_rows()
        out.finish()
    assert (tmp_path / "bands.png").read_bytes() == (tmp_path / "whole.png").read_bytes()
    with OverlayWriter(tmp_path / "left.png", 70, 300, PALETTE, 4) as out:
        out.add_labels(labels[:10])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bands.png", "whole.png"]


def test_qc_mask_samples_each_axis_at_its_own_pitch():
    """The QC picture's mask outline: a picture built from tiles rounds each side up on its own,
    so rows and columns have their own pitch (rows used the columns' and drifted)."""
    import numpy as np

    from wsss.runner.pipeline import _mask_at
    from wsss.slide.tissue import TissueMask

    class Plan:
        mpp, width, height = 1.0, 1000, 500

    mask = np.zeros((500, 1000), bool)
    mask[:250] = True  # the top half
    out = _mask_at(TissueMask(mask, 1.0, 1.0, "test"), Plan, (126, 250))  # (500 / 4 rounded up)
    assert out[:, 0].sum() == 63 and out[:63].all() and not out[63:].any()

"""The units of the runner's outputs where they are easy to get wrong: slides whose level 0 is
not the model's resolution, pyramids with several levels, elongated slides, and runs with
background (a tissue mask and tiles never run).

Nearly every other end-to-end test runs on a flat slide at the model's own mpp, where grid
pixels, level-0 slide pixels and thumbnail factors all coincide; here they do not:

- a slide scanned at 0.25 um/px read by a 0.5 um/px model (the output grid is the slide's
  level 1): areas in mm2 at the grid's mpp, GeoJSON in level-0 slide pixels (x8 of the 2 um/px
  polygon level), speckle limits in um2, the label TIFF's recorded mpp;
- a three-level pyramid: thumbnails read from a coarser level with that level's factor;
- an elongated slide: the pictures' longest side capped.
"""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsss.runner import run_slide
from wsss.runner import writers

from runner_kit import PALETTE, model, opts, write_pyramid  # noqa: E402

NAMES = ["A", "B", "C", "D"]
BG = 4


def _class_image(cls: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] that runner_kit.red_class reads back as ``cls`` (red // 64)."""
    img = np.empty(cls.shape + (3,), np.uint8)
    img[..., 0] = cls * 64 + 20
    img[..., 1] = 128
    img[..., 2] = 255 - img[..., 0]
    return img


def _box_mean(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[:h - h % f, :w - w % f].reshape(h // f, f, w // f, f, 3).astype(np.float64).mean((1, 3))


def _geojson_shapes(path) -> dict:
    from shapely.geometry import shape

    gj = json.loads(path.read_text())
    return {f["properties"]["classification"]["name"]: shape(f["geometry"]) for f in gj["features"]}


# --------------------------------------------------------------------------------------
# a 0.25 um/px slide read by a 0.5 um/px model
# --------------------------------------------------------------------------------------
# The output grid (0.5 um/px) is 512 x 384 px = 256 x 192 um; the slide's level 0 is twice that
# in pixels.  The polygon level is label level 2 (2 um/px, 4 grid px, 8 slide px per pixel).
GRID_W, GRID_H = 512, 384
MASK_COLS = 12  # the tissue mask: 16 x 12 px of 16 um (32 grid px); its left 12 columns are tissue
TISSUE_W = MASK_COLS * 32  # grid columns [0, 384) are tissue, [384, 512) not: two tile columns never run
KEPT = (slice(40, 72), slice(40, 72))  # class B, 32 x 32 grid px = 16 x 16 um = 256 um2: kept
DROPPED = (slice(40, 64), slice(120, 144))  # class B, 24 x 24 grid px = 12 x 12 um = 144 um2: dropped
BLOCK = (slice(101, 207), slice(199, 305))  # class C, its edges off level 2's pixel grid
MIN_POLYGON_UM2 = 200.0  # = 50 px of the 2 um/px polygon level


@pytest.fixture(scope="module")
def fine_slide_run(tmp_path_factory):
    """One run of a 0.25 um/px two-level slide at 0.5 um/px with a tissue mask (the right
    quarter never runs); returns (output folder, grid class map before gating)."""
    tmp = tmp_path_factory.mktemp("fine")
    cls = np.zeros((GRID_H, GRID_W), np.int64)  # class A
    cls[KEPT] = 1
    cls[DROPPED] = 1
    cls[BLOCK] = 2  # (class D: nowhere)
    grid_img = _class_image(cls)
    level0 = np.repeat(np.repeat(grid_img, 2, 0), 2, 1)  # 1024 x 768 px at 0.25 um/px
    write_pyramid(tmp / "s.tif", [level0, grid_img], mpp=0.25)
    mask = np.zeros((12, 16), np.uint8)
    mask[:, :MASK_COLS] = 255
    Image.fromarray(mask).save(tmp / "mask.png")
    out = tmp / "out"
    res = run_slide(tmp / "s.tif", model(tile=64, mpp=0.5), out,
                    opts(overlap=0, tissue=str(tmp / "mask.png"), min_polygon_um2=MIN_POLYGON_UM2))
    assert res.status == "done"
    run = json.loads((out / "run.json").read_text())
    # the premise: the grid is the slide's level 1, at 0.5 um/px, not the slide's 0.25
    assert run["scale"]["level"] == 1 and run["scale"]["mpp"] == pytest.approx(0.5)
    assert (run["scale"]["width"], run["scale"]["height"]) == (GRID_W, GRID_H)
    assert run["tiles"]["run"] < run["tiles"]["grid"]  # tiles never run: background
    return out, cls


def test_areas_are_in_mm2_of_the_output_grid(fine_slide_run):
    """Guards against areas computed with the slide's level-0 mpp instead of the output grid's
    (0.25 instead of 0.5 um/px: every area 4x too small), and against the pixel area's unit: each
    class's area is its pixels x (0.5e-3 mm)^2 and equals the physical area of its region."""
    out, cls = fine_slide_run
    areas = json.loads((out / "areas.json").read_text())
    assert areas["mpp"] == pytest.approx(0.5)
    assert areas["pixel_area_mm2"] == pytest.approx(0.25e-6)
    rows = {r["class"]: r for r in areas["classes"]}
    for r in areas["classes"]:
        assert r["area_mm2"] == pytest.approx(r["pixels"] * (0.5e-3) ** 2, rel=1e-6, abs=1e-9)
    # physical areas, in um2 of the slide: class C is a 106 x 106 grid px = 53 x 53 um block
    assert rows["C"]["area_mm2"] == pytest.approx(53 * 53 * 1e-6)
    assert rows["B"]["area_mm2"] == pytest.approx((16 * 16 + 12 * 12) * 1e-6)
    # tissue: the mask's 12 columns of 16 um, 192 um high
    assert areas["tissue_area_mm2"] == pytest.approx(12 * 16 * 192 * 1e-6)


def test_areas_of_a_run_with_background(fine_slide_run):
    """Guards against percentages of tissue computed over tissue + background, a tissue area
    that includes the background, and tiles never run (outside the tissue mask) left out of the
    background count: background_pixels is every grid pixel not in a tissue class."""
    out, cls = fine_slide_run
    areas = json.loads((out / "areas.json").read_text())
    labels = tifffile.imread(out / "labels.tiff", key=0)
    assert labels.shape == (GRID_H, GRID_W)
    tissue = GRID_H * TISSUE_W
    want = cls.copy()
    want[:, TISSUE_W:] = BG
    np.testing.assert_array_equal(labels, want)
    assert areas["tissue_pixels"] == tissue
    assert areas["background_pixels"] == GRID_W * GRID_H - tissue == (labels == BG).sum()
    assert areas["tissue_area_mm2"] == pytest.approx(tissue * (0.5e-3) ** 2)
    counts = np.bincount(labels.ravel(), minlength=BG + 1)
    for r in areas["classes"]:
        assert r["pixels"] == counts[r["index"]]
        assert r["percent_of_tissue"] == pytest.approx(100.0 * counts[r["index"]] / tissue, abs=1e-6)
    assert sum(r["percent_of_tissue"] for r in areas["classes"]) == pytest.approx(100.0)


def test_areas_list_every_class_even_empty_ones(fine_slide_run):
    """Guards against a class with no pixel (class D here) dropped from areas.json / areas.csv:
    a table per slide must have the same rows on every slide."""
    out, _ = fine_slide_run
    areas = json.loads((out / "areas.json").read_text())
    assert [(r["index"], r["class"]) for r in areas["classes"]] == list(enumerate(NAMES))
    d = areas["classes"][3]
    assert d["pixels"] == 0 and d["area_mm2"] == 0 and d["percent_of_tissue"] == 0
    with open(out / "areas.csv", newline="", encoding="utf-8") as f:
        assert [row["class"] for row in csv.DictReader(f)] == NAMES


def test_areas_csv_agrees_with_the_json_field_by_field(fine_slide_run):
    """Guards against the CSV's columns swapped or a value written in other units (a
    percentage /100, ...): each data row, parsed, equals the JSON's row under its header."""
    out, _ = fine_slide_run
    areas = json.loads((out / "areas.json").read_text())
    with open(out / "areas.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "class", "pixels", "area_mm2", "percent_of_tissue", "colour"]
    assert len(rows) == 1 + len(areas["classes"])
    for row, want in zip(rows[1:], areas["classes"]):
        got = dict(zip(rows[0], row))
        assert int(got["index"]) == want["index"] and got["class"] == want["class"]
        assert int(got["pixels"]) == want["pixels"]
        assert float(got["area_mm2"]) == pytest.approx(want["area_mm2"], abs=1e-6)
        assert float(got["percent_of_tissue"]) == pytest.approx(want["percent_of_tissue"], abs=1e-3)
        assert got["colour"] == want["colour"]
    # (the rows are not all zero: the comparison means something)
    assert any(r["percent_of_tissue"] > 10 for r in areas["classes"])


def test_label_tiff_records_the_output_grids_mpp(fine_slide_run):
    """Guards against the label TIFF's description or resolution tags giving another mpp than
    the output grid's (0.5 um/px; not the slide's 0.25, nor in other units)."""
    out, _ = fine_slide_run
    with tifffile.TiffFile(out / "labels.tiff") as t:
        desc = json.loads(t.pages[0].description)
        assert desc["mpp"] == pytest.approx(0.5)
        assert desc["classes"][:4] == NAMES and desc["background_index"] == BG
        for i, page in enumerate(t.pages):
            num, den = page.tags["XResolution"].value
            assert 1e4 * den / num == pytest.approx(0.5 * 2 ** i), i


def test_geojson_is_in_level0_slide_pixels_from_the_2um_level(fine_slide_run):
    """Guards against GeoJSON coordinates in output-grid pixels instead of the input slide's
    level-0 pixels (a 0.25 um/px slide read at 0.5 um/px: every coordinate halved), and against
    outlines traced on another label level than the finest at >= 2 um/px (here level 2, whose
    majority vote moves the class C block's edges; level 1 would keep them)."""
    import shapely

    out, _ = fine_slide_run
    geoms = _geojson_shapes(out / "polygons.geojson")

    def bbox(level: int, k: int):
        lab = tifffile.imread(out / "labels.tiff", key=level)
        ys, xs = np.nonzero(lab == k)
        return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

    # level 2 is 2 um/px = 8 level-0 slide px at 0.25 um/px
    want = tuple(float(v * 8) for v in bbox(2, 2))
    assert geoms["C"].bounds == want
    assert want != tuple(float(v * 4) for v in bbox(1, 2))  # (the levels differ here)
    # the tissue (classes A..C) spans the mask's columns: 384 grid px = 768 slide px, all rows
    x0, y0, x1, y1 = shapely.union_all(list(geoms.values())).bounds
    assert (x0, y0, x1, y1) == (0.0, 0.0, 2.0 * TISSUE_W, 2.0 * GRID_H)


def test_speckle_limit_is_in_square_microns(fine_slide_run):
    """Guards against min_polygon_um2 converted to polygon-level pixels with the wrong power of
    the level's mpp (2 um/px: 200 um2 = 50 px, not 100): a 256-um2 island of class B is kept,
    a 144-um2 one dropped."""
    out, _ = fine_slide_run
    geoms = _geojson_shapes(out / "polygons.geojson")
    assert "B" in geoms, "the 256-um2 island of class B was dropped"
    b = geoms["B"]
    parts = list(getattr(b, "geoms", [b]))
    assert len(parts) == 1
    # the kept island, in level-0 slide px (x2 grid px); its area in um2 at 0.25 um/px
    assert parts[0].bounds == (80.0, 80.0, 144.0, 144.0)
    assert parts[0].area * 0.25 ** 2 == pytest.approx(256.0, rel=0.02)  # (corners cut by the tracing)


def test_polygon_level_is_the_finest_at_2um_per_pixel():
    """Guards against the polygon level's rule (docs/runner.md: the finest label level at >= 2
    um/px with <= 2048^2 pixels) being off by a level."""
    def levels(w, h, n):
        return [SimpleNamespace(width=-(-w // 2 ** i), height=-(-h // 2 ** i)) for i in range(n)]

    small = levels(4000, 3000, 8)
    assert writers.polygon_level(small, 0.5) == 2  # 2 um/px
    assert writers.polygon_level(small, 0.25) == 3  # 2 um/px
    assert writers.polygon_level(small, 0.7) == 2  # 2.8 um/px (1.4 is too fine)
    assert writers.polygon_level(levels(2000, 1500, 6), 2.0) == 0
    # within plan_scale's 5% tolerance: a 0.499 um/px scan read as is for a 0.5 um/px model
    assert writers.polygon_level(small, 0.499) == 2  # 1.996 um/px (not 3.99)
    assert writers.polygon_level(small, 0.48) == 2  # 1.92 um/px
    assert writers.polygon_level(small, 0.45) == 3  # 1.8 um/px is too fine: 3.6
    big = levels(20000, 20000, 10)  # level 2 at 0.5 um/px has 5000^2 px > 2048^2: level 4 (2500 px wide > 2048: no)
    assert writers.polygon_level(big, 0.5) == 4


# --------------------------------------------------------------------------------------
# simplification at scale > 1
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [4.0, 8.0])
def test_outline_simplification_is_in_label_pixels(scale):
    """Guards against the Douglas-Peucker tolerance (documented in label pixels) applied in
    output units: at scale s the outlines must be the scale-1 ones times s, not barely
    simplified staircases."""
    import shapely
    import shapely.affinity

    from wsss.runner.writers import label_polygons

    yy, xx = np.mgrid[:120, :120]
    lab = ((yy - 60) ** 2 + (xx - 60) ** 2 < 45 ** 2).astype(np.uint8)
    one = label_polygons(lab, 1, scale=1.0, simplify=0.4, min_area_px=1)
    exact = label_polygons(lab, 1, scale=1.0, simplify=0.0, min_area_px=1)
    got = label_polygons(lab, 1, scale=scale, simplify=0.4, min_area_px=1)
    assert shapely.get_num_coordinates(one) < 0.7 * shapely.get_num_coordinates(exact)  # (simplified)
    assert shapely.get_num_coordinates(got) == shapely.get_num_coordinates(one)
    assert shapely.equals_exact(shapely.affinity.scale(one, scale, scale, origin=(0, 0)), got, 1e-9)


# --------------------------------------------------------------------------------------
# a multi-level pyramid: thumbnails from a coarser level
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_pyramid(tmp_path_factory):
    """A synthetic JPEG slide, 1024 x 768 px at 0.5 um/px, with levels at 1, 2 and 4 um/px."""
    from wsss.synthetic import write_synthetic_slide

    path = tmp_path_factory.mktemp("syn") / "syn.tif"
    write_synthetic_slide(str(path), 1024, 768, mpp=0.5, tile_size=128)
    return path


@pytest.mark.parametrize("model_mpp,factor", [(0.5, 2), (0.5, 4), (0.5, 8), (1.0, 2), (1.0, 4)])
def test_thumbnail_from_a_coarser_level_is_the_box_mean(synthetic_pyramid, model_mpp, factor):
    """Guards against SlideView.read_downsampled reading a coarser pyramid level with the
    thumbnail's factor relative to the output grid instead of relative to that level (the
    region read lies mostly beyond the level: a white thumbnail)."""
    from wsss.slide import SlideView, open_slide, plan_scale

    path = synthetic_pyramid
    level0 = tifffile.imread(path, key=0)
    with open_slide(path, reader="tifffile") as r:
        assert r.level_count >= 3
        view = SlideView(r, plan_scale(r, model_mpp))
        assert view.thumbnail_level(factor) > view.plan.level  # (read from a coarser level)
        got = view.read_downsampled(factor).astype(np.float64)
    want = _box_mean(level0, int(round(factor * model_mpp / 0.5)))
    assert got.shape == want.shape
    diff = np.abs(got - want)
    # JPEG: each level compressed on its own (about 5 grey levels apart on this texture)
    assert diff.mean() < 8 and np.percentile(diff, 99) < 30
    assert abs(got.mean() - want.mean()) < 2.0


# --------------------------------------------------------------------------------------
# an elongated slide: the pictures' size cap, from a three-level pyramid
# --------------------------------------------------------------------------------------
def test_pictures_of_an_elongated_pyramid(tmp_path):
    """Guards against the overview level picked by the shorter side (a 2100 x 200 slide's
    pictures 2100 px wide, past the documented 1024-px cap on the longest side), and against
    the overlay's thumbnail read from the slide's 2 um/px level with the wrong factor (white):
    the overlay is the slide's level 2 under label level 2, the QC picture that level 2."""
    rng = np.random.default_rng(1)
    cls = rng.integers(0, 4, (200 // 20, 2100 // 20)).repeat(20, 0).repeat(20, 1)
    level0 = _class_image(cls)
    level0[..., 1] = rng.integers(0, 256, level0.shape[:2])
    levels = [level0]
    for _ in range(2):  # 2x box means, as a scanner's pyramid
        a = levels[-1].astype(np.uint16)
        levels.append(((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8))
    write_pyramid(tmp_path / "long.tif", levels, mpp=0.5)
    res = run_slide(tmp_path / "long.tif", model(tile=128), tmp_path / "out", opts(overlap=0))
    assert res.status == "done"
    out = tmp_path / "out"
    overlay = np.asarray(Image.open(out / "overlay.png"))
    qc = np.asarray(Image.open(out / "tissue_qc.png"))
    assert overlay.shape[1] == 2 * 525 and 50 < overlay.shape[0] <= 50 + 80
    assert qc.shape[1] == 525 and max(qc.shape[:2]) <= writers.OVERVIEW_MAX_PX
    labels2 = tifffile.imread(out / "labels.tiff", key=2)
    assert labels2.shape == (50, 525)
    writers.write_overlay(tmp_path / "want.png", levels[2], labels2, PALETTE, BG, class_names=NAMES)
    np.testing.assert_array_equal(overlay, np.asarray(Image.open(tmp_path / "want.png")))
    np.testing.assert_array_equal(qc[:50], levels[2])

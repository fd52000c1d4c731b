"""wsss.runner.writers.label_polygons / write_geojson: label map -> QuPath polygons.

The oracle is the label map itself: unsimplified outlines must contain exactly the class's
pixel centres, parts must never overlap (a MultiPolygon with overlapping parts is invalid
GeoJSON and double-counts area in QuPath), and speckle rules must drop what they say.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from wsss.runner.writers import label_polygons, write_geojson


def centres_inside(geom, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    if geom is None:
        return np.zeros((h, w), bool)
    return shapely.contains_xy(geom, xx + 0.5, yy + 0.5)  # pixel (x, y) spans [x, x+1] x [y, y+1]


@pytest.mark.parametrize("seed", range(6))
def test_unsimplified_outlines_hold_exactly_the_class_pixels(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        labels = (rng.random((h, w)) * rng.integers(1, 5)).astype(np.uint8)
        if rng.random() < 0.5:  # blobs as well as salt and pepper
            labels = np.kron(labels[: h // 4 + 1, : w // 4 + 1], np.ones((4, 4), np.uint8))[:h, :w]
        if rng.random() < 0.5:  # rows without a class: the tracer's pieces (one pass each)
            labels[rng.random(h) < 0.3] = 9
        for k in range(int(labels.max()) + 2):
            g = label_polygons(labels, k, scale=1.0, simplify=0, min_area_px=0)
            assert (centres_inside(g, h, w) == (labels == k)).all()
            if g is not None:
                assert g.is_valid
                assert sum(p.area for p in g.geoms) == pytest.approx(g.area)  # parts do not overlap


@pytest.mark.parametrize("seed", range(4))
def test_outlines_end_at_the_slides_edge(seed):
    """The last label pixel of a row reaches past the slide (extent): its outlines are squeezed
    to the edge, valid, with the same pixels inside, and nothing else moves."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(2, 40, 2))
        labels = (rng.random((h, w)) * rng.integers(1, 5)).astype(np.uint8)
        if rng.random() < 0.5:
            labels = np.kron(labels[: h // 3 + 1, : w // 3 + 1], np.ones((3, 3), np.uint8))[:h, :w]
        ex, ey = w - 1 + float(rng.uniform(0.05, 1.0)), h - 1 + float(rng.uniform(0.05, 1.0))
        for k in range(int(labels.max()) + 1):
            for simplify in (0, 0.4):
                g = label_polygons(labels, k, scale=2.0, simplify=simplify, min_area_px=0, extent=(ex, ey))
                free = label_polygons(labels, k, scale=2.0, simplify=simplify, min_area_px=0)
                if g is None:
                    assert free is None
                    continue
                assert g.is_valid and len(g.geoms) == len(free.geoms)
                x0, y0, x1, y1 = g.bounds
                assert x0 >= 0 and y0 >= 0 and x1 <= 2 * ex + 1e-9 and y1 <= 2 * ey + 1e-9
                if simplify > 0:  # (Douglas-Peucker may pick other vertices of a ring that is squeezed)
                    continue
                strips = 4 * (h * (w - ex) + w * (h - ey))  # at most the squeezed strips (areas x scale^2)
                assert abs(g.area - free.area) <= strips + 1e-9
                # unsimplified: nothing moves away from the last pixels (a marching-squares
                # chamfer from the last-but-one pixel reaches half a pixel into the last one)
                inner = shapely.box(0, 0, 2 * (w - 1.5), 2 * (h - 1.5))
                assert g.intersection(inner).symmetric_difference(free.intersection(inner)).area < 1e-9
                # the class pixels' centres (squeezed as well) are still inside
                yy, xx = np.mgrid[0:h, 0:w] + 0.5
                xx = np.where(xx > w - 1, w - 1 + (xx - (w - 1)) * (ex - (w - 1)), xx)
                yy = np.where(yy > h - 1, h - 1 + (yy - (h - 1)) * (ey - (h - 1)), yy)
                assert (shapely.contains_xy(g, 2 * xx, 2 * yy) == (labels == k)).all()


def nested() -> np.ndarray:
    """An object (class 1) with a big hole holding an island, a 2x2 hole and a lone pixel."""
    lab = np.zeros((40, 40), np.uint8)
    lab[2:38, 2:38] = 1
    lab[8:30, 8:30] = 0  # big hole (484 px) ...
    lab[14:20, 14:20] = 1  # ... with an island of 36 px inside
    lab[33:35, 33:35] = 0  # small hole: 4 px
    lab[0, 39] = 1  # lone pixel
    return lab


def test_island_inside_a_hole_is_its_own_part_and_nothing_overlaps():
    g = label_polygons(nested(), 1, scale=1.0, simplify=0, min_area_px=0)
    assert g.is_valid and len(g.geoms) == 3
    areas = sorted(p.area for p in g.geoms)
    assert areas[0] == pytest.approx(0.5)  # the lone pixel: a diamond (marching squares)
    assert areas[1] == pytest.approx(36 - 0.5)  # the island: four chamfered corners
    big = max(g.geoms, key=lambda p: p.area)
    assert len(big.interiors) == 2
    assert sum(p.area for p in g.geoms) == pytest.approx(g.area)


def test_speckle_rules():
    # min area 5: the lone pixel and the 4-px hole go (hole filled); the island and big hole stay
    g = label_polygons(nested(), 1, scale=1.0, simplify=0, min_area_px=5)
    assert g.is_valid and len(g.geoms) == 2
    big = max(g.geoms, key=lambda p: p.area)
    assert len(big.interiors) == 1
    assert big.contains(shapely.Point(33.9, 33.9))  # the small hole is filled
    # min area 500: the big hole (~484 px) is filled, so the island inside it must go too
    g = label_polygons(nested(), 1, scale=1.0, simplify=0, min_area_px=500)
    assert g.is_valid and len(g.geoms) == 1 and len(g.geoms[0].interiors) == 0
    assert label_polygons(nested(), 1, scale=1.0, min_area_px=10_000) is None
    assert label_polygons(nested(), 7, scale=1.0) is None  # class absent


def test_simplified_outlines_are_valid_close_and_scaled():
    rng = np.random.default_rng(7)
    coarse = (rng.random((12, 12)) * 3).astype(np.uint8)
    labels = np.kron(coarse, np.ones((8, 8), np.uint8))
    for k in range(3):
        exact = label_polygons(labels, k, scale=1.0, simplify=0, min_area_px=0)
        g = label_polygons(labels, k, scale=2.5, min_area_px=0)
        assert g.is_valid
        assert g.area / 2.5**2 == pytest.approx(exact.area, rel=0.01)
        assert g.area / 2.5**2 == pytest.approx((labels == k).sum(), rel=0.02)
    # straight runs of pixel edges collapse to their ends: a square is 8 corners (+ the closing one)
    square = np.zeros((20, 20), np.uint8)
    square[4:12, 6:14] = 1
    assert shapely.get_num_coordinates(label_polygons(square, 1, scale=1.0, simplify=0, min_area_px=0)) == 9


def test_rings_the_simplification_collapses():
    """Douglas-Peucker at 0.6 px leaves a one-pixel diamond (half-diagonal 0.5) as a, c, a: a ring
    that collapses is written unsimplified, hole or object (nothing is filled or lost).  (At the
    default 0.4 nothing a marching-squares ring holds collapses.)"""
    labels = np.zeros((20, 30), np.uint8)
    labels[2:12, 2:12] = 1
    labels[6, 6] = 0  # a one-pixel hole
    labels[15, 20] = 1  # a one-pixel object
    assert len(max(label_polygons(labels, 1, scale=1.0, min_area_px=0).geoms, key=lambda p: p.area).interiors) == 1
    g = label_polygons(labels, 1, scale=1.0, min_area_px=0, simplify=0.6)
    assert g.is_valid and len(g.geoms) == 2
    block, dot = sorted(g.geoms, key=lambda p: -p.area)
    assert len(block.interiors) == 1 and shapely.Polygon(block.interiors[0]).area == 0.5
    assert not block.contains(shapely.Point(6.5, 6.5))
    assert dot.area == 0.5 and dot.within(shapely.box(20, 15, 21, 16))


def test_outlines_across_slabs_are_the_whole_maps():
    """Traced in slabs of any height (rows arriving in bands, as the runner feeds them), exact
    outlines are the whole map's: the same polygons, holes joined across slab rows included, and
    simplified ones are valid and equally close; the classes' pieces never overlap."""
    from wsss.runner.outlines import trace_outlines

    rng = np.random.default_rng(11)
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(8, 70, 2))
        labels = np.kron((rng.random((h // 3 + 1, w // 3 + 1)) * 3).astype(np.uint8), np.ones((3, 3), np.uint8))[:h, :w]
        whole = trace_outlines(labels, range(3), slab_rows=h, tail_rows=h, simplify=0, min_area_px=0)
        for slab in (1, 2, 5, 16):
            exact = trace_outlines(labels, range(3), slab_rows=slab, simplify=0, min_area_px=0, threads=2)
            simple = trace_outlines(labels, range(3), slab_rows=slab, min_area_px=2, threads=2)
            for k in range(3):
                assert (exact[k] is None) == (whole[k] is None)
                if whole[k] is None:
                    continue
                assert exact[k].normalize().equals_exact(shapely.normalize(shapely.simplify(whole[k], 0)), 1e-9) or \
                    exact[k].symmetric_difference(whole[k]).area == 0
                assert len(exact[k].geoms) == len(whole[k].geoms)
                assert sum(len(p.interiors) for p in exact[k].geoms) == sum(len(p.interiors) for p in whole[k].geoms)
                assert simple[k].is_valid and sum(p.area for p in simple[k].geoms) == pytest.approx(simple[k].area)
                assert simple[k].symmetric_difference(whole[k]).area <= 0.6 * whole[k].length


def test_speckle_across_slabs():
    """min_area_px counts a joined object's whole area, not its pieces': a 3-px line cut into
    1-px pieces by 1-row slabs is kept with min_area 3 and dropped with 4; the same for a hole."""
    from wsss.runner.outlines import trace_outlines

    labels = np.zeros((9, 9), np.uint8)
    labels[2:5, 2] = 1  # vertical 3-px object
    labels[6:9, 5:9] = 1
    labels[7, 6] = 0  # (a 1-px hole: 0.5 px^2 of marching-squares area)
    for slab in (1, 2, 9):
        kept = trace_outlines(labels, [1], slab_rows=slab, simplify=0, min_area_px=2)[1]
        assert len(kept.geoms) == 2 and sum(len(p.interiors) for p in kept.geoms) == 0
        dropped = trace_outlines(labels, [1], slab_rows=slab, simplify=0, min_area_px=3)[1]
        assert len(dropped.geoms) == 1


def test_outlines_of_tiny_maps_in_one_row_slabs():
    from wsss.runner.outlines import OutlineBuilder, trace_outlines

    rng = np.random.default_rng(2)
    for h, w in [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2)]:
        labels = (rng.random((h, w)) * 2).astype(np.uint8)
        for slab in (1, 2, 5):
            out = trace_outlines(labels, [0, 1], slab_rows=slab, simplify=0, min_area_px=0)
            for k, g in out.items():
                assert (centres_inside(g, h, w) == (labels == k)).all(), (h, w, slab, k)
    assert OutlineBuilder(3, 0, [1]).finish() == {1: None}


def test_outline_builder_refuses_bad_rows():
    from wsss.runner.outlines import OutlineBuilder

    with OutlineBuilder(5, 4, [1]) as b:
        with pytest.raises(ValueError, match=r"rows must be \[n, 5\]"):
            b.add(np.zeros((2, 6), np.uint8))
        b.add(np.zeros((3, 5), np.uint8))
        with pytest.raises(ValueError, match="4 rows added to a map of 4|5 rows added to a map of 4"):
            b.add(np.zeros((2, 5), np.uint8))
        with pytest.raises(ValueError, match="finish\\(\\) after 3 rows of 4"):
            b.finish()


def test_geojson_file(tmp_path):
    labels = nested()
    labels[20:26, 30:36] = 2
    n = write_geojson(tmp_path / "p.geojson", labels, scale=4.0, class_names=["glass", "tumour", "stroma"],
                      palette=[[0, 0, 0], [200, 0, 0], [0, 0, 200]], background_index=0, min_area_px=1)
    gj = json.loads((tmp_path / "p.geojson").read_text())
    assert n == 2 and gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    by_name = {f["properties"]["name"]: f for f in gj["features"]}
    assert set(by_name) == {"tumour", "stroma"}
    tumour = by_name["tumour"]
    assert tumour["properties"]["classification"] == {"name": "tumour", "color": [200, 0, 0]}
    assert tumour["properties"]["objectType"] == "annotation"
    geom = shape(tumour["geometry"])
    assert geom.is_valid and geom.geom_type == "MultiPolygon"
    assert geom.area / 16 == pytest.approx((labels == 1).sum(), rel=0.02)
    assert shape(by_name["stroma"]["geometry"]).bounds == pytest.approx((120, 80, 144, 104), abs=2.5)


def test_geojson_is_the_same_file_whatever_the_threads(tmp_path):
    """Classes are traced on threads, largest first; the file keeps the class order."""
    rng = np.random.default_rng(5)
    labels = np.repeat(np.repeat(rng.integers(0, 5, (40, 50)), 3, axis=0), 3, axis=1).astype(np.uint8)
    labels[labels == 3] = 1  # class 1 largest, class 3 absent: no feature
    kw = dict(scale=2.0, class_names=list("ABCD"), palette=[[9, 9, 9]] * 5, background_index=4)
    files = []
    for threads in (1, 2, 8):
        files.append(tmp_path / f"t{threads}.geojson")
        assert write_geojson(files[-1], labels, threads=threads, **kw) == 3
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    assert [f["properties"]["name"] for f in json.loads(files[1].read_text())["features"]] == ["A", "B", "C"]


def test_a_line_the_simplification_breaks_is_written_exact(monkeypatch):
    """Douglas-Peucker runs on every ring and chain; a line it leaves crossing itself or another
    is put back unsimplified (exact outlines are valid by construction) and checked again.
    Forced here: the simplification returns a bow-tie for the first line of every call."""
    labels = nested()
    exact = label_polygons(labels, 1, scale=1.0, min_area_px=0, simplify=0)
    real = shapely.simplify
    bowtie = shapely.LineString([(0, 0), (2, 2), (2, 0), (0, 2), (0, 0)])

    def simplify(geoms, tolerance, preserve_topology=True):
        out = np.array(real(geoms, tolerance, preserve_topology=preserve_topology), dtype=object).copy()
        out[0] = bowtie  # self-intersecting
        return out

    monkeypatch.setattr(shapely, "simplify", simplify)
    got = label_polygons(labels, 1, scale=1.0, min_area_px=0)
    assert got.is_valid and got.area == pytest.approx(exact.area, rel=0.02)
    assert any(p.equals(e) for p in got.geoms for e in exact.geoms)  # the first one, exact
    assert not any(shapely.Polygon(bowtie.coords).equals(p) for p in got.geoms)


def test_outlines_do_not_depend_on_how_rows_arrive_or_the_threads():
    """The builder cuts its own slabs: rows added in any bands, traced on any number of threads,
    give the same polygons, coordinate for coordinate (the runner's early and late paths)."""
    from wsss.runner.outlines import OutlineBuilder, trace_outlines

    rng = np.random.default_rng(21)
    labels = np.kron((rng.random((30, 40)) * 4).astype(np.uint8), np.ones((5, 5), np.uint8))[:143, :197]
    kw = dict(scale=3.0, simplify=0.4, min_area_px=3, extent=(196.3, 142.6))
    want = trace_outlines(labels, range(4), slab_rows=32, threads=1, **kw)
    for threads in (1, 3):
        with OutlineBuilder(197, 143, range(4), slab_rows=32, threads=threads, **kw) as b:
            r = 0
            while r < 143:
                n = int(rng.integers(1, 50))
                b.add(labels[r:r + n])
                r += n
            got = b.finish()
        for k in range(4):
            assert shapely.equals_exact(got[k], want[k], tolerance=0), (threads, k)


def test_components_are_scipys_connected_components():
    """The joins' connected components (numpy; scipy.sparse costs ~0.2 s to import after the last
    tile): the same numbering as scipy's, which orders the GeoJSON's joined regions."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from wsss.runner.outlines import _components

    rng = np.random.default_rng(8)
    for _ in range(200):
        n = int(rng.integers(1, 300))
        m = int(rng.integers(0, 2 * n))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        if rng.random() < 0.3:  # long chains: the worst case for hooking
            order = rng.permutation(n)
            a, b = np.r_[a, order[:-1]], np.r_[b, order[1:]]
        want = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
        got = _components(n, a, b)
        assert got[0] == want[0] and (got[1] == want[1]).all()


@pytest.fixture
def fresh_workers(monkeypatch):
    """A pool of outline worker processes of the test's own, ended after it."""
    from runner_kit import own_workers

    from wsss.runner import outlines

    with own_workers(monkeypatch, outlines) as workers:
        yield workers


@pytest.mark.parametrize("output", ["shapely", "geojson"])
def test_outlines_traced_in_worker_processes_are_the_same(fresh_workers, output):
    """processes=N traces the slabs in child processes: the same polygons (or text) as on the
    threads, and the workers are reused by the next builder."""
    from wsss.runner.outlines import OutlineBuilder, trace_outlines

    rng = np.random.default_rng(5)
    labels = np.kron((rng.random((30, 40)) * 4).astype(np.uint8), np.ones((5, 5), np.uint8))[:143, :197]
    labels[rng.random(labels.shape) > 0.97] = 2
    kw = dict(scale=3.0, simplify=0.4, min_area_px=3, extent=(196.3, 142.6), output=output)
    want = trace_outlines(labels, range(4), slab_rows=32, threads=1, **kw)
    procs = []
    for _ in range(2):
        with OutlineBuilder(197, 143, range(4), slab_rows=32, processes=2, **kw) as b:
            for r in range(0, 143, 13):
                b.add(labels[r:r + 13])
            got = b.finish()
            assert set(b.timings) == {"waiting for slabs", "joins"}
        procs.append({w.proc.pid for w in fresh_workers._idle})
        for k in range(4):
            if output == "geojson":
                assert got[k] == want[k], k
            else:
                assert shapely.equals_exact(got[k], want[k], tolerance=0), k
    assert not fresh_workers.broken and procs[0] and procs[0] == procs[1]


def test_outline_workers_load_no_torch_and_end_with_their_parent():
    """A worker loads outlines.py without wsss's __init__ (which would import torch), and ends
    when its stdin closes, as when the process that started it ends."""
    import subprocess
    import sys

    from wsss.runner import outlines, workers

    heavy = "[n for n in sys.modules if n in ('torch', 'wsss.ops', 'wsss.runner.pipeline') or n.startswith('torch.')]"
    probe = workers._BOOT.replace("._serve()", f" and print({heavy})")
    out = subprocess.run([sys.executable, "-c", probe, workers._ROOT, outlines.__name__],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    w = workers.Worker(outlines.__name__)
    w.proc.stdin.close()
    assert w.proc.wait(timeout=30) == 0


FORK_PROBE = """
import os, sys
import numpy as np
from wsss.runner import outlines

def trace():
    b = outlines.OutlineBuilder(20, 20, [1], processes=1, output="geojson")
    b.add(np.ones((20, 20), np.uint8))
    return b.finish()[1] is not None

outlines._WORKERS.reserve(1)
parent = {w.proc.pid for w in outlines._WORKERS._idle}
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.write(w, b"%d%d" % (bool(outlines._WORKERS._idle), trace()))
    finally:
        os._exit(0)
os.close(w)
child = os.read(r, 2)
os.waitpid(pid, 0)
print(child.decode(), {w.proc.pid for w in outlines._WORKERS._idle} == parent, trace())
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_starts_outline_workers_of_its_own():
    """Workers talk through pipes: a forked child that used its parent's would garble their
    messages.  The child forgets them and starts its own; the parent's stay usable.  (In a
    fresh interpreter: forking pytest's threads could deadlock the child.)"""
    from runner_kit import run_python

    out = run_python(FORK_PROBE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["01", "True", "True"]  # (child: forgotten, traced; parent: kept, traced)


def test_a_dead_outline_worker_is_replaced_by_the_thread(fresh_workers):
    """A worker that dies (killed, out of memory) costs nothing but speed: its slab and the
    rest are traced on the threads, with the same result."""
    from wsss.runner.outlines import OutlineBuilder, trace_outlines

    rng = np.random.default_rng(6)
    labels = np.kron((rng.random((20, 20)) * 3).astype(np.uint8), np.ones((6, 6), np.uint8))
    want = trace_outlines(labels, range(3), slab_rows=16, threads=1, output="geojson")
    fresh_workers.reserve(2)
    for w in fresh_workers._idle:
        w.proc.kill()
        w.proc.wait()
    with OutlineBuilder(120, 120, range(3), slab_rows=16, processes=2, output="geojson") as b:
        b.add(labels)
        assert b.finish() == want
    assert fresh_workers.broken


def test_a_slab_that_fails_in_a_worker_raises_its_traceback(fresh_workers):
    from wsss.runner.outlines import OutlineBuilder

    b = OutlineBuilder(10, 10, [1], processes=1)
    with pytest.raises(RuntimeError, match="outlines: a task failed in a worker process(.|\n)*TypeError"):
        fresh_workers.run(("slab", b._settings, (np.zeros((2, 10), np.uint8),)), fallback=None)  # (arguments missing)
    assert len(fresh_workers._idle) == 1 and not fresh_workers.broken  # (it answered: kept)
    b.close()


def test_the_last_rows_are_traced_in_short_slabs():
    """Slabs end every slab_rows rows, but every tail_rows in the map's last slab_rows rows: once
    all rows but the last tail_rows are in, all of them are traced or under way.  Exact outlines
    are the whole map's however it is cut."""
    from wsss.runner.outlines import OutlineBuilder, trace_outlines

    rng = np.random.default_rng(4)
    labels = np.kron((rng.random((40, 30)) * 3).astype(np.uint8), np.ones((8, 8), np.uint8))[:300, :230]
    exact = dict(simplify=0, min_area_px=0)
    with OutlineBuilder(230, 300, range(3), slab_rows=64, tail_rows=8, threads=2, **exact) as b:
        assert b._ends == [64, 128, 192, 240, 248, 256, 264, 272, 280, 288, 296]  # (240: 300 - 64 up to a multiple of 8)
        b.add(labels[:150])
        b.add(labels[150:296])
        assert b._traced == 296 and not b._ends  # (only the last 4 rows' slab is left)
        b.add(labels[296:])
        got = b.finish()
    whole = trace_outlines(labels, range(3), slab_rows=300, tail_rows=300, **exact)
    for k in range(3):
        assert got[k].symmetric_difference(whole[k]).area == 0 and len(got[k].geoms) == len(whole[k].geoms)


@pytest.mark.parametrize("slab", [1, 7, 32, 500])
def test_geojson_output_is_what_shapely_writes_for_the_geometries(slab):
    """output="geojson" writes each slab's final polygons in the slab's task and joins texts;
    the result is byte for byte shapely.to_geojson of the MultiPolygon the builder returns
    otherwise (speckle, holes across slabs, a squeezed edge and a class absent included)."""
    from wsss.runner.outlines import trace_outlines

    rng = np.random.default_rng(slab)
    labels = np.kron((rng.random((30, 40)) * 4).astype(np.uint8), np.ones((5, 5), np.uint8))[:143, :197]
    labels[rng.random(labels.shape) > 0.97] = 2  # speckle
    labels[60:90, 80:140] = 1
    labels[70:80, 100:110] = 0  # a hole across slab cuts
    kw = dict(slab_rows=slab, scale=3.0, simplify=0.4, min_area_px=3, extent=(196.3, 142.6), threads=2)
    geoms = trace_outlines(labels, range(5), **kw)
    texts = trace_outlines(labels, range(5), output="geojson", **kw)
    assert geoms[4] is None and texts[4] is None  # (no class 4 in the map)
    for k in range(4):
        assert isinstance(texts[k], str) and texts[k] == shapely.to_geojson(geoms[k]), k
    with pytest.raises(ValueError, match="output must be"):
        trace_outlines(labels, [1], output="wkt")


def test_geojson_of_joined_regions_written_unsimplified_is_what_shapely_writes(monkeypatch):
    """Holes' text is written in their slabs; a joined region that fails its check in finish
    is written from its exact outlines instead (here every region is made to fail)."""
    from wsss.runner import outlines

    rng = np.random.default_rng(11)
    labels = np.kron((rng.random((24, 30)) * 3).astype(np.uint8), np.ones((6, 6), np.uint8))
    labels[rng.random(labels.shape) > 0.9] = 1  # holes in the pieces of the other classes
    kw = dict(slab_rows=20, scale=2.0, simplify=0.8, min_area_px=2, threads=1)  # (>= SAFE_SIMPLIFY: checked)
    checked = []

    def all_bad(self, *args):
        checked.append(args[-1])
        return np.ones(args[-1], bool)

    monkeypatch.setattr(outlines.OutlineBuilder, "_region_checks", all_bad)
    geoms = outlines.trace_outlines(labels, range(3), **kw)
    texts = outlines.trace_outlines(labels, range(3), output="geojson", **kw)
    assert checked and all(checked)
    for k in range(3):
        assert texts[k] == shapely.to_geojson(geoms[k]), k
    monkeypatch.undo()
    simplified = outlines.trace_outlines(labels, range(3), output="geojson", **kw)
    assert any(simplified[k] != texts[k] for k in range(3))  # (the exact outlines were written)


def test_holes_crossing_slab_rows_are_kept_as_in_the_whole_map():
    """Guards against joined holes being dropped (keeping only rings of positive area, i.e.
    shells, instead of every ring of at least ``min_area_px``): a 20 x 20 hole spanning several
    slabs and a 2 x 2 hole cut by one slab row are the whole map's holes, with its area; the
    small one alone is filled by ``min_area_px``."""
    from wsss.runner.outlines import trace_outlines

    labels = np.ones((40, 40), np.uint8)
    labels[10:30, 10:30] = 0  # 400 px, rows 10..29: across slab rows at 16 and 24 (slab_rows=8)
    labels[7:9, 33:35] = 0  # 4 px, rows 7..8: across the slab row at 8
    for min_area, holes in ((0, 2), (5, 1)):
        whole = trace_outlines(labels, [1], slab_rows=40, tail_rows=40, simplify=0, min_area_px=min_area)[1]
        assert len(whole.geoms) == 1 and len(whole.geoms[0].interiors) == holes
        for slab in (3, 8):
            g = trace_outlines(labels, [1], slab_rows=slab, simplify=0, min_area_px=min_area)[1]
            assert g.is_valid and len(g.geoms) == 1
            assert len(g.geoms[0].interiors) == holes, (slab, min_area)
            assert g.area == pytest.approx(whole.area) and g.symmetric_difference(whole).area < 1e-9
            if min_area == 0:
                assert (centres_inside(g, 40, 40) == (labels == 1)).all()
    assert whole.area == pytest.approx(1600 - 400)  # (the 4-px hole filled)

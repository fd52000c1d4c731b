"""GeoJSON outlines (the slowest per-slide output of wsss-infer, and the critical path of what
follows a slide's last tile).

The map: WSSS_BENCH_POLY_SIZE^2 (default 2048^2, the largest polygon level the runner traces)
labels of four classes from smoothed noise - blobs a few pixels to tens of pixels across,
like the benchmark bundles' random-weight predictions: the commonest class becomes one
polygon with thousands of holes, the worst case for simplification and validity checks.

- test_outlines: wsss.runner.writers.label_polygons for every class, one after the other
  (wsss.runner.outlines, one thread).
- test_write_geojson: the whole file as the runner writes it (classes on threads).
- test_geojson_after_the_last_rows: what is left of it after the last rows arrive (both outputs).
Each checks that its outlines are valid and cover their class (area within 2%).

Measured (2-core VM, 2026-11-26, medians of 3, the code before and after simplifying rings as
lines instead of polygons - GEOS's polygon simplification checks validity itself, which was
most of its time): label_polygons 3.72 -> 2.44 s, write_geojson 2.95 -> 1.99 s.  Then, with
polygons of 64+ holes checked piece by piece before GEOS's validity check (writers._is_valid):
label_polygons 2.69-2.83 -> 1.54-1.60 s, write_geojson 1.91-1.96 -> 1.51-1.52 s (two
interleaved pairs).  Then (2026-11-26, session 10) wsss.runner.outlines: the map traced in slabs
of 256 rows joined at the cut rows, checks per slab (what the runner needs to trace the polygon
level while the tiles run): on a noisy 2048^2 level of the reference networks (H100 run), one
thread, per class: 1.30/0.99 s before -> 1.43/1.47 s (the same work, spread over slabs); what is
left after the last slab (joins): 0.07-0.15 s.  Then (session 11) test_geojson_after_the_last_rows:
what the runner's GeoJSON leaves after the last 256 rows of this map, medians of 5 in two runs:
whole-map geometries serialised at the end 0.67 / 0.87 s -> slabs' text written in their tasks
0.38 / 0.38 s (the same file).  Session 15: the pieces' holes' text written in their slabs'
tasks too (a joined region's text is then mostly theirs joined): geojson 186 / 174 -> 163 / 161
ms (two interleaved pairs, medians of 5; on bench_gil's noisier map with one 26k-hole region the
joins in finish fell from 0.10-0.15 to 0.02 s).
"""
import os

import numpy as np
import pytest
import shapely

from wsss.runner.writers import label_polygons, write_geojson

SIZE = int(os.environ.get("WSSS_BENCH_POLY_SIZE", "2048"))
K = 4


@pytest.fixture(scope="module")
def labels():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    fields = np.stack([gaussian_filter(rng.standard_normal((SIZE, SIZE)).astype(np.float32), 3.0) for _ in range(K)])
    fields[0] += 0.08  # one common class (half the map): one polygon with ~2300 holes
    return fields.argmax(0).astype(np.uint8)


def _check(geoms_by_class, labels):
    for k, g in geoms_by_class.items():
        assert g is not None and shapely.is_valid(g), k
        assert g.area == pytest.approx(np.count_nonzero(labels == k), rel=0.02), k


def test_outlines(benchmark, labels):
    _check(benchmark.pedantic(lambda: {k: label_polygons(labels, k, scale=1.0) for k in range(K)},
                              rounds=3, iterations=1), labels)
    benchmark.extra_info.update(size=SIZE)


def test_write_geojson(benchmark, labels, tmp_path):
    import json

    from shapely.geometry import shape

    path = tmp_path / "p.geojson"
    kw = dict(scale=1.0, class_names=[f"c{k}" for k in range(K)], palette=[[0, 0, 0]] * (K + 1), background_index=K)
    assert benchmark.pedantic(lambda: write_geojson(path, labels, **kw), rounds=3, iterations=1) == K
    features = json.loads(path.read_text())["features"]
    _check({k: shape(f["geometry"]) for k, f in enumerate(features)}, labels)
    holes = max(int(shapely.get_num_interior_rings(shapely.get_parts(shape(f["geometry"]))).max()) for f in features)
    benchmark.extra_info.update(size=SIZE, most_holes=holes, bytes=path.stat().st_size)


@pytest.mark.parametrize("output", ["shapely", "geojson"])
def test_geojson_after_the_last_rows(benchmark, labels, tmp_path, output):
    """What the runner's GeoJSON leaves after the last tile: every slab but the last traced
    already (untimed setup), then the last 256 rows, the joins and the file.  output="shapely"
    builds the whole map's geometries and serialises them here; "geojson" (the runner's) has
    written each slab's final polygons in its task, so only the joined regions are left.

    Measured: see the module docstring; the files are byte-identical (tests/test_polygons.py)."""
    import json

    from wsss.runner.outlines import SLAB_ROWS, OutlineBuilder
    from wsss.runner.writers import write_geojson_features

    path = tmp_path / "p.geojson"
    builders = []

    def setup():
        b = OutlineBuilder(SIZE, SIZE, range(K), threads=2, output=output)
        b.add(labels[:SIZE - SLAB_ROWS])
        for futures in b._slabs.values():  # (wait until the slabs in flight are traced)
            for f in futures:
                f.result()
        builders.append(b)
        return (b,), {}

    def tail(b):
        b.add(labels[SIZE - SLAB_ROWS:])
        return write_geojson_features(path, b.finish(), class_names=[f"c{k}" for k in range(K)], palette=[[0, 0, 0]] * K)

    assert benchmark.pedantic(tail, setup=setup, rounds=5, iterations=1) == K
    assert len(json.loads(path.read_text())["features"]) == K
    benchmark.extra_info.update(size=SIZE, output=output, bytes=path.stat().st_size)

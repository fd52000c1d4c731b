"""Outlines of a label map as polygons per class (the GeoJSON QuPath opens), traced in slabs.

The map may arrive in bands of rows: ``wsss-infer`` feeds the polygon level of the label pyramid
as its rows become final, during the tile stage, so that after the last tile only the last
band and the joins are left.  Each band's *slab* is traced and simplified on its own (on a
thread); ``finish`` joins the outlines that cross slab boundaries.

- Tracing: filled marching squares at 0.5 (contourpy, matplotlib's C++ contouring) over each
  class's mask.  A slab spans pixel-centre rows [top, bottom], ``bottom`` being the first row
  of the next slab's span as well, so its polygons are exactly the whole map's polygons cut
  along those rows (marching squares is local to each 2x2 cell of pixel centres).  Diagonal
  neighbours are separate objects (skimage's find_contours convention).
- A ring that touches no cut row is final in its slab.  Holes never touch one (a hole meeting
  the slab's edge would be open to the neighbour slab: a notch of its shell).  A shell that
  touches a cut row is split there into *chains*: the runs between its edges along the cut.
  Each chain ends at a crossing point of the cut row, which is the start of exactly one chain of
  the slab beyond it: ``finish`` joins chains end to start into rings.  The rings of pieces
  joined through chains bound one connected region: exactly one of them is its shell (the
  orientation says which), the others are new holes.  No point-in-polygon matching anywhere.
- Speckle: objects and holes enclosing fewer than ``min_area_px`` pixels are dropped (a dropped
  hole is filled; a dropped object takes its holes along); areas are exact (shoelace sums of
  half-pixel coordinates, chains' partial sums added up for joined rings).
- Simplification (label pixels): collinear vertices go first (most of them: straight runs of
  pixel edges), then Douglas-Peucker at ``simplify`` on each ring as a closed line and each
  chain as a line with its ends fixed (0.4 keeps marching squares' corner chamfers: at 0.5 a
  5-px square becomes a diamond).  Validity is checked in the slab, where everything that could
  cross lies (simplified lines stay inside their slab and meet the next one only at chain
  ends): every line simple and no two lines meeting; where containment could change as well
  (see SAFE_SIMPLIFY), no hole in another hole of its polygon and every hole inside its shell.
  What fails is put back unsimplified (exact outlines are valid
  by construction) and checked again.  What only ``finish`` can see (the containment of a
  joined region's holes) is checked there, where needed; a region that fails is written
  unsimplified.
- extent: the last pixel of a row or column may reach past the slide's edge: its outline
  coordinates are squeezed into the slide (a strictly increasing map, linear on that pixel and
  the identity elsewhere: the topology is kept).

Output: a shapely MultiPolygon per class, in units of ``scale`` x label pixels, or its GeoJSON
text (``output="geojson"``, what the runner writes: each slab's final polygons are written out in
the slab's task).  The result
depends on where the slabs are cut (chain ends stay where they are) but not on the threads,
the worker processes or on how the rows arrive: the runner cuts at the label pyramid's tile
rows either way.

Worker processes (``processes=N``, ``workers.py``): the slabs are traced in N child Python
processes (numpy, contourpy and shapely; no torch), so that tracing takes no share of this
process's GIL: with three GIL-holding threads at a 1-ms switch interval, a noisy 2048^2 map
took 10-11 s to trace on two threads against ~1 s alone.  The processes are shared by the
builders of a process (a slide's slabs and the next slide's), started on demand and kept idle
until this process exits.  A worker that cannot be started or dies is replaced by tracing on
the thread (the same result).
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from wsss.runner.workers import WorkerPool, serve

__all__ = ["OutlineBuilder", "trace_outlines", "SLAB_ROWS"]

# rows per slab (NB: 64 or 128 cost 1.2-1.7x as much in all on a noisy 2048^2 map, and left no
# less after the last tile on 2 cores)
SLAB_ROWS = 256
# NB: a vertex of one marching-squares ring is >= sqrt(1/2) px from any other ring; a line that
# Douglas-Peucker simplifies moves less than its tolerance, so below that no hole can slip out of
# its shell or into another hole without lines crossing, which the checks catch.  Only near a
# squeezed slide edge, or with a coarser tolerance, is containment checked as well.
SAFE_SIMPLIFY = 0.7
_EMPTY2 = np.zeros((0, 2))
_EMPTYI = np.zeros(0, np.int64)


@dataclass
class _Slab:
    """One class's outlines in one slab: final polygons, and the pieces that continue beyond it.

    Lines are stored as concatenated open coordinates (the closing point not repeated) and a
    count per line; ``*_exact`` are the unsimplified (collinear-free) versions, kept for a joined
    region that fails its check in ``finish``."""
    done_xy: np.ndarray = field(default_factory=lambda: _EMPTY2)  # final polygons' rings
    done_n: np.ndarray = field(default_factory=lambda: _EMPTYI)  # points per ring
    done_rings: np.ndarray = field(default_factory=lambda: _EMPTYI)  # rings per polygon (shell first)
    chain_xy: np.ndarray = field(default_factory=lambda: _EMPTY2)  # chains (both ends included)
    chain_n: np.ndarray = field(default_factory=lambda: _EMPTYI)
    chain_exact_xy: np.ndarray = field(default_factory=lambda: _EMPTY2)
    chain_exact_n: np.ndarray = field(default_factory=lambda: _EMPTYI)
    chain_start: np.ndarray = field(default_factory=lambda: _EMPTYI)  # crossing-point keys
    chain_end: np.ndarray = field(default_factory=lambda: _EMPTYI)
    chain_area2: np.ndarray = field(default_factory=lambda: np.zeros(0))  # 2 x shoelace partial sums
    chain_piece: np.ndarray = field(default_factory=lambda: _EMPTYI)  # piece of each chain (0..)
    chain_risky: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # see SAFE_SIMPLIFY
    hole_xy: np.ndarray = field(default_factory=lambda: _EMPTY2)  # pieces' holes
    hole_n: np.ndarray = field(default_factory=lambda: _EMPTYI)
    hole_exact_xy: np.ndarray = field(default_factory=lambda: _EMPTY2)
    hole_exact_n: np.ndarray = field(default_factory=lambda: _EMPTYI)
    hole_piece: np.ndarray = field(default_factory=lambda: _EMPTYI)
    hole_risky: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    n_pieces: int = 0
    done_text: str = ""  # output="geojson": the final polygons as GeoJSON coordinates (done_* left empty)
    hole_text: List[str] = field(default_factory=list)  # output="geojson": each hole's coordinates (_ring_texts)


def _trace(z: np.ndarray):
    """Filled contours at 0.5 of a 0/1 float64 array: (points, ring offsets, outer offsets) or None."""
    import contourpy

    # NB: "threaded" with one thread is "serial" point for point (checked on random maps) but lets
    # go of the GIL while it marches, which the runner's model-feeding thread needs
    gen = contourpy.contour_generator(z=z, name="threaded", thread_count=1,
                                      fill_type=contourpy.FillType.ChunkCombinedOffsetOffset)
    (pts,), (ro,), (oo,) = gen.filled(0.5, 1.5)  # one chunk: flat arrays
    if pts is None:
        return None
    return pts, ro.astype(np.int64), oo.astype(np.int64)


def _ring_index(counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(line of each point, index of each point within its line) for concatenated lines."""
    line = np.repeat(np.arange(len(counts)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return line, np.arange(len(line)) - first


def _permute(xy: np.ndarray, counts: np.ndarray, order: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenated lines taken in ``order`` (indices of lines)."""
    n = counts[order]
    if not n.sum():
        return xy[:0], n
    starts = (np.cumsum(counts) - counts)[order]
    take = np.repeat(starts - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
    return xy[take], n


def _slice(xy: np.ndarray, counts: np.ndarray, which: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The lines ``which`` (bool per line) of concatenated lines."""
    return xy[np.repeat(which, counts)], counts[which]


def _replace(xy, counts, new_xy, new_counts, which: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenated lines, the lines ``which`` taken from (new_xy, new_counts) instead."""
    both_xy = np.concatenate([xy, new_xy])
    both_n = np.r_[counts, new_counts]
    return _permute(both_xy, both_n, np.where(which, np.arange(len(counts)) + len(counts), np.arange(len(counts))))


def _drop_collinear(xy: np.ndarray, counts: np.ndarray, closed: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Remove vertices where a line goes straight on (cyclically for closed lines; the ends of
    open lines stay): the same outline with fewer points."""
    if not len(xy):
        return xy, counts
    line, local = _ring_index(counts)
    n = counts[line]
    first = np.arange(len(xy)) - local
    prev, nxt = xy[first + (local - 1) % n], xy[first + (local + 1) % n]
    turn = (xy[:, 0] - prev[:, 0]) * (nxt[:, 1] - xy[:, 1]) - (xy[:, 1] - prev[:, 1]) * (nxt[:, 0] - xy[:, 0])
    keep = (turn != 0.0) | (~closed[line] & ((local == 0) | (local == n - 1)))
    return xy[keep], np.bincount(line[keep], minlength=len(counts)).astype(np.int64)


def _closed_coords(xy: np.ndarray, counts: np.ndarray, closed: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(coordinates, line index) with each closed line's first point repeated at its end."""
    line = np.repeat(np.arange(len(counts)), counts)
    ends = np.flatnonzero(closed)
    at = np.cumsum(counts)[ends]
    firsts = at - counts[ends]
    return np.insert(xy, at, xy[firsts], axis=0), np.insert(line, at, ends)


def _multipolygon(xy: np.ndarray, counts: np.ndarray, per_poly: np.ndarray):
    """shapely MultiPolygon of rings (open coordinates, points per ring) grouped into polygons
    (rings per polygon, shell first)."""
    import shapely

    coords, idx = _closed_coords(xy, counts, np.ones(len(counts), bool))
    rings = shapely.linearrings(coords, indices=idx)
    return shapely.multipolygons(shapely.polygons(rings, indices=np.repeat(np.arange(len(per_poly)), per_poly)))


# GEOS writes a MultiPolygon as this, its polygons' coordinate arrays joined by ",", then "]}":
# the texts of consecutive groups of polygons concatenate to the text of them all
GEOJSON_PREFIX = '{"type":"MultiPolygon","coordinates":['


def _components(n: int, a: np.ndarray, b: np.ndarray) -> Tuple[int, np.ndarray]:
    """(number of components, component of each node) of the undirected graph on nodes 0..n-1
    with edges a[i]-b[i], components numbered in the order of their smallest node (as scipy's
    connected_components numbers them).  Each pass hooks every edge's larger root onto the
    smaller one, then jumps pointers to the roots: labels only decrease and always name a node
    of the same component, so they settle on its smallest node (no scipy.sparse import, ~0.2 s,
    after the last tile)."""
    label = np.arange(n)
    while True:
        la, lb = label[a], label[b]
        new = label.copy()
        low = np.minimum(la, lb)
        np.minimum.at(new, la, low)
        np.minimum.at(new, lb, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            break
        label = new
    roots, component = np.unique(label, return_inverse=True)
    return len(roots), component.reshape(-1)


def _geojson_polygons(xy: np.ndarray, counts: np.ndarray, per_poly: np.ndarray) -> str:
    """The polygons' GeoJSON coordinate arrays, comma-separated ("" for none): GEOS writes them
    (shortest round-trip numbers, in C, without the GIL)."""
    import shapely

    if not len(per_poly):
        return ""
    text = shapely.to_geojson(_multipolygon(xy, counts, per_poly))
    if not (text.startswith(GEOJSON_PREFIX) and text.endswith("]}")):  # pragma: no cover - a GEOS change
        raise AssertionError(f"outlines: unexpected GeoJSON from GEOS: {text[:80]!r}")
    return text[len(GEOJSON_PREFIX):-2]


_LINE_PREFIX = '{"type":"LineString","coordinates":'


def _ring_texts(xy: np.ndarray, counts: np.ndarray) -> List[str]:
    """Each ring's GeoJSON coordinate array (closed), as GEOS writes it in a polygon: the pieces'
    holes are written in their slabs' tasks, so that a joined region's text is mostly theirs
    joined (a noisy 2048^2 map's one region with 26k holes: 0.08 s of GEOS in the slabs against
    0.12-0.14 s of text after the last rows)."""
    import shapely

    if not len(counts):
        return []
    texts = shapely.to_geojson(_lines(xy, counts, np.ones(len(counts), bool))).tolist()
    if not (texts[0].startswith(_LINE_PREFIX) and texts[0].endswith("}")):  # pragma: no cover - a GEOS change
        raise AssertionError(f"outlines: unexpected GeoJSON from GEOS: {texts[0][:80]!r}")
    return [t[len(_LINE_PREFIX):-1] for t in texts]


def _lines(xy: np.ndarray, counts: np.ndarray, closed: np.ndarray):
    """shapely LineStrings of concatenated open coordinates (closed ones end on their first point)."""
    import shapely

    if not len(counts):
        return np.zeros(0, dtype=object)
    coords, idx = _closed_coords(xy, counts, closed)
    return shapely.linestrings(coords, indices=idx)


def _areas(lines):
    """shapely Polygons of closed LineStrings."""
    import shapely

    if not len(lines):
        return np.zeros(0, dtype=object)
    coords, idx = shapely.get_coordinates(lines, return_index=True)
    return shapely.polygons(shapely.linearrings(coords, indices=idx))


def _coords_of(lines, closed: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Inverse of _lines: concatenated open coordinates and counts."""
    import shapely

    n = shapely.get_num_coordinates(lines).astype(np.int64)
    xy = shapely.get_coordinates(lines)
    line, local = _ring_index(n)
    keep = ~(closed[line] & (local == n[line] - 1))
    return xy[keep], n - closed.astype(np.int64)


def _conflicts(lines, closed: np.ndarray, owner: np.ndarray, is_shell: np.ndarray, risky: np.ndarray) -> np.ndarray:
    """bool per line: taking part in something that makes the slab's outlines invalid (see the
    module docstring).  owner: polygon (or piece) of each line; is_shell: a final polygon's
    shell (pieces' shells are chains: their holes are checked against them in ``finish``);
    risky: lines whose containment needs checking (SAFE_SIMPLIFY).

    NB: most lines are holes, small and many: they are queried against each other; the long
    lines (shells, chains) are each queried against everything."""
    import shapely

    bad = ~shapely.is_simple(lines)
    holes = np.flatnonzero(closed & ~is_shell)
    long_ = np.flatnonzero(~(closed & ~is_shell))
    if len(long_):
        a, b = shapely.STRtree(lines).query(lines[long_], predicate="intersects")
        meet = long_[a] != b
        bad[long_[a[meet]]] = bad[b[meet]] = True
    if len(holes):
        a, b = shapely.STRtree(lines[holes]).query(lines[holes], predicate="intersects")
        meet = a != b
        bad[holes[a[meet]]] = True
    at_risk = holes[risky[holes]]
    if len(at_risk):
        # holes of one polygon: disjoint areas
        areas = _areas(lines[holes])
        a, b = shapely.STRtree(areas).query(_areas(lines[at_risk]), predicate="intersects")
        a, b = at_risk[a], holes[b]
        same = (a != b) & (owner[a] == owner[b])
        bad[a[same]] = bad[b[same]] = True
        # inside their shell, where the shell is here (a final polygon)
        shell_of = np.full(int(owner.max()) + 1, -1)
        shell_of[owner[is_shell]] = np.flatnonzero(is_shell)
        h = at_risk[shell_of[owner[at_risk]] >= 0]
        if len(h):
            s = shell_of[owner[h]]
            first = shapely.get_coordinates(shapely.get_point(lines[h], 0))
            out = ~shapely.contains_xy(_areas(lines[s]), first[:, 0], first[:, 1])
            bad[h[out]] = bad[s[out]] = True
    return bad


class OutlineBuilder:
    """Outlines of a ``width`` x ``height`` label map whose rows arrive in bands (``add``), for
    the classes ``classes``; ``finish`` returns {class: shapely MultiPolygon or None}, or with
    ``output="geojson"`` {class: the MultiPolygon's GeoJSON geometry text or None}, the very text
    ``shapely.to_geojson`` writes for it.  The text of a slab's final polygons is written in the
    slab's task, while later rows still arrive, so that ``finish`` is left with the joined
    regions only (at 4096^2 the whole map's shapes and text took ~0.5 s after the last row).

    scale: output units per label pixel; simplify: Douglas-Peucker tolerance in label pixels
    (0: exact outlines, which contain exactly the class's pixel centres); min_area_px: speckle
    limit; extent: (width, height) of the slide in label pixels (see the module docstring);
    slab_rows: rows per slab, however the rows arrive (so the result does not depend on that);
    tail_rows: rows per slab in the map's last slab_rows rows (default slab_rows // 4): rows that
    arrive last are traced in short slabs, so little is left to trace after the last ones;
    threads: slabs traced at once (one task per slab and class; None: one per core);
    processes: trace the slabs in this many worker processes instead (see the module docstring;
    0: on the threads).  ``timings`` holds, after ``finish``, the seconds it waited for slabs in
    flight and spent joining."""

    def __init__(self, width: int, height: int, classes: Sequence[int], *, scale: float = 1.0, simplify: float = 0.4,
                 min_area_px: float = 4, extent: Optional[tuple] = None, slab_rows: int = SLAB_ROWS,
                 tail_rows: Optional[int] = None, threads: Optional[int] = None, processes: int = 0,
                 output: str = "shapely") -> None:
        if output not in ("shapely", "geojson"):
            raise ValueError(f"outlines: output must be 'shapely' or 'geojson', got {output!r}")
        self.output = output
        self.width, self.height = int(width), int(height)
        self.classes = [int(k) for k in classes]
        self.scale, self.simplify, self.min_area = float(scale), float(simplify), float(min_area_px)
        # the last pixel of a row (column) is squeezed where the slide ends inside it
        self._squeezed = [extent is not None and extent[a] < n for a, n in enumerate((self.width, self.height))]
        self.extent = extent
        self.slab_rows = int(slab_rows)
        # where slabs end: every slab_rows rows, but in the map's last slab_rows rows every
        # tail_rows (what is left to trace when the last rows come is one short slab)
        # NB: slab_rows // 4: on a 1536^2 level of noisy labels all slabs took 0.156 s with no
        # tail, 0.169 s with 64-row and 0.19 s with 32-row tail slabs
        tail = max(1, min(self.slab_rows, int(tail_rows or max(1, self.slab_rows // 4))))
        tail_start = max(0, -(-(self.height - self.slab_rows) // tail) * tail)
        self._ends = sorted({*range(self.slab_rows, tail_start, self.slab_rows),
                             *range(tail_start or tail, self.height, tail)})
        self.rows = 0  # rows received so far
        self._traced = 0  # rows handed to slabs so far
        self._pending: List[np.ndarray] = []  # rows received, not yet in a slab
        self._last: Optional[np.ndarray] = None  # the last row of the last slab: the next one's top
        self._slabs: Dict[int, List[Future]] = {k: [] for k in self.classes}
        self.processes = max(0, int(processes or 0))
        # NB: with processes, each thread only waits on its worker's pipe
        n = self.processes or threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(max(1, n), thread_name_prefix="wsss-outlines")
        self._lock = threading.Lock()
        self._finished = False
        self.timings: Dict[str, float] = {}
        # what a worker process needs to trace this map's slabs (hashable: workers keep a builder per settings)
        self._settings = (("width", self.width), ("height", self.height), ("classes", tuple(self.classes)),
                          ("scale", self.scale), ("simplify", self.simplify), ("min_area_px", self.min_area),
                          ("extent", None if extent is None else tuple(float(v) for v in extent)),
                          ("output", self.output))
        if self.processes:
            _WORKERS.reserve(self.processes)

    def add(self, rows: np.ndarray) -> None:
        """The next rows of the map (uint8 [n, width]); their slab is traced on the pool."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"outlines: rows must be [n, {self.width}], got {list(rows.shape)}")
        if not len(rows):
            return
        with self._lock:
            if self._finished:
                raise RuntimeError("outlines: rows added after finish()")
            if self.rows + len(rows) > self.height:
                raise ValueError(f"outlines: {self.rows + len(rows)} rows added to a map of {self.height}")
            self._pending.append(rows)
            self.rows += len(rows)
            while self._ends and self._ends[0] <= self.rows:
                self._next_slab(self._ends.pop(0) - self._traced)

    def _next_slab(self, n: int) -> None:  # NB: holds self._lock
        """The next n pending rows to a slab on the pool."""
        rows = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        band, rest = rows[:n], rows[n:]
        self._pending = [rest] if len(rest) else []
        # the slab: the previous slab's last row (none above the map's first row), then the band
        top = self._last if self._last is not None else band[:1]
        self._submit(np.concatenate([top, band]), self._traced - 1, top_cut=self._last is not None, bottom_cut=True)
        self._last = band[-1:].copy()
        self._traced += len(band)

    def finish(self) -> Dict[int, object]:
        """{class: MultiPolygon (GeoJSON text) or None} of every row added (waits for the slabs
        in flight)."""
        with self._lock:
            if self.rows != self.height:
                raise ValueError(f"outlines: finish() after {self.rows} rows of {self.height}")
            if not self._finished:
                self._finished = True
                if self._pending:
                    self._next_slab(self.rows - self._traced)
                if self._last is not None:  # the last row against the empty row below the map
                    self._submit(np.concatenate([self._last, self._last]), self.rows - 1, top_cut=True, bottom_cut=False)
        try:
            t0 = time.perf_counter()
            slabs = {k: [f.result() for f in self._slabs[k]] for k in self.classes}
            t1 = time.perf_counter()
            joins = {k: self._pool.submit(self._join, slabs[k]) for k in self.classes}
            out = {k: f.result() for k, f in joins.items()}
            self.timings.update({"waiting for slabs": t1 - t0, "joins": time.perf_counter() - t1})
            return out
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "OutlineBuilder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, z: np.ndarray, top: int, *, top_cut: bool, bottom_cut: bool) -> None:
        task = self._slab_in_worker if self.processes else self._slab
        for k in self.classes:
            self._slabs[k].append(self._pool.submit(task, z, k, top, top_cut, bottom_cut))

    def _slab_in_worker(self, *args) -> _Slab:
        out = _WORKERS.run(("slab", self._settings, args), fallback=lambda: self._slab(*args))
        return out if isinstance(out, _Slab) else _Slab(**out)

    def _ring_texts(self, xy: np.ndarray, counts: np.ndarray) -> List[str]:
        """_ring_texts, in a worker process where there are (there it needs no GIL of this
        process, nor shapely imported here)."""
        if not self.processes or not len(counts):
            return _ring_texts(xy, counts)
        return _WORKERS.run(("ring_texts", None, (xy, counts)), fallback=lambda: _ring_texts(xy, counts))

    # -- one slab ------------------------------------------------------------------------
    def _key(self, xy: np.ndarray) -> np.ndarray:
        """int64 key of crossing points (half-pixel coordinates, x >= -0.5)."""
        twice = np.rint(2 * xy).astype(np.int64)
        return twice[:, 1] * (2 * self.width + 8) + twice[:, 0] + 2

    def _squeeze(self, xy: np.ndarray) -> np.ndarray:
        if self.extent is None:
            return xy
        xy = xy.copy()
        for axis, limit in enumerate(self.extent):
            last = (self.width, self.height)[axis] - 1  # the last pixel spans [last, last + 1]
            if self._squeezed[axis]:
                v = xy[:, axis]
                beyond = v > last
                v[beyond] = last + (v[beyond] - last) * max(limit - last, 1e-3)
        return xy

    def _slab(self, z_rows: np.ndarray, k: int, top: int, top_cut: bool, bottom_cut: bool) -> _Slab:
        """Class k in the slab of map rows [top, top + len(z_rows)) (a row without a cut there
        is outside the map: empty)."""
        mask = z_rows == k
        if not top_cut:
            mask[0] = False
        if not bottom_cut:
            mask[-1] = False
        cols = np.flatnonzero(mask.any(axis=0))
        if not len(cols):
            return _Slab()
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        z = np.zeros((len(mask), c1 - c0 + 2))
        z[:, 1:-1] = mask[:, c0:c1]
        traced = _trace(z)
        if traced is None:
            return _Slab()
        pts, ro, oo = traced
        # pixel-corner coordinates: map pixel (x, y) spans [x, x + 1] x [y, y + 1]; z's pixel
        # (i, j) is map pixel (top + i, c0 + j - 1), its centre at contourpy's (j, i)
        keep_pt = np.ones(len(pts), bool)
        keep_pt[ro[1:] - 1] = False  # open rings (contourpy repeats the first point)
        xy = pts[keep_pt] + (c0 - 0.5, top + 0.5)
        counts = np.diff(ro) - 1
        ring_poly = np.repeat(np.arange(len(oo) - 1), np.diff(oo))
        is_outer = np.r_[True, ring_poly[1:] != ring_poly[:-1]]
        line, local = _ring_index(counts)
        nxt = xy[np.arange(len(xy)) - local + (local + 1) % counts[line]]
        area2 = np.bincount(line, xy[:, 0] * nxt[:, 1] - nxt[:, 0] * xy[:, 1], minlength=len(counts))  # 2 x signed area
        y = xy[:, 1]
        cut_edge = np.zeros(len(xy), bool)  # edge i -> i + 1 runs along a cut row
        for is_cut, at in ((top_cut, top + 0.5), (bottom_cut, top + len(mask) - 0.5)):
            if is_cut:
                cut_edge |= (y == at) & (nxt[:, 1] == at)
        touches = np.bincount(line, cut_edge, minlength=len(counts)) > 0
        if (touches & ~is_outer).any():
            raise AssertionError("outlines: a hole touches a slab's cut row")
        piece = touches[is_outer]  # per polygon: its shell goes on beyond the slab
        # speckle: a final polygon whose shell is too small goes with its holes; small holes go
        big = np.abs(area2) >= 2 * self.min_area
        shell_kept = (big | touches)[is_outer]
        keep_ring = np.where(is_outer, big | touches, big) & shell_kept[ring_poly]
        xy_sq = self._squeeze(xy)
        risky_pt = np.full(len(xy), self.simplify >= SAFE_SIMPLIFY)
        for axis, n in enumerate((self.width, self.height)):
            if self._squeezed[axis]:
                risky_pt |= xy[:, axis] > n - 2

        # lines: kept rings that touch no cut (closed), chains of the pieces' shells (open)
        ring_sel = keep_ring & ~touches
        r_xy, r_n = _slice(xy_sq, counts, ring_sel)
        r_owner = ring_poly[ring_sel]
        r_risky = np.bincount(line, risky_pt, minlength=len(counts))[ring_sel] > 0
        c_xy, c_n, c_start, c_end, c_area2, c_owner, c_risky = self._chains(xy, xy_sq, risky_pt, counts, cut_edge,
                                                                            touches, ring_poly)
        closed = np.r_[np.ones(len(r_n), bool), np.zeros(len(c_n), bool)]
        owner = np.r_[r_owner, c_owner]
        is_shell = np.r_[is_outer[ring_sel], np.zeros(len(c_n), bool)]  # (closed outer rings: final polygons)
        ex_xy, ex_n = _drop_collinear(np.concatenate([r_xy, c_xy]), np.r_[r_n, c_n], closed)
        ex_xy = ex_xy * self.scale
        out_xy, out_n = ex_xy, ex_n
        if self.simplify > 0 and len(ex_n):
            out_xy, out_n = self._simplified(ex_xy, ex_n, closed, owner, is_shell, np.r_[r_risky, c_risky])

        in_piece = piece[owner]
        done, hole, chain = closed & ~in_piece, closed & in_piece, ~closed
        piece_id = np.cumsum(piece) - 1  # polygon -> piece number (where it is one)
        _, done_rings = np.unique(owner[done], return_counts=True)
        sl = lambda which: _slice(out_xy, out_n, which)  # noqa: E731
        ex = lambda which: _slice(ex_xy, ex_n, which)  # noqa: E731
        (d_xy, d_n), (ch_xy, ch_n), (h_xy, h_n) = sl(done), sl(chain), sl(hole)
        (che_xy, che_n), (he_xy, he_n) = ex(chain), ex(hole)
        done_rings = done_rings.astype(np.int64)
        done_text, hole_text = "", []
        if self.output == "geojson":
            done_text = _geojson_polygons(d_xy, d_n, done_rings)
            d_xy, d_n, done_rings = _EMPTY2, _EMPTYI, _EMPTYI
            hole_text = _ring_texts(h_xy, h_n)
        return _Slab(done_xy=d_xy, done_n=d_n, done_rings=done_rings, done_text=done_text, hole_text=hole_text,
                     chain_xy=ch_xy, chain_n=ch_n, chain_exact_xy=che_xy, chain_exact_n=che_n,
                     chain_start=c_start, chain_end=c_end, chain_area2=c_area2, chain_piece=piece_id[c_owner],
                     chain_risky=c_risky, hole_xy=h_xy, hole_n=h_n, hole_exact_xy=he_xy, hole_exact_n=he_n,
                     hole_piece=piece_id[owner[hole]], hole_risky=r_risky[hole[:len(r_risky)]],
                     n_pieces=int(piece.sum()))

    def _chains(self, xy, xy_sq, risky_pt, counts, cut_edge, touches, ring_poly):
        """The chains of the rings that touch a cut row: (coordinates (squeezed), counts, start
        keys, end keys, 2 x shoelace partial sums, owner polygon, at risk), ring by ring."""
        spans, owner = [], []
        offsets = np.r_[0, np.cumsum(counts)]
        for r in np.flatnonzero(touches):
            a, n = offsets[r], counts[r]
            cut = cut_edge[a:a + n]
            # a chain runs from where a cut edge ends (vertex i: edge i - 1 cut, edge i not) to
            # where the next one starts (vertex j: edge j cut, edge j - 1 not)
            begin = np.flatnonzero(np.roll(cut, 1) & ~cut)
            stop = np.flatnonzero(cut & ~np.roll(cut, 1))
            end = stop[np.searchsorted(stop, begin) % len(stop)]
            for s, e in zip(begin, end):
                spans.append(a + np.arange(s, e + 1 if e > s else e + n + 1) % n)
                owner.append(ring_poly[r])
        if not spans:
            return _EMPTY2, _EMPTYI, _EMPTYI, _EMPTYI, np.zeros(0), _EMPTYI, np.zeros(0, bool)
        n = np.array([len(s) for s in spans], np.int64)
        idx = np.concatenate(spans)
        p = xy[idx]
        line, local = _ring_index(n)
        last = np.cumsum(n) - 1
        step = np.ones(len(p), bool)
        step[last] = False  # no edge from a chain's last point
        q = np.roll(p, -1, axis=0)
        cross = np.where(step, p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1], 0.0)
        return (xy_sq[idx], n, self._key(p[last - n + 1]), self._key(p[last]),
                np.bincount(line, cross, minlength=len(n)), np.array(owner, np.int64),
                np.bincount(line, risky_pt[idx], minlength=len(n)) > 0)

    def _simplified(self, xy, counts, closed, owner, is_shell, risky):
        """Douglas-Peucker on every line, then the slab's checks; lines that fail are put back
        exact and the checks run again (exact lines never fail: at worst all are exact)."""
        import shapely

        exact = _lines(xy, counts, closed)
        lines = shapely.simplify(exact, self.simplify * self.scale, preserve_topology=False)
        n = shapely.get_num_coordinates(lines)
        # a ring Douglas-Peucker leaves as a, b, a (or less), or a chain it reduces to a segment
        # along its cut row, is no outline: exact
        use_exact = closed & (n < 4)
        two = np.flatnonzero(~closed & (n == 2))
        if len(two):
            ends = shapely.get_coordinates(lines[two]).reshape(-1, 2, 2)
            use_exact[two[ends[:, 0, 1] == ends[:, 1, 1]]] = True
        lines = np.where(use_exact, exact, lines)
        for _ in range(3):
            bad = _conflicts(lines, closed, owner, is_shell, risky) & ~use_exact
            if not bad.any():
                break
            use_exact |= bad
            lines = np.where(use_exact, exact, lines)
        else:
            lines = exact
        return _coords_of(lines, closed)

    # -- joining -------------------------------------------------------------------------
    def _join(self, slabs: List[_Slab]):
        """One class's MultiPolygon (or its GeoJSON text) from its slabs (None when empty):
        the slabs' final polygons in slab order, then the joined regions."""
        if not slabs:  # (a map without rows)
            return None
        joined = self._join_pieces(slabs)
        if self.output == "geojson":
            texts = [t for t in [s.done_text for s in slabs] + [joined] if t]
            return GEOJSON_PREFIX + ",".join(texts) + "]}" if texts else None
        parts = [(s.done_xy, s.done_n, s.done_rings) for s in slabs] + ([joined] if joined is not None else [])
        xy, n, per_poly = (np.concatenate(a) for a in zip(*parts))
        if not len(per_poly):
            return None
        return _multipolygon(xy, n, per_poly)

    def _join_pieces(self, slabs: List[_Slab]):
        """The regions made of pieces: (ring coordinates, ring counts, rings per polygon), or
        with output="geojson" their polygons' GeoJSON coordinate arrays; None without any."""
        cat = lambda name: np.concatenate([getattr(s, name) for s in slabs])  # noqa: E731
        starts, ends, area2 = cat("chain_start"), cat("chain_end"), cat("chain_area2")
        if not len(starts):
            return None
        piece_base = np.cumsum([0] + [s.n_pieces for s in slabs])
        chain_piece = np.concatenate([s.chain_piece + b for s, b in zip(slabs, piece_base)])
        hole_piece = np.concatenate([s.hole_piece + b for s, b in zip(slabs, piece_base)]).astype(np.int64)
        n_chains, n_pieces = len(starts), int(piece_base[-1])
        order = np.argsort(starts, kind="stable")
        at = np.minimum(np.searchsorted(starts[order], ends), n_chains - 1)
        nxt = order[at]
        if (starts[nxt] != ends).any():
            raise AssertionError("outlines: a chain ends where no chain of the next slab starts")
        # rings: the cycles of nxt, chains in order
        ring_of = np.full(n_chains, -1)
        cycle = np.empty(n_chains, np.int64)
        n_rings = filled = 0
        for c in range(n_chains):
            while ring_of[c] < 0:
                ring_of[c] = n_rings
                cycle[filled] = c
                filled += 1
                c = nxt[c]
            if ring_of[c] == n_rings:
                n_rings += 1
        ring_area2 = np.bincount(ring_of, area2, minlength=n_rings)
        # regions: pieces linked through the rings of their chains
        n_regions, region = _components(n_pieces + n_rings, chain_piece, n_pieces + ring_of)
        ring_region, hole_region = region[n_pieces:], region[hole_piece]
        shells = np.flatnonzero(ring_area2 > 0)
        if len(shells) != n_regions or len(np.unique(ring_region[shells])) != n_regions:
            raise AssertionError("outlines: a joined region without exactly one shell")
        keep_region = np.zeros(n_regions, bool)
        keep_region[ring_region[shells]] = ring_area2[shells] >= 2 * self.min_area
        keep_ring = keep_region[ring_region] & (np.abs(ring_area2) >= 2 * self.min_area)
        keep_hole = keep_region[hole_region]

        def rings(xy_name: str, n_name: str):
            """Joined rings' open coordinates: chains in cycle order, each without its last
            point (the next chain's first)."""
            xy, n = cat(xy_name), cat(n_name)
            line, local = _ring_index(n)
            xy, n = _permute(xy[local < n[line] - 1], n - 1, cycle)
            return xy, np.bincount(ring_of[cycle], n, minlength=n_rings).astype(np.int64)

        ring_xy, ring_n = rings("chain_xy", "chain_n")
        hole_xy, hole_n = cat("hole_xy"), cat("hole_n")
        is_shell = np.zeros(n_rings, bool)
        is_shell[shells] = True
        ring_risky = np.bincount(ring_of, cat("chain_risky"), minlength=n_rings) > 0
        fresh = np.zeros(len(hole_n), bool)  # holes whose slab's text no longer applies
        if self.simplify > 0 and (ring_risky.any() or cat("hole_risky").any()):
            bad = self._region_checks(ring_xy, ring_n, ring_region, is_shell, keep_ring, ring_risky, hole_xy, hole_n,
                                      hole_region, keep_hole, cat("hole_risky"), n_regions)
            if bad.any():  # those regions unsimplified (valid by construction)
                ex_xy, ex_n = rings("chain_exact_xy", "chain_exact_n")
                ring_xy, ring_n = _replace(ring_xy, ring_n, ex_xy, ex_n, bad[ring_region])
                fresh = bad[hole_region]
                hole_xy, hole_n = _replace(hole_xy, hole_n, cat("hole_exact_xy"), cat("hole_exact_n"), fresh)
        # polygons: each kept region's shell, its joined holes, then its pieces' holes
        xy = np.concatenate([ring_xy, hole_xy])
        n = np.r_[ring_n, hole_n]
        keep = np.r_[keep_ring, keep_hole]
        reg = np.r_[ring_region, hole_region]
        kind = np.r_[np.where(is_shell, 0, 1), np.full(len(hole_n), 2)]
        sel = np.flatnonzero(keep)
        sel = sel[np.lexsort((sel, kind[sel], reg[sel]))]
        _, per_region = np.unique(reg[sel], return_counts=True)
        if self.output == "geojson":
            # each ring's text: the slab's for a piece's hole, written here for the rest
            n_rings = len(ring_n)
            render = np.flatnonzero(keep & ~np.r_[np.zeros(n_rings, bool), ~fresh])
            text: List[Optional[str]] = [None] * len(n)
            for i, t in zip(render.tolist(), self._ring_texts(*_permute(xy, n, render))):
                text[i] = t
            hole_text = [t for s in slabs for t in s.hole_text]
            for i in np.flatnonzero(keep_hole & ~fresh).tolist():
                text[n_rings + i] = hole_text[i]
            ordered = [text[i] for i in sel.tolist()]
            bounds = np.r_[0, np.cumsum(per_region)].tolist()
            return ",".join("[" + ",".join(ordered[a:b]) + "]" for a, b in zip(bounds[:-1], bounds[1:]))
        xy, n = _permute(xy, n, sel)
        return xy, n, per_region.astype(np.int64)

    def _region_checks(self, ring_xy, ring_n, ring_region, is_shell, keep_ring, ring_risky, hole_xy, hole_n,
                       hole_region, keep_hole, hole_risky, n_regions: int) -> np.ndarray:
        """bool per region: its simplified outlines may be invalid - a hole at risk (see
        SAFE_SIMPLIFY) outside its shell, or meeting another hole's area (lines crossing were
        caught in the slabs: chains of different slabs meet only at their ends)."""
        import shapely

        bad = np.zeros(n_regions, bool)
        joined = np.flatnonzero(keep_ring & ~is_shell)
        kept = np.flatnonzero(keep_hole)
        risky = np.r_[ring_risky[joined], hole_risky[kept]]
        if not risky.any():
            return bad
        all_holes = np.r_[_lines(*_slice(ring_xy, ring_n, keep_ring & ~is_shell), np.ones(len(joined), bool)),
                          _lines(*_slice(hole_xy, hole_n, keep_hole), np.ones(len(kept), bool))]
        region = np.r_[ring_region[joined], hole_region[kept]]
        check = np.flatnonzero(risky)
        shells = np.flatnonzero(is_shell)
        shell_area = np.empty(n_regions, dtype=object)
        shell_area[ring_region[shells]] = _areas(_lines(*_slice(ring_xy, ring_n, is_shell), np.ones(len(shells), bool)))
        first = shapely.get_coordinates(shapely.get_point(all_holes[check], 0))
        out = ~shapely.contains_xy(shell_area[region[check]], first[:, 0], first[:, 1])
        bad[region[check[out]]] = True
        areas = _areas(all_holes)
        a, b = shapely.STRtree(areas).query(areas[check], predicate="intersects")
        a = check[a]
        bad[region[a[(a != b) & (region[a] == region[b])]]] = True
        return bad


# -- worker processes (see workers.py) ----------------------------------------------------
_BUILDERS: Dict[tuple, OutlineBuilder] = {}  # (in a worker: one builder per settings)


def _handle(what: str, settings: Optional[tuple], args: tuple):
    """A worker's task: a slab's fields (what="slab") or rings' GeoJSON text ("ring_texts")."""
    if what == "ring_texts":
        return _ring_texts(*args)
    if settings not in _BUILDERS:
        if len(_BUILDERS) >= 16:
            _BUILDERS.clear()
        _BUILDERS[settings] = OutlineBuilder(**dict(settings))
    slab = _BUILDERS[settings]._slab(*args)
    return {f.name: getattr(slab, f.name) for f in fields(slab)}


def _serve() -> None:
    import contourpy  # noqa: F401  (imported while the first rows arrive)
    import shapely  # noqa: F401

    serve(_handle)


_WORKERS = WorkerPool(__name__)


def trace_outlines(labels: np.ndarray, classes: Sequence[int], *, slab_rows: int = SLAB_ROWS,
                   threads: Optional[int] = None, **kw) -> Dict[int, object]:
    """{class: MultiPolygon or None} of a whole label map (with ``output="geojson"``: the
    geometries' GeoJSON texts; see OutlineBuilder for the options)."""
    labels = np.asarray(labels)
    with OutlineBuilder(labels.shape[1], labels.shape[0], classes, slab_rows=slab_rows, threads=threads, **kw) as b:
        b.add(labels)
        return b.finish()

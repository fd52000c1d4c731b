"""Tiling, the blending weight window and the runner's core bookkeeping, checked where the
exact-reconstruction tests cannot see a defect.

Those tests drive the runner with per-pixel predictors (``red_class``, ``soft_colour``): every
tile predicts the same value at a pixel, so *any* positive window, and many wrong tile layouts,
reproduce the slide exactly.  The predictors here depend on where a pixel lies in its tile, so
the blend (which tiles, with which weights) shows in the outputs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile
import torch

from wsss.runner import TileGrid, run_slide, tile_starts, weight_window

from runner_kit import K, colour_slide, model, opts, write_pyramid  # noqa: E402


def position_in_tile(x: torch.Tensor) -> torch.Tensor:
    """Predictor whose scores depend on the pixel's place in its tile, not on the slide:
    class 0 ramps up along the tile's columns, class 1 down them, class 2 ramps along its rows
    (class 3 a constant).  uint8 [N,3,t,t] -> float32 [N,K,t,t]."""
    n, _, h, w = x.shape
    u = torch.linspace(0.0, 1.0, w).expand(h, w)
    v = torch.linspace(0.0, 1.0, h)[:, None].expand(h, w)
    p = torch.stack([u, 1.0 - u, 0.8 * v, torch.full((h, w), 0.3)])
    return p.expand(n, K, h, w).contiguous()


def blend_reference(width: int, height: int, tile: int, overlap: int, tile_probs: np.ndarray) -> np.ndarray:
    """float64 [K, H, W]: every grid tile's ``tile_probs`` [K, t, t] weighted by the window,
    summed, divided by the summed weights (what the stitchers compute)."""
    grid = TileGrid(width, height, tile, overlap)
    window = weight_window(tile, overlap).astype(np.float64)
    num = np.zeros((K, height, width))
    den = np.zeros((height, width))
    for x, y in grid.tiles:
        h, w = min(tile, height - y), min(tile, width - x)
        num[:, y:y + h, x:x + w] += tile_probs[:, :h, :w] * window[:h, :w]
        den[y:y + h, x:x + w] += window[:h, :w]
    return num / den


@pytest.mark.parametrize("stitch_device", ["cpu", "model"])
def test_runner_blends_overlaps_with_the_overlap_window(tmp_path, stitch_device):
    """Defect guarded: the runner blending with a window that ignores ``--overlap`` (a uniform
    window: a plain mean of the tiles, seams at tile borders), or with no window at all in the
    overlaps.  Blended probabilities must be the window-weighted mean of position-dependent
    tile predictions, on the host stitcher and on the band (device) stitcher alike."""
    h, w, tile, overlap = 70, 85, 32, 11
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(h, w)])
    m = dataclasses.replace(model(position_in_tile, tile=tile), predict_device=position_in_tile)
    res = run_slide(path, m, tmp_path / "out", opts(overlap=overlap, write_probs=True, stitch_device=stitch_device))
    assert res.status == "done", res.message
    probs = tifffile.imread(tmp_path / "out" / "probs.tiff").astype(np.float64)
    one = position_in_tile(torch.zeros(1, 3, tile, tile, dtype=torch.uint8))[0].numpy().astype(np.float64)
    want = blend_reference(w, h, tile, overlap, one)
    np.testing.assert_allclose(probs, want, atol=2e-3)  # (float16 storage)
    labels = tifffile.imread(tmp_path / "out" / "labels.tiff", key=0)
    top2 = np.sort(want, 0)[-2:]
    clear = top2[1] - top2[0] > 1e-3  # (not where two classes tie)
    np.testing.assert_array_equal(labels[clear], want.argmax(0)[clear])


@pytest.mark.parametrize("length,tile,overlap,want", [
    (100, 32, 8, [0, 24, 48, 68]),
    (96, 32, 0, [0, 32, 64]),
    (97, 32, 0, [0, 32, 64, 65]),
    (120, 40, 13, [0, 27, 54, 80]),
    (40, 40, 13, [0]),
    (41, 40, 13, [0, 1]),
])
def test_tile_starts_step_by_exactly_tile_minus_overlap(length, tile, overlap, want):
    """Defect guarded: a stride off by one (``tile - overlap - 1``, ``tile - overlap + 1``) or an
    overlap counted twice: more tiles than needed (wasted model time) or gaps, and overlaps
    that no longer match the window's ramps.  Starts step by exactly ``tile - overlap`` and
    only the last one is moved back, flush with the edge."""
    assert tile_starts(length, tile, overlap) == want


@pytest.mark.parametrize("n,most", [(7, 3), (5, 2), (9, 4), (3, 1)])
def test_halved_batches_of_an_uneven_batch_keep_every_tile_once_in_order(n, most):
    """Defect guarded: a batch the GPU had no memory for, split into pieces of the size that fits,
    whose last, shorter piece is padded (e.g. filled up with the tiles before it, as a
    fixed-size graph would be) and the padding rows kept: more rows than tiles, and rows that
    belong to other tiles.  The runner's own tests only halve batches that split evenly."""
    from wsss.runner.model import _BatchHalving, _concat

    sizes, halves = [], []

    def predict(x):
        sizes.append(len(x))
        if len(x) > most:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} tiles")
        return x.float() * 2

    halving = _BatchHalving(on_halve=halves.append)
    tiles = torch.arange(n)[:, None]
    out = halving.call(predict, tiles, _concat)
    assert out.shape == (n, 1)
    np.testing.assert_array_equal(out[:, 0].numpy(), np.arange(n) * 2)
    # a later batch of the slide goes straight to pieces that fit, the short one last
    sizes.clear()
    out = halving.call(predict, torch.arange(n + 1)[:, None], _concat)
    np.testing.assert_array_equal(out[:, 0].numpy(), np.arange(n + 1) * 2)
    assert sum(sizes) == n + 1 and max(sizes) <= most


@pytest.mark.parametrize("amx,avx512_bf16,want", [(False, False, "float32"), (True, False, "bfloat16"),
                                                  (False, True, "bfloat16")])
def test_auto_precision_on_the_cpu_follows_its_bf16_units(monkeypatch, amx, avx512_bf16, want):
    """Defect guarded: ``--precision auto`` on a CPU choosing bfloat16 where the CPU has no bf16
    matrix units (emulated: many times slower, and outputs that change for nothing) or float32
    where it has them (the test machine's own CPU only ever shows one of the two cases)."""
    from wsss.runner.model import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert resolve_precision("auto", "cpu") == want
    assert resolve_precision("fp32", "cpu") == "float32"  # (an explicit choice is kept)


class _Broke(Exception):
    pass


@pytest.mark.parametrize("stitch_threads", [1, 2])
def test_an_error_finalising_the_last_piece_fails_the_run(tmp_path, monkeypatch, stitch_threads):
    """Defect guarded: an error raised by the stitcher thread after the last batch was handed
    over (finalising the slide's last piece, or in ``finish``) swallowed: the earlier batches'
    check no longer runs, every tile was counted in, and the run ended "done" with the
    bottom-right corner left as background."""
    import wsss.runner.pipeline as pipeline

    make = pipeline._make_finalize
    W, H = 90, 75

    def failing_make(*args, **kw):
        finalize = make(*args, **kw)

        def fin(x, y, probs):
            if x + probs.shape[2] == W and y + probs.shape[1] == H:  # (the piece with the last pixel)
                raise _Broke("finaliser broke on the last piece")
            return finalize(x, y, probs)

        return fin

    monkeypatch.setattr(pipeline, "_make_finalize", failing_make)
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(H, W)])
    with pytest.raises(_Broke):
        run_slide(path, model(), tmp_path / "out", opts(overlap=8, stitch_threads=stitch_threads,
                                                        stitch_device="cpu"))
    assert not (tmp_path / "out" / "labels.tiff").exists()


def test_openslide_reads_a_coarser_level_at_its_own_coordinates(tmp_path):
    """Defect guarded: OpenSlide's region origin given in level-L pixels instead of level-0 ones
    (OpenSlide wants level 0's): every region of a pyramid level other than 0 read from the
    wrong place (only the origin, which the other tests read, is the same either way)."""
    from wsss.slide import open_slide

    l0 = colour_slide(256, 192, seed=2, block=3)
    levels = [l0, l0[::2, ::2].copy(), l0[::4, ::4].copy()]
    path = tmp_path / "p.tif"
    write_pyramid(path, levels)
    with open_slide(path, reader="openslide") as r:
        assert r.kind == "openslide" and [int(round(d)) for d in r.level_downsamples] == [1, 2, 4]
        for level in (1, 2):
            img = levels[level]
            for x, y in ((10, 6), (17, 29)):
                np.testing.assert_array_equal(r.read_region(level, x, y, 20, 16), img[y:y + 16, x:x + 20])
            # a region that leaves the level: white outside it
            h, w = img.shape[:2]
            got = r.read_region(level, w - 8, h - 4, 20, 16)
            np.testing.assert_array_equal(got[:4, :8], img[h - 4:, w - 8:])
            assert (got[4:] == 255).all() and (got[:, 8:] == 255).all()

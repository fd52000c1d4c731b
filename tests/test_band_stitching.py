"""Blending on the model's device (wsss.runner.band_stitching.BandStitcher, ``--stitch-device``).

On the CPU the same code runs on CPU tensors, so every check here runs on any machine: the
device path must give the host ``Stitcher``'s outputs (byte for byte for one-hot predictors),
paste every pixel exactly once, and fail cleanly.  The CUDA tests at the end need a GPU.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsss.errors import WsssError
from wsss.runner import run_slide
from wsss.runner.band_stitching import BandStitcher, band_plan
from wsss.runner.tiling import TileGrid, weight_window

from runner_kit import GEOMETRIES, FakeCudaApi, FakeTorch, K, colour_slide, dies_at, model, opts, red_class, soft_colour, write_pyramid  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices

# NB: the shipped demo bundle is part of the package (tracked, installed): never skipped for
# lacking it, the tests fail instead
from wsss.cli.infer import demo_bundle_path  # noqa: E402

DEMO_BUNDLE = demo_bundle_path()
def needs_demo(test):  # (a label of the tests that use it; nothing skipped)
    return test
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


def on_device(predict=red_class, **kw):
    """A test model that also offers predict_device (here: CPU tensors)."""
    return dataclasses.replace(model(predict, **kw), predict_device=predict)


def run_both(path, tmp_path, m, **kw):
    a = run_slide(path, m, tmp_path / "cpu", opts(stitch_device="cpu", **kw))
    b = run_slide(path, m, tmp_path / "dev", opts(stitch_device="model", **kw))
    assert a.status == b.status == "done"
    ra, rb = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("cpu", "dev"))
    assert ra["tiles"]["stitch_device"] == "cpu" and rb["tiles"]["stitch_device"] == "model"
    assert ra["fingerprint"] == rb["fingerprint"]  # where blending runs is not a new result
    return tmp_path / "cpu", tmp_path / "dev"


def tiff(path: Path, name: str, key=0):
    return tifffile.imread(path / name, key=key)


# --------------------------------------------------------------------------------------
# the band plan
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_band_plan_pastes_every_covered_pixel_exactly_once(seed):
    rng = np.random.default_rng(seed)
    W, H = int(rng.integers(40, 300)), int(rng.integers(40, 300))
    tile = int(rng.integers(16, 64))
    grid = TileGrid(W, H, tile, int(rng.integers(0, tile // 2)))
    keep = rng.random(len(grid.tiles)) < rng.uniform(0.2, 1.0)
    tiles = [t for t, k in zip(grid.tiles, keep) if k] or grid.tiles[:1]
    covered = np.zeros((H, W), bool)
    for x, y in tiles:
        covered[y:y + tile, x:x + tile] = True
    pasted = np.zeros((H, W), np.int32)
    plan = band_plan(tiles, tile, W, H)
    for y0, y1, spans in plan:
        assert 0 <= y0 < y1 <= H and y1 - y0 <= tile
        assert all(a < b and (b <= c) for (a, b), (c, _) in zip(spans, spans[1:]))  # sorted, disjoint
        for x0, x1 in spans:
            pasted[y0:y1, x0:x1] += 1
    assert pasted.max() == 1 and (pasted[covered] == 1).all()
    assert [p[0] for p in plan] == sorted({y for _, y in tiles})


def test_tiles_out_of_raster_order_are_an_internal_error():
    st = BandStitcher(64, 64, 32, [(0, 0), (0, 32)], weight_window(32, 0), K, "cpu")
    try:
        with pytest.raises(RuntimeError, match="out of raster order"):
            st.add_batch([(0, 32)], torch.zeros(1, K, 32, 32))
    finally:
        st.finish(raise_errors=False)


# --------------------------------------------------------------------------------------
# the device path gives the host stitcher's outputs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,tile,overlap,out_tile", GEOMETRIES)
def test_one_hot_outputs_identical_to_host_blending(tmp_path, h, w, tile, overlap, out_tile):
    img = colour_slide(h, w)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img])
    a, b = run_both(path, tmp_path, on_device(tile=tile), overlap=overlap, output_tile=out_tile, write_probs=True)
    for name in ("labels.tiff", "probs.tiff", "areas.json", "areas.csv", "polygons.geojson", "overlay.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    np.testing.assert_array_equal(tiff(b, "labels.tiff"), (img[..., 0] // 64).clip(0, K - 1))


def test_smooth_predictor_matches_host_blending(tmp_path):
    img = colour_slide(70, 85, seed=3, block=1)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img])
    a, b = run_both(path, tmp_path, on_device(soft_colour, tile=32), overlap=11, write_probs=True)
    pa, pb = tiff(a, "probs.tiff").astype(np.float32), tiff(b, "probs.tiff").astype(np.float32)
    np.testing.assert_allclose(pb, pa, atol=1e-3)  # float16 storage of values <= 1 float32 ulp apart
    want = soft_colour(torch.from_numpy(img.transpose(2, 0, 1))[None])[0].numpy()
    margin = np.sort(want, 0)[-1] - np.sort(want, 0)[-2]
    la, lb = tiff(a, "labels.tiff"), tiff(b, "labels.tiff")
    assert (la == lb)[margin > 1e-5].all() and (lb == want.argmax(0))[margin > 1e-5].all()


def test_tissue_mask_with_gaps_matches_host_blending(tmp_path):
    """Skipped tiles leave whole tile rows and columns out: bands with gaps, rows no tile covers."""
    from PIL import Image

    img = colour_slide(200, 230, block=8)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img])
    mask = np.zeros((20, 23), np.uint8)
    mask[:5, :8] = 1
    mask[11:15, 4:20] = 1  # a gap of tile rows between the two
    mask[18:, 20:] = 1
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")
    a, b = run_both(path, tmp_path, on_device(tile=32), overlap=6, tissue=str(tmp_path / "mask.png"),
                    min_tissue=0.2, write_probs=True)
    for name in ("labels.tiff", "probs.tiff", "areas.json", "polygons.geojson"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    run = json.loads((b / "run.json").read_text())
    assert 0 < run["tiles"]["run"] < run["tiles"]["grid"]
    labels = tiff(b, "labels.tiff")
    assert (labels == 4).mean() > 0.5 and (labels < 4).any()  # background outside the tissue


def test_detected_tissue_matches_host_blending(tmp_path):
    img = colour_slide(320, 300, block=8)
    img[:, :110] = 240  # white glass on the left: detection keeps the right part
    path = tmp_path / "s.tif"
    write_pyramid(path, [img], mpp=4.0)
    a, b = run_both(path, tmp_path, on_device(tile=32, mpp=4.0), overlap=8, tissue="auto")
    run = json.loads((b / "run.json").read_text())
    assert 0 < run["tiles"]["run"] < run["tiles"]["grid"]
    for name in ("labels.tiff", "areas.json", "polygons.geojson"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# --------------------------------------------------------------------------------------
# choosing the path, and failures
# --------------------------------------------------------------------------------------
def test_model_stitching_needs_a_model_that_offers_device_outputs(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(40, 40)])
    with pytest.raises(WsssError, match="--stitch-device model needs"):
        run_slide(path, model(), tmp_path / "out", opts(stitch_device="model"))
    with pytest.raises(WsssError, match="--stitch-device must be auto, cpu or model"):
        run_slide(path, model(), tmp_path / "out2", opts(stitch_device="gpu"))


def test_auto_blends_on_the_host_for_a_cpu_model(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(40, 40)])
    run_slide(path, on_device(), tmp_path / "out", opts())
    assert json.loads((tmp_path / "out" / "run.json").read_text())["tiles"]["stitch_device"] == "cpu"


@pytest.mark.parametrize("free_mb,want", [(1, "cpu"), (4096, "model")])
def test_auto_blends_on_a_cuda_model_when_the_band_fits(tmp_path, monkeypatch, free_mb, want):
    """auto: the device when the accumulator (x3) fits in a quarter of the free device memory."""
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(90, 300)])
    asked = []

    def mem_get_info(device):
        asked.append(str(device))
        return free_mb * 2**20, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    m = dataclasses.replace(on_device(), description={"device": "cuda:1"})  # CPU tensors all the same
    run_slide(path, m, tmp_path / "out", opts(overlap=8))
    assert asked == ["cuda:1"]
    assert BandStitcher.device_bytes(K, 32, 300) == 3 * 5 * 32 * 300 * 4  # 0.55 MB here
    assert json.loads((tmp_path / "out" / "run.json").read_text())["tiles"]["stitch_device"] == want


def test_a_tall_user_mask_counts_in_the_device_memory_auto_asks_for(tmp_path, monkeypatch):
    """The band stitcher keeps the tissue mask's rows sampled at the grid's columns: (rows + 1) x
    W bytes, small for a detected mask, not for a user's fine one; "auto" counts it."""
    from PIL import Image

    path, mask = tmp_path / "s.tif", tmp_path / "m.png"
    write_pyramid(path, [colour_slide(90, 300)])
    Image.fromarray(np.full((2000, 6667), 255, np.uint8)).save(mask)  # (the slide's aspect)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * 2**20, 80 * 2**30))
    m = dataclasses.replace(on_device(), description={"device": "cuda:1"})  # CPU tensors all the same
    for name, tissue, want in (("none", "none", "model"), ("mask", str(mask), "cpu")):
        run_slide(path, m, tmp_path / name, opts(overlap=8, tissue=tissue))
        assert json.loads((tmp_path / name / "run.json").read_text())["tiles"]["stitch_device"] == want, name
    assert BandStitcher.device_bytes(K, 32, 300, 2000) == 3 * 5 * 32 * 300 * 4 + 2001 * 300  # 1.18 MB > 4 MB / 4


def test_writer_failure_surfaces_and_leaves_no_result(tmp_path, monkeypatch):
    from wsss.runner import stitching

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(150, 140, block=9)])

    def broken(self, x, y, block):
        raise OSError("disk full (test)")

    monkeypatch.setattr(stitching.OutputTiles, "paste", broken)
    with pytest.raises(OSError, match="disk full"):
        run_slide(path, on_device(), tmp_path / "out", opts(overlap=8, stitch_device="model", batch_size=1))
    out = tmp_path / "out"
    assert not (out / "run.json").exists() and not (out / "labels.tiff").exists()
    assert not list(out.glob(".*")), "temporary files left behind"


def test_model_failure_midway_leaves_no_result(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(150, 140, block=9)])
    dying = dies_at(3, RuntimeError("killed (test)"))
    with pytest.raises(RuntimeError, match="killed") as info:
        run_slide(path, on_device(dying), tmp_path / "out", opts(overlap=8, stitch_device="model"))
    assert any("the model failed on batch 3" in n for n in info.value.__notes__)
    assert not (tmp_path / "out" / "run.json").exists()


def test_cuda_band_download_logic_with_fake_events(monkeypatch):
    """The CUDA branch's pinned copies and events, run on the CPU with stand-ins: every band's
    download event is recorded on the device's current stream by the producer, and the writer
    synchronises it before it reads that band's host buffer."""
    import threading

    from wsss.runner import band_stitching

    cuda = FakeCudaApi()
    fake = FakeTorch(cuda)
    monkeypatch.setattr(band_stitching, "torch", fake)
    W, H, tile = 150, 110, 32
    grid = TileGrid(W, H, tile, 8)
    st = BandStitcher(W, H, tile, grid.tiles, weight_window(tile, 8), K, "cpu", background_index=4)
    st._pin = True  # the CUDA branch (pinned buffers, non-blocking copies, events)
    canvas = np.full((H, W), 255, np.uint8)

    class Out:
        def paste(self, x, y, block):
            cuda.log.append(("paste", y, threading.current_thread().name))
            canvas[y:y + block.shape[0], x:x + block.shape[1]] = block

    st.labels_out = Out()
    img = colour_slide(H, W)
    x = torch.from_numpy(img.transpose(2, 0, 1).copy())
    for i in range(0, len(grid.tiles), 5):
        pos = grid.tiles[i:i + 5]
        st.add_batch(pos, red_class(torch.stack([x[:, y:y + tile, xx:xx + tile] for xx, y in pos])))
    st.finish()
    np.testing.assert_array_equal(canvas, (img[..., 0] // 64).clip(0, K - 1))
    records = [e for e in cuda.log if e[0] == "record"]
    assert len(records) == len(st.plan) and all(e[2] == "compute" for e in records)
    assert len(fake.pinned) == len(st.plan)  # one pinned label buffer per band
    for (y0, _, _), rec in zip(st.plan, records):
        i_rec, i_sync = cuda.log.index(rec), cuda.log.index(("sync", rec[1]))
        pastes = [i for i, e in enumerate(cuda.log) if e[0] == "paste" and e[1] == y0]
        assert pastes and i_rec < i_sync < min(pastes)
        assert all(cuda.log[i][2] == "wsss-band-writer" for i in pastes)


# --------------------------------------------------------------------------------------
# a real bundle
# --------------------------------------------------------------------------------------
def bundle_model(device, **kw):
    from wsss.bundle import load_bundle
    from wsss.runner import SlideModel

    return SlideModel.from_bundle(load_bundle(str(DEMO_BUNDLE), device=device), device=device, **kw)


@needs_demo
def test_demo_bundle_on_cpu_blends_the_same_on_either_side(tmp_path):
    img = colour_slide(300, 260, block=12)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img], mpp=1.0)
    m = bundle_model("cpu", precision="float32")
    a, b = run_both(path, tmp_path, m, tissue="none", overlap=12, batch_size=4)
    la, lb = tiff(a, "labels.tiff"), tiff(b, "labels.tiff")
    assert (la == lb).mean() >= 0.9999


@needs_cuda
@needs_demo
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cuda_blending_on_the_device_matches_the_host(tmp_path, precision):
    img = colour_slide(700, 650, block=12)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img], mpp=1.0)
    m = bundle_model("cuda", precision=precision)
    a, b = run_both(path, tmp_path, m, tissue="none", overlap=12, batch_size=8, write_probs=True)
    la, lb = tiff(a, "labels.tiff"), tiff(b, "labels.tiff")
    assert (la == lb).mean() >= 0.9999
    np.testing.assert_allclose(tiff(b, "probs.tiff").astype(np.float32), tiff(a, "probs.tiff").astype(np.float32),
                               atol=2e-3)
    # auto picks the device on CUDA
    run_slide(path, m, tmp_path / "auto", opts(tissue="none", overlap=12, batch_size=8))
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["tiles"]["stitch_device"] == "model"


def test_stitcher_setup_failure_stops_the_band_writer(tmp_path, monkeypatch):
    """The band stitcher starts its writer thread when it is made; a failure attaching its outputs
    (here: the early label pyramid) must not leave that thread running."""
    import threading

    import wsss.runner.writers as writers

    def no_pyramid(*a, **k):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(writers, "LabelPyramid", no_pyramid)
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(97, 131)])
    with pytest.raises(OSError, match="Too many open files"):
        run_slide(path, on_device(), tmp_path / "out", opts(stitch_device="model", early_pyramid=True))
    assert not [t for t in threading.enumerate() if t.name == "wsss-band-writer"]
    assert not list((tmp_path / "out").glob(".*"))


def test_band_masks_are_the_tissue_mask_region_of_each_band():
    """The device mask of each band (sampled at the grid's columns once, one gather per band)
    is TissueMask.region of the band's rows, also where the grid reaches past the mask."""
    from wsss.slide.tissue import TissueMask

    rng = np.random.default_rng(3)
    tissue = TissueMask(rng.random((7, 9)) > 0.4, 10.0, 12.0, "test")  # 70 x 108 um
    width, height, tile = 150, 90, 32  # at 0.8 um/px: 120 x 72 um, past the mask on both axes
    grid = TileGrid(width, height, tile, 8)
    st = BandStitcher(width, height, tile, list(grid.tiles), weight_window(tile, 8), K, "cpu",
                      tissue=tissue, grid_mpp=0.8)
    try:
        for y0, y1, _ in st.plan:
            want = tissue.region(0, y0, width, y1 - y0, 0.8)
            assert np.array_equal(st._mask_by_row[st._mask_row_of[y0:y1]].numpy(), want), y0
        assert not st._mask_by_row[-1].any()
    finally:
        st.finish(raise_errors=False)


def test_a_finish_that_fails_leaves_a_safe_second_finish(monkeypatch):
    """The last band's finalise fails (a GPU out of memory, say); the error handler's
    finish(raise_errors=False) must not raise again in its place (it finalised a band whose
    accumulator the first finish had already let go)."""
    import wsss.ops as ops
    from wsss.runner.band_stitching import BandStitcher
    from wsss.runner.tiling import weight_window

    class Sink:
        def paste(self, *a):
            pass

    st = BandStitcher(64, 64, 32, [(0, 0), (32, 0)], weight_window(32, 0), 3, "cpu")
    st.labels_out = Sink()
    st.add_batch([(0, 0), (32, 0)], torch.rand(2, 3, 32, 32))

    def fails(*a, **k):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(ops, "band_finalize", fails)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        try:
            st.finish()
        except BaseException:
            st.finish(raise_errors=False)
            raise
    assert st.acc is None and not st._writer.is_alive()

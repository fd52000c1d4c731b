"""The same bundle through TIAToolbox's SemanticSegmentor and through the wsss runner (optional).

Skipped, with the reason, where TIAToolbox is not importable (it is not a wsss dependency: it
pins torch below the 2.14 wsss is built against, so it lives in a separate virtual environment
that reuses the system torch; see docs/runner.md).

test_tiatoolbox_vs_runner: one synthetic slide (wsss.synthetic, 1536 x 1536 at the bundle's
mpp, seed 0), one predictor (the shipped demo bundle, gated probabilities, shared by both so
TorchScript's optimised graph is the same), wsss-infer's tile size / overlap (tile // 8) /
batch (8) and stride tile - overlap on both sides, every tile run (no tissue filter on either).
Rounds interleave the contenders: before every timed TIAToolbox run (-> slide.zarr labels;
TIAToolbox's cheapest file output) an untimed setup runs the wsss runner on the same slide
(-> all its outputs: label pyramid TIFF, overlay, QC, areas, GeoJSON, run.json).  extra_info
has both wall times, tiles/s and Mpx/s, the ratio, and the label agreement of the two stitched
maps over the generator's tissue (and each one's accuracy against the truth).

Run (from the TIAToolbox venv, this checkout's wsss on the path):
    PYTHONPATH=$PWD /work/venvs/tia/bin/python -m pytest benchmarks/bench_tiatoolbox.py --benchmark-only
Env: WSSS_BENCH_TIA_SIZE (slide edge, default 1536), WSSS_BENCH_TIA_ROUNDS (default 3),
     WSSS_BENCH_TIA_WORKERS (TIAToolbox DataLoader worker processes, default 0 = its default),
     WSSS_BENCH_BUNDLE (any bundle instead of the demo one).
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

tiatoolbox = pytest.importorskip(
    "tiatoolbox", reason="TIAToolbox is not installed (optional comparison; it pins torch<2.13, so it needs "
                         "its own venv: see the module docstring)")

import tifffile  # noqa: E402
import torch  # noqa: E402

from wsss.runner import RunOptions, SlideModel, TileGrid, run_slide  # noqa: E402

BATCH = 8


def _bundle_path() -> Path:
    import wsss

    return Path(os.environ.get("WSSS_BENCH_BUNDLE") or Path(wsss.__file__).resolve().parent / "assets" / "demo_bundle.pt")


# NB: the thread count this process started with; restored before every round of either engine
# (see _ThreadProbe) so neither inherits what the other left behind.
THREADS = torch.get_num_threads()


class _ThreadProbe:
    """Records torch.get_num_threads() as the model sees it at every batch, per engine.

    NB: measured here (2026-11): in the first run_slide of a process the model runs with 1
    thread from its second batch on (the runner's helper threads call torch.set_num_threads(1)),
    and the process keeps 1 afterwards; once reset, later runs keep the count.  The warm-up run
    takes that drop; every timed round starts from THREADS, and extra_info reports the counts
    each engine's batches ran with."""

    def __init__(self) -> None:
        self.engine = "warm-up"
        self.seen: dict = {}

    def note(self) -> None:
        self.seen.setdefault(self.engine, []).append(torch.get_num_threads())


@pytest.fixture(scope="module")
def probe():
    return _ThreadProbe()


@pytest.fixture(scope="module")
def slide_model(probe):
    """The bundle's SlideModel (gated probabilities), its predict and submit wrapped by the probe."""
    import dataclasses

    from wsss.bundle import load_bundle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SlideModel.from_bundle(load_bundle(str(_bundle_path())), device="cpu", precision="auto")
    predict, submit = model.predict, model.submit

    def probed_predict(tiles):
        probe.note()
        return predict(tiles)

    def probed_submit(tiles):
        probe.note()
        return submit(tiles)

    return dataclasses.replace(model, predict=probed_predict, submit=probed_submit if submit else None)


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory, slide_model):
    """(slide path, truth path): a pyramidal JPEG TIFF at the bundle's mpp, so both engines read
    level 0 without resampling and the truth lines up pixel for pixel."""
    from wsss.synthetic import write_synthetic_slide

    size = int(os.environ.get("WSSS_BENCH_TIA_SIZE", "1536"))
    path = tmp_path_factory.mktemp("tia") / "slide.tif"
    truth = write_synthetic_slide(str(path), size, size, seed=0, mpp=slide_model.mpp or 0.5,
                                  num_classes=len(slide_model.class_names))
    return path, Path(truth)


def _tia_engine(slide_model: SlideModel, tile: int, stride: int, calls: list):
    """A TIAToolbox SemanticSegmentor around ``slide_model.predict`` and its IOSegmentorConfig.

    NB: TIAToolbox hands infer_batch uint8 NHWC batches; the predictor gets them as an NCHW
    view with channels_last strides, exactly as the wsss runner hands it its batches (the bundle
    predictor's .contiguous(channels_last) is then free on both sides).  The output goes back
    NHWC, as TIAToolbox's own segmentation models return it; postproc is its argmax.
    """
    from tiatoolbox import rcParam
    from tiatoolbox.models.architecture.utils import argmax_last_axis
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.models.models_abc import ModelABC

    # NB: TIAToolbox torch.compile's the model by default when no incompatible GPU is present
    # (on a CPU too); the predictor is a TorchScript module that both engines must share as is.
    rcParam["torch_compile_mode"] = "disable"

    class BundleModel(ModelABC):
        def __init__(self) -> None:
            super().__init__()
            self.class_dict = dict(enumerate(slide_model.class_names))

        def forward(self, tiles: torch.Tensor) -> torch.Tensor:  # uint8 [N,3,t,t] -> float32 [N,K,t,t]
            return torch.as_tensor(slide_model.predict(tiles))

        @staticmethod
        def infer_batch(model, batch_data, *, device: str) -> np.ndarray:  # uint8 [N,t,t,3] -> float32 [N,t,t,K]
            calls.append(len(batch_data))
            return model(torch.as_tensor(batch_data).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()

        def postproc(self, image):
            return argmax_last_axis(image=image)

    mpp = slide_model.mpp or 0.5
    res = {"units": "mpp", "resolution": mpp}
    io = IOSegmentorConfig(input_resolutions=[res], output_resolutions=[res], save_resolution=res,
                           patch_input_shape=(tile, tile), patch_output_shape=(tile, tile),
                           stride_shape=(stride, stride))
    engine = SemanticSegmentor(model=BundleModel(), batch_size=BATCH,
                               num_workers=int(os.environ.get("WSSS_BENCH_TIA_WORKERS", "0")),
                               device="cpu", verbose=False)
    return engine, io


def _tia_run(engine, io, slide: Path, out: Path) -> Path:
    """slide -> out/slide.zarr (uint8 labels 'predictions' [H, W] at the model mpp, 'coordinates')."""
    from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader

    shutil.rmtree(out, ignore_errors=True)
    # NB: WSIReader.open takes a generic pyramidal TIFF for a single-level image without mpp
    # (VirtualWSIReader: the whole image decoded into RAM); OpenSlide reads its pyramid and mpp.
    reader = OpenSlideWSIReader(slide)
    result = engine.run([reader], patch_mode=False, ioconfig=io, save_dir=out, output_type="zarr",
                        auto_get_mask=False, overwrite=True)
    return Path(next(iter(result.values())))


def test_tiatoolbox_vs_runner(benchmark, synthetic_slide, slide_model, probe, tmp_path):
    import zarr

    slide, truth_path = synthetic_slide
    tile = slide_model.tile_size
    overlap = tile // 8  # wsss-infer's default
    calls: list = []
    engine, io = _tia_engine(slide_model, tile, tile - overlap, calls)
    opts = RunOptions(overlap=overlap, tissue="none", progress=False, batch_size=BATCH, workers=2)

    # warm-up (untimed): TorchScript's profiling executor optimises over the first calls per
    # input shape; one full run of each engine also pays every lazy import and first-touch cost
    for warm_up in (lambda: run_slide(slide, slide_model, tmp_path / "wsss", opts, log=lambda s: None),
                    lambda: _tia_run(engine, io, slide, tmp_path / "tia")):
        torch.set_num_threads(THREADS)
        warm_up()

    wsss_runs: list = []

    def setup():  # untimed for pytest-benchmark: the wsss runner moments before each TIAToolbox round
        probe.engine = "wsss"
        torch.set_num_threads(THREADS)
        t0 = time.perf_counter()
        res = run_slide(slide, slide_model, tmp_path / "wsss", opts, log=lambda s: None)
        wall = time.perf_counter() - t0
        assert res.status == "done", res.message
        wsss_runs.append({"wall_s": wall, "tiles_s": res.timings["tiles"], "total_s": res.timings["total"]})

    tia_walls: list = []

    def tia_round():
        calls.clear()
        probe.engine = "tiatoolbox"
        torch.set_num_threads(THREADS)
        t0 = time.perf_counter()
        z = _tia_run(engine, io, slide, tmp_path / "tia")
        tia_walls.append(time.perf_counter() - t0)
        return z

    rounds = int(os.environ.get("WSSS_BENCH_TIA_ROUNDS", "3"))
    zarr_path = benchmark.pedantic(tia_round, setup=setup, rounds=rounds, iterations=1)

    tia_zarr = zarr.open(str(zarr_path), mode="r")
    tia_labels = np.asarray(tia_zarr["predictions"])
    tia_coords = np.asarray(tia_zarr["coordinates"])  # [n, 4] x0, y0, x1, y1 of every tile run
    wsss_labels = tifffile.imread(tmp_path / "wsss" / "labels.tiff", key=0)
    truth = tifffile.imread(truth_path)
    K = len(slide_model.class_names)
    assert tia_labels.shape == wsss_labels.shape == truth.shape, (tia_labels.shape, wsss_labels.shape, truth.shape)
    tissue = truth < K
    agree = tia_labels == wsss_labels
    agree_tissue = float(agree[tissue].mean())
    # pixels that one and the same tile alone covers in both grids: no blending on either side,
    # so both engines must give the predictor's own argmax there
    h, w = truth.shape
    grid = TileGrid(w, h, tile, overlap)

    def same_sole_tile(wsss_starts, tia_starts, length):
        a, b = _sole_tile(wsss_starts, length, tile), _sole_tile(np.unique(tia_starts), length, tile)
        return (a >= 0) & (a == b)

    sole = same_sole_tile(grid.ys, tia_coords[:, 1], h)[:, None] & same_sole_tile(grid.xs, tia_coords[:, 0], w)[None, :]
    agree_sole = float(agree[sole].mean())
    tia_tiles = sum(calls)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    wsss_wall, tia_wall = med([r["wall_s"] for r in wsss_runs]), med(tia_walls)
    benchmark.extra_info.update(
        tiatoolbox_version=tiatoolbox.__version__, torch_version=torch.__version__, threads=THREADS,
        model_threads_seen={k: sorted(set(v)) for k, v in probe.seen.items()},
        wsss_batches_at_1_thread=probe.seen.get("wsss", []).count(1), wsss_batches=len(probe.seen.get("wsss", [])),
        bundle=str(_bundle_path().name), slide_px=[w, h], megapixels=w * h / 1e6, tile=tile, overlap=overlap,
        batch=BATCH, tia_workers=engine.num_workers, precision=slide_model.description.get("precision"),
        tia_tiles=tia_tiles, wsss_tiles=grid.total,
        tia_wall_s=tia_wall, tia_wall_s_all=tia_walls,
        wsss_wall_s=wsss_wall, wsss_tile_stage_s=med([r["tiles_s"] for r in wsss_runs]),
        wsss_runs=wsss_runs,
        tia_mpx_per_s=w * h / 1e6 / tia_wall, wsss_mpx_per_s=w * h / 1e6 / wsss_wall,
        tia_tiles_per_s=tia_tiles / tia_wall,
        tia_over_wsss_wall=tia_wall / wsss_wall,
        # NB: on a shared machine other jobs only ever add time: the fastest round of each is the
        # least disturbed estimate
        tia_over_wsss_wall_best=min(tia_walls) / min(r["wall_s"] for r in wsss_runs),
        label_agreement_tissue=agree_tissue,
        label_agreement_all=float(agree.mean()),
        label_agreement_single_tile_px=agree_sole, single_tile_px_fraction=float(sole.mean()),
        label_agreement_blended_tissue=float(agree[tissue & ~sole].mean()),
        wsss_tiles_per_s=grid.total / wsss_wall,
        tia_accuracy_tissue=float((tia_labels == truth)[tissue].mean()),
        wsss_accuracy_tissue=float((wsss_labels == truth)[tissue].mean()),
        note="TIAToolbox: plain averaging of overlaps, per-row float canvases of the whole slide held in RAM "
             "(spilled to zarr only above its memory threshold), outputs zarr labels; wsss: raised-cosine "
             "blending in bounded bands, all outputs written")
    # the same predictor, tiles and stride: where one tile alone decides, the labels must match;
    # elsewhere only the blending of the overlaps (TIAToolbox averages, wsss weights by a
    # raised-cosine window) and the last row/column of tiles (TIAToolbox pads past the edge, wsss
    # snaps the last tile inside) differ, which moves labels only where classes are close
    assert sole.mean() > 0.5 and agree_sole > 0.999, benchmark.extra_info
    assert agree_tissue > 0.85, benchmark.extra_info


def _sole_tile(starts, length: int, tile: int) -> np.ndarray:
    """int64 [length]: the start of the only tile covering each position along one axis, -1 where
    none or several do."""
    count = np.zeros(length, np.int64)
    owner = np.full(length, -1, np.int64)
    for s in starts:
        count[s:s + tile] += 1
        owner[s:s + tile] = s
    owner[count != 1] = -1
    return owner

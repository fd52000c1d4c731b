"""Whole-slide runner benchmarks (pytest-benchmark).

- test_model_only / test_end_to_end: the same tiles through the same realistic bundle, alone
  (model.predict on pre-read batches) and through the whole runner (read, blend, stitch,
  write every output).  The bundle has the demo model's architecture (TissueSegmenter:
  ResNet-38 classifier width 1/16 + DeepLabV3+ ResNet-50 width 1/8, random weights: speed
  does not depend on them), and with WSSS_BENCH_MODELS=demo,quarter also at widths 1/4 + 1/4
  ("quarter", ~8x the compute);
  or WSSS_BENCH_BUNDLE=path for any one bundle (e.g. the shipped demo bundle,
  wsss/assets/demo_bundle.pt: trained, so its labels are a tissue map, not noise; with
  WSSS_BENCH_SLIDE=tissue, the synthetic tissue it was trained on, and WSSS_BENCH_OVERLAP=12,
  wsss-infer's default for its 96-px tiles).  test_end_to_end also
  times a model-only pass before every round (untimed setup) so the overhead compares runs
  made moments apart on a shared machine; extra_info has Mpx/s of both, the per-stage
  times and the overhead (target: tile stage <= 1.10 x model-only).  WSSS_BENCH_ROUNDS
  (default 5) sets their rounds, WSSS_BENCH_PRECISION the model's precision (default auto, as
  wsss-infer: bfloat16 on CPUs with bf16 matrix units).
- test_peak_memory_flat: peak RSS growth (VmHWM of a fresh subprocess, the median of three) of
  a run on a small and a large mostly-glass synthetic slide (benchmarks/sparse_slide.py; tissue
  detection on, a cheap predictor so the runner, not a model, dominates).  WSSS_BENCH_BIG sets
  the big edge (default 16384 for CI; the issue's case is 60000).  Target: flat.
- test_many_slides: 4 slides (WSSS_BENCH_MANY_SIZE^2) through run_slides, outputs written
  after each slide or in the background while the next slide's tiles run, with a model that
  only sleeps (WSSS_BENCH_ACCEL_MS per tile, like a GPU: no CPU) and with the bench bundle;
  compare the medians of each pair.
- test_early_pyramid: one slide (WSSS_BENCH_PYRAMID_SIZE^2) through the stand-in accelerator,
  the label pyramid built after the tile stage or while it runs (RunOptions.early_pyramid).
- test_monai_sliding_window: the same model through MONAI's sliding_window_inference on the
  same (in-memory) region, only if MONAI is installed.

- On a GPU (tools/gpu_check.sh): WSSS_BENCH_DEVICE=cuda WSSS_BENCH_MODELS=reference (ResNet-38 +
  DeepLabV3+ ResNet-101 at full width) WSSS_BENCH_BATCH=32 WSSS_BENCH_WORKERS=4 (the CUDA defaults).  There the
  model-only baseline is itself pipelined (submit batch i, then take batch i-1's result: the
  transfers already overlap the compute), so the overhead is the runner's own.

Run: pytest benchmarks/bench_runner.py --benchmark-only   (CI: --benchmark-disable)
     WSSS_BENCH_SIZE=1536 WSSS_BENCH_BIG=60000 WSSS_BENCH_MODELS=demo,quarter pytest benchmarks/bench_runner.py --benchmark-only
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsss.runner import RunOptions, SlideModel, run_slide

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_slide import write_sparse_slide  # noqa: E402

K = 4
TILE = 256
OVERLAP = int(os.environ.get("WSSS_BENCH_OVERLAP", "32"))
BATCH = int(os.environ.get("WSSS_BENCH_BATCH", "8"))
WORKERS = int(os.environ.get("WSSS_BENCH_WORKERS", "2"))
# the label TIFF's tile edge (RunOptions.output_tile): the number of output tiles sets how often
# the band writer, the pyramid and the TIFF writer hand the GIL around (an A/B knob)
OUTPUT_TILE = int(os.environ.get("WSSS_BENCH_OUTPUT_TILE", "256"))
DEVICE = os.environ.get("WSSS_BENCH_DEVICE", "cpu")
# rounds of test_model_only / test_end_to_end (fewer for big slides on a GPU lease)
ROUNDS = int(os.environ.get("WSSS_BENCH_ROUNDS", "5"))
PRECISION = os.environ.get("WSSS_BENCH_PRECISION", "auto")  # (the bundle predictor's; auto as wsss-infer)
CLASSES = ["TE", "NEC", "LYM", "TAS"]
PALETTE = [[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0], [255, 255, 255]]


def write_slide(path: Path, size: int, tile: int = 256) -> None:
    """Tiled zlib RGB TIFF written tile by tile (never the whole image in memory)."""
    def tiles():
        yy, xx = np.mgrid[0:tile, 0:tile]
        for ty in range(-(-size // tile)):
            for tx in range(-(-size // tile)):
                t = np.empty((tile, tile, 3), np.uint8)
                t[..., 0] = ((xx + tx * tile) // 37 * 64 + (yy + ty * tile) // 41 * 64) % 256
                t[..., 1] = (xx * 3 + yy) % 256
                t[..., 2] = 128
                yield t

    with tifffile.TiffWriter(path, bigtiff=size * size * 3 > 2**31) as tif:
        tif.write(tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                  compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")


# model sizes: (classifier width, segmenter width, segmenter backbone); "demo" is
# tools/make_demo_bundle.py's architecture, "reference" the paper's networks (GPU only, in practice)
MODEL_WIDTHS = {"demo": (1 / 16, 1 / 8, "resnet50"), "quarter": (1 / 4, 1 / 4, "resnet50"),
                "reference": (1.0, 1.0, "resnet101")}


def make_bench_bundle(path: Path, size: str = "demo") -> Path:
    """A bundle (ResNet-38 + DeepLabV3+ at MODEL_WIDTHS[size]) at tile 256, 0.5 um/px,
    random weights, BatchNorm statistics recomputed on synthetic tissue (on DEVICE).

    NB: random init with BatchNorm statistics (0, 1) is numerically pathological (activations
    exploding or vanishing into denormals), which distorts timings; update_bn gives the
    activations a trained network has."""
    from torch.optim.swa_utils import update_bn

    from wsss.bundle import save_bundle
    from wsss.models import DeepLabV3Plus, ResNet38Classifier, TissueSegmenter
    from wsss.synthetic import render_tissue

    torch.manual_seed(0)
    cls_w, seg_w, backbone = MODEL_WIDTHS[size]
    classifier = ResNet38Classifier(K, width=cls_w).to(DEVICE)
    segmenter = DeepLabV3Plus(K, backbone=backbone, width=seg_w).to(DEVICE)
    calibration = [torch.from_numpy(np.stack([render_tissue(TILE, TILE, seed=1000 + s)[0] for s in range(8)]))
                   .permute(0, 3, 1, 2).float().to(DEVICE) / 255]
    update_bn(calibration, classifier)
    update_bn(calibration, segmenter)
    module = TissueSegmenter(classifier.cpu(), segmenter.cpu()).eval()
    save_bundle(str(path), module, {"class_names": CLASSES, "palette": PALETTE, "background_index": K,
                                    "tile_size": TILE, "mpp": 0.5,
                                    "config": {"note": "benchmark model, random weights, BatchNorm statistics from synthetic tissue"}})
    return path


# WSSS_BENCH_SLIDE: "pattern" (write_slide: a flat zlib TIFF of stripes) or "tissue" (the
# synthetic H&E generator's pyramidal JPEG TIFF, as a scanner writes one, 0.5 um/px)
SLIDE_KIND = os.environ.get("WSSS_BENCH_SLIDE", "pattern")


@pytest.fixture(scope="module")
def bench_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "slide.tif"
    size = int(os.environ.get("WSSS_BENCH_SIZE", "1024"))
    if SLIDE_KIND == "tissue":
        from wsss.synthetic import write_synthetic_slide

        write_synthetic_slide(str(path), size, size, seed=0, mpp=0.5)
    elif SLIDE_KIND == "pattern":
        write_slide(path, size)
    else:
        raise ValueError(f"WSSS_BENCH_SLIDE must be pattern or tissue, got {SLIDE_KIND!r}")
    return path


# NB: CI (--benchmark-disable) runs only the demo size; WSSS_BENCH_MODELS=demo,quarter for the table
BENCH_MODELS = [m for m in os.environ.get("WSSS_BENCH_MODELS", "demo").split(",") if m]


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    """name -> SlideModel of the benchmark bundle of that size (made once per module)."""
    import warnings

    from wsss.bundle import load_bundle
    from wsss.runner.pipeline import preload_slide_libraries

    from wsss.runner import reading
    from wsss.runner.tile_stage import reader_processes

    # as wsss-infer does while its bundle loads (not a slide's cost): the libraries' imports and,
    # where tiles are read in worker processes (CUDA on 8+ cores), the readers' start
    preload_slide_libraries()
    if reader_processes(DEVICE):
        reading.reserve(WORKERS)
    cache: dict = {}

    def get(name: str) -> SlideModel:
        if os.environ.get("WSSS_BENCH_BUNDLE") and name != "demo":
            pytest.skip("WSSS_BENCH_BUNDLE given: one model")
        if name not in cache:
            path = os.environ.get("WSSS_BENCH_BUNDLE") or make_bench_bundle(
                tmp_path_factory.mktemp("bundle") / f"bench-{name}.pt", name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name] = SlideModel.from_bundle(load_bundle(str(path)), device=DEVICE, precision=PRECISION)
        return cache[name]

    return get


@pytest.fixture(scope="module", params=BENCH_MODELS)
def slide_model(request, bench_model):
    return bench_model(request.param)


@functools.lru_cache(maxsize=1)  # NB: read once for the model-only test and every pipeline
def _tiles_of(path: Path, tile: int, mpp: float) -> torch.Tensor:
    """Every grid tile of the slide at ``mpp`` (the model's) as the runner hands them to the
    model: uint8 [N,3,t,t] (NHWC memory)."""
    from wsss.runner.tiling import TileGrid
    from wsss.slide import SlideView, open_slide, plan_scale

    r = open_slide(path)
    v = SlideView(r, plan_scale(r, mpp))
    grid = TileGrid(v.plan.width, v.plan.height, tile, OVERLAP)
    return torch.from_numpy(np.stack([v.read(x, y, tile, tile) for x, y in grid.tiles])).permute(0, 3, 1, 2)


def _warm_up(model: SlideModel, tiles: torch.Tensor) -> None:
    """TorchScript's profiling executor optimises a module over its first calls per input shape
    (~1 s here): warm up the full batch and the last, partial batch so both tests time steady
    state (a CLI run pays it once per process: see the stage times in docs/runner.md).  On CUDA
    the predictor captures a CUDA graph per batch shape on its CudaGraphs.WARMUP-th call: that
    happens here too, not in a timed round."""
    from wsss.bundle import CudaGraphs

    for _ in range(CudaGraphs.WARMUP + 1 if DEVICE.startswith("cuda") else 2):
        model.predict(tiles[:BATCH])
        if len(tiles) % BATCH:
            model.predict(tiles[:len(tiles) % BATCH])


def _model_only(model: SlideModel, tiles: torch.Tensor):
    if DEVICE.startswith("cuda") and model.predict_device is not None:
        # NB: the model alone leaves its outputs on the GPU, as the runner's default pipeline
        # does (it blends there): until 2026-11-27 this baseline downloaded every batch's float32
        # scores (~33 MB per batch of 32 reference tiles), which made it slower than the runner's
        # model path and the GPU overheads look smaller.  Uploads go through the predictor's
        # pinned ring either way; the host-blending pipelines pay their downloads as overhead.
        out = None
        for i in range(0, len(tiles), BATCH):
            out = model.predict_device(tiles[i:i + BATCH])
        torch.cuda.synchronize()
        return out
    if DEVICE.startswith("cuda"):
        # pipelined like the runner's model loop: batch i is submitted before batch i-1's
        # result is taken, so the baseline overlaps transfers and compute as well
        out, pending = None, None
        for i in range(0, len(tiles), BATCH):
            nxt = model.predict_async(tiles[i:i + BATCH])
            if pending is not None:
                out = pending.result()
            pending = nxt
        return torch.as_tensor(pending.result())
    out = None
    for i in range(0, len(tiles), BATCH):
        out = model.predict(tiles[i:i + BATCH])
    return out


def test_model_only(benchmark, bench_slide, slide_model):
    tile = slide_model.tile_size
    tiles = _tiles_of(bench_slide, tile, slide_model.mpp)
    _warm_up(slide_model, tiles)
    out = benchmark.pedantic(lambda: _model_only(slide_model, tiles), rounds=ROUNDS, iterations=1)
    assert out.shape[1:] == (K, tile, tile) and torch.isfinite(out).all()
    mpx = len(tiles) * tile * tile / 1e6
    benchmark.extra_info.update(tiles=len(tiles), tile=tile, batch=BATCH, threads=torch.get_num_threads(),
                                megapixels=mpx, precision=slide_model.description.get("precision"), device=DEVICE,
                                baseline="outputs left on the device" if DEVICE.startswith("cuda")
                                and slide_model.predict_device is not None else "outputs on the host")
    if benchmark.stats:
        benchmark.extra_info["model_mpx_per_s"] = mpx / benchmark.stats.stats.median


# The runner's ways to feed the model and blend (stitch_device "auto" picks the device on CUDA):
# on CUDA also blending in CPU threads ("host-blend") and the synchronous model path (no pinned
# ring, no copy streams, host blending): what device blending and the overlap buy.
# WSSS_BENCH_PIPELINES=a,b,... picks others (e.g. device-blend on the CPU).
_PIPELINE_SETUP = {"overlapped": ("async", "auto"), "host-blend": ("async", "cpu"),
                   "device-blend": ("async", "model"), "synchronous": ("sync", "cpu")}
PIPELINES = [p for p in os.environ.get("WSSS_BENCH_PIPELINES", "").split(",") if p] or \
    (["overlapped", "host-blend", "synchronous"] if DEVICE.startswith("cuda") else ["overlapped"])


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_end_to_end(benchmark, bench_slide, slide_model, tmp_path, pipeline):
    import dataclasses

    feed, stitch_device = _PIPELINE_SETUP[pipeline]
    runner_model = slide_model if feed == "async" else dataclasses.replace(slide_model, submit=None)
    tile = slide_model.tile_size
    tiles = _tiles_of(bench_slide, tile, slide_model.mpp)
    _warm_up(slide_model, tiles)
    model_s: list = []

    def setup():  # untimed: a model-only pass moments before each runner round
        t0 = time.perf_counter()
        _model_only(slide_model, tiles)
        model_s.append(time.perf_counter() - t0)

    opts = RunOptions(overlap=OVERLAP, tissue="none", progress=False, batch_size=BATCH, workers=WORKERS,
                      stitch_device=stitch_device, output_tile=OUTPUT_TILE)
    runs: list = []

    def run():
        t0 = time.perf_counter()
        res = run_slide(bench_slide, runner_model, tmp_path / "out", opts, log=lambda s: None)
        # NB: the whole run is run_slide's wall time: run.json's "total" stops before the outputs
        # are moved into place and the work folder is removed (~20 ms at 1024^2); both kept
        wall = time.perf_counter() - t0
        runs.append({**json.loads((tmp_path / "out" / "run.json").read_text())["timings_s"], "wall": wall})
        return res

    first = None
    if not benchmark.disabled:
        # NB: the process's first slide, outside the rounds: the model-only pass is timed warm
        # (``_warm_up``), and so are the runner's rounds (as every slide but a command's first);
        # what the first slide pays on top (worker processes started, pinned and device buffers
        # allocated, ...) is reported on its own: first_*
        setup()
        run()
        first = model_s.pop(), runs.pop()
    res = benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    assert res.status == "done"
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["tiles"]["run"] == len(tiles)
    labels = tifffile.imread(tmp_path / "out" / "labels.tiff", key=0)
    assert labels.shape == (run["scale"]["height"], run["scale"]["width"]) and labels.max() < K
    med = lambda xs: float(np.median(xs))  # noqa: E731
    t_model = med(model_s)
    stages = {k: med([r.get(k, 0.0) for r in runs]) for k in runs[0]}
    mpx = len(tiles) * tile * tile / 1e6
    benchmark.extra_info.update(
        tiles=len(tiles), tile=tile, overlap=OVERLAP, batch=BATCH, workers=WORKERS, threads=torch.get_num_threads(), device=DEVICE,
        output_tile=OUTPUT_TILE, bundle=os.path.basename(os.environ.get("WSSS_BENCH_BUNDLE", "")) or None,
        precision=slide_model.description.get("precision"), megapixels=mpx, stages_s=stages,
        model_only_s=t_model, model_only_mpx_per_s=mpx / t_model, tile_stage_mpx_per_s=mpx / stages["tiles"],
        total_mpx_per_s=mpx / stages["wall"], tile_stage_overhead=stages["tiles"] / t_model - 1.0,
        total_overhead=stages["wall"] / t_model - 1.0,
        # NB: on a shared machine other jobs only ever add time: the fastest round of each is the
        # least disturbed estimate of both
        tile_stage_overhead_best=min(r["tiles"] for r in runs) / min(model_s) - 1.0,
        # each runner round against the model-only pass made just before it (robust to drift)
        tile_stage_overhead_paired=float(np.median([r["tiles"] / m for r, m in zip(runs, model_s)])) - 1.0,
        pipeline=pipeline, stitch_device=run["tiles"]["stitch_device"], readers=run["tiles"].get("readers"),
        total_overhead_best=min(r["wall"] for r in runs) / min(model_s) - 1.0,
        model_only_s_all=model_s, tile_stage_s_all=[r["tiles"] for r in runs], total_s_all=[r["wall"] for r in runs],
        run_json_total_s_all=[r["total"] for r in runs],
        # each whole run (all outputs written and in place) against the model-only pass made just before it
        total_overhead_paired=float(np.median([r["wall"] / m for r, m in zip(runs, model_s)])) - 1.0)
    if first is not None:
        (m, r) = first
        benchmark.extra_info.update(first_model_only_s=m, first_tile_stage_s=r["tiles"], first_total_s=r["wall"],
                                    first_tile_stage_overhead=r["tiles"] / m - 1.0, first_total_overhead=r["wall"] / m - 1.0,
                                    first_stages_s=r)


_MEM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    def status(key):  # NB: VmHWM sees torch/numpy/native memory, which tracemalloc does not
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    import torch
    import shapely, skimage.measure, skimage.morphology, tifffile, wsss.ops, wsss.runner.writers  # imports are not the run
    from wsss.runner import RunOptions, SlideModel, run_slide
    K = {K}
    path, out = sys.argv[1], sys.argv[2]
    def cheap(x):  # one-hot of red // 64: the runner, not a model, dominates
        c = (x[:, 0].long() // 64).clamp(0, K - 1)
        return torch.nn.functional.one_hot(c, K).permute(0, 3, 1, 2).float()
    m = SlideModel(cheap, {CLASSES!r}, {PALETTE!r}, K, 0.5, 256, "cheap")
    before = status("VmHWM")
    t0 = time.perf_counter()
    r = run_slide(path, m, out, RunOptions(overlap={OVERLAP}, progress=False, batch_size=8), log=lambda s: None)
    run = json.load(open(out + "/run.json"))
    print(json.dumps({{"hwm_before_mb": before, "hwm_after_mb": status("VmHWM"),
                      "growth_mb": status("VmHWM") - before, "tiles_run": run["tiles"]["run"],
                      "grid_tiles": run["tiles"]["grid"], "peak_piece_mb": run["tiles"]["peak_piece_mb"],
                      "seconds": time.perf_counter() - t0, "timings_s": r.timings}}))
""").format(K=K, CLASSES=CLASSES, PALETTE=PALETTE, OVERLAP=OVERLAP)  # (the overlap the bound below assumes)


def _peak(tmp_path: Path, size: int) -> dict:
    slide = tmp_path / f"s{size}.tif"
    write_sparse_slide(slide, size)
    script = tmp_path / "mem.py"
    script.write_text(_MEM_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(slide), str(tmp_path / f"o{size}")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_flat(benchmark, tmp_path):
    big = int(os.environ.get("WSSS_BENCH_BIG", "16384"))
    small_size = 4096
    runs: dict = {"small": [], "big": []}

    # NB: three fresh processes per size, interleaved, compared by their medians: the peak of one
    # run moves by tens of MB with the allocator's timing alone (16384^2 here: 214-222 MB in five
    # runs, 287 MB once in CI; 4096^2: 181-207 MB), which a single pair of runs mistook for growth
    def run():
        for _ in range(3):
            runs["small"].append(_peak(tmp_path, small_size))
            runs["big"].append(_peak(tmp_path, big))
        return runs

    benchmark.pedantic(run, rounds=1, iterations=1)
    s, b = (sorted(runs[k], key=lambda r: r["growth_mb"])[1] for k in ("small", "big"))  # the medians
    growth = b["growth_mb"] - s["growth_mb"]
    result = {"small": s, "big": b, "growth_mb_all": {k: [r["growth_mb"] for r in v] for k, v in runs.items()}}
    benchmark.extra_info.update(small=small_size, big=big, small_stats=s, big_stats=b,
                                growth_mb_all=result["growth_mb_all"],
                                run_rss_growth_difference_mb=growth, area_ratio=(big / small_size) ** 2)
    assert b["tiles_run"] > s["tiles_run"] > 0 and b["grid_tiles"] > 10 * s["grid_tiles"]
    # flat: (big/small)^2 x the pixels may not cost more than a small, width-proportional strip
    # (one row of overlap strips of K+1 floats, twice for allocator slack) + 64 MB
    assert growth < 64 + big * OVERLAP * (K + 1) * 4 * 2 / 2**20, result


# A stand-in accelerator: sleeps (GIL released, no CPU) for ACCEL_MS per tile and returns
# one-hot labels, so the CPU work around a fast GPU model can be timed on any machine.
# NB: a GPU's results arrive without host CPU, so the labels (one-hot of red // 64) are
# computed once per batch size, from the first batch, and that tensor is returned from then
# on (computing them per batch took ~9 ms of the 2 cores per 8 tiles, counted as "infer").
ACCEL_MS = float(os.environ.get("WSSS_BENCH_ACCEL_MS", "8"))


@pytest.fixture(scope="module")
def many_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    size = int(os.environ.get("WSSS_BENCH_MANY_SIZE", "1536"))
    slides = [root / f"s{i}.tif" for i in range(4)]
    for path in slides:
        write_slide(path, size)
    return slides


def _accelerator() -> SlideModel:
    results: dict = {}  # (the runner only reads a model's results)

    def accelerator(x):
        time.sleep(ACCEL_MS * 1e-3 * x.shape[0])
        if x.shape not in results:
            c = (x[:, 0].long() // 64).clamp(0, K - 1)
            results[x.shape] = torch.nn.functional.one_hot(c, K).permute(0, 3, 1, 2).float().contiguous()
        return results[x.shape]

    return SlideModel(accelerator, CLASSES, PALETTE, K, 0.5, TILE, "accelerator")


@pytest.mark.parametrize("background", [False, True], ids=["sequential", "background-outputs"])
@pytest.mark.parametrize("engine", ["accelerator"] + BENCH_MODELS)
def test_many_slides(benchmark, bench_model, many_slides, tmp_path, engine, background):
    """4 slides through run_slides, outputs written after each slide (sequential) or while the
    next slide's tiles run (background_outputs, the default).  engine "accelerator": a model
    that costs only wall time, like a GPU (WSSS_BENCH_ACCEL_MS per tile); else a benchmark
    bundle (WSSS_BENCH_MODELS) on WSSS_BENCH_DEVICE, each round against the model alone on the
    same tiles moments before (total_overhead_paired: the whole-run overhead of a batch of
    slides).  extra_info: the per-slide stages."""
    from wsss.runner import run_slides

    model = _accelerator() if engine == "accelerator" else bench_model(engine)
    opts = RunOptions(overlap=OVERLAP, tissue="none", progress=False, batch_size=BATCH, workers=WORKERS,
                      background_outputs=background)
    rounds: list = []
    walls: list = []
    model_s: list = []
    slide_tiles = None if engine == "accelerator" else _tiles_of(many_slides[0], model.tile_size, model.mpp)
    if slide_tiles is not None:
        _warm_up(model, slide_tiles)

    def setup():  # untimed: the model alone on every slide's tiles, moments before each round
        if slide_tiles is not None:
            t0 = time.perf_counter()
            for _ in many_slides:  # (the slides are copies of one picture: the same tiles)
                _model_only(model, slide_tiles)
            model_s.append(time.perf_counter() - t0)

    def run():
        out = tmp_path / f"out{len(rounds)}"
        t0 = time.perf_counter()
        res = run_slides(many_slides, model, [out / p.stem for p in many_slides], opts, log=lambda s: None)
        walls.append(time.perf_counter() - t0)
        rounds.append(res)
        return res

    res = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert [r.status for r in res] == ["done"] * len(many_slides)
    tiles = sum(json.loads((Path(r.out_dir) / "run.json").read_text())["tiles"]["run"] for r in res)
    stages = {k: float(np.median([r.timings.get(k, 0.0) for r in res])) for k in res[0].timings}
    if model_s:
        # every slide's whole run, all outputs written, against the model alone on the same tiles
        extra = {"model_only_s_all": model_s, "wall_s_all": walls,
                 "total_overhead_paired": float(np.median([w / m for w, m in zip(walls, model_s)])) - 1.0}
    else:
        extra = {"accel_ms_per_tile": ACCEL_MS, "model_s": tiles * ACCEL_MS * 1e-3}
    benchmark.extra_info.update(slides=len(many_slides), tiles=tiles, engine=engine, background_outputs=background,
                                per_slide_median_s=stages, **extra)


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("pyramid") / "slide.tif"
    write_slide(path, int(os.environ.get("WSSS_BENCH_PYRAMID_SIZE", "1024")))
    return path


@pytest.mark.parametrize("early", [False, True], ids=["pyramid-after", "pyramid-during-tiles"])
def test_early_pyramid(benchmark, pyramid_slide, tmp_path, early):
    """One slide (WSSS_BENCH_PYRAMID_SIZE^2) through the stand-in accelerator, the label pyramid
    built after the tile stage or during it (RunOptions.early_pyramid, the CUDA default): on a
    machine whose model leaves the CPU idle the pyramid's time leaves the critical path.
    extra_info: the median stages, and total - model time (the runner's whole overhead)."""
    opts = RunOptions(overlap=OVERLAP, tissue="none", progress=False, batch_size=BATCH, workers=WORKERS,
                      early_pyramid=early)
    runs: list = []

    def run():
        res = run_slide(pyramid_slide, _accelerator(), tmp_path / "out", opts, log=lambda s: None)
        runs.append(res.timings)
        return res

    res = benchmark.pedantic(run, rounds=3, iterations=1)
    run_info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert res.status == "done" and run_info["tiles"]["pyramid_during_tiles"] is early
    model_s = run_info["tiles"]["run"] * ACCEL_MS * 1e-3
    stages = {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in runs[0]}
    benchmark.extra_info.update(early_pyramid=early, tiles=run_info["tiles"]["run"], accel_ms_per_tile=ACCEL_MS,
                                model_s=model_s, stages_s=stages, overhead_s=stages["total"] - model_s,
                                total_overhead=stages["total"] / model_s - 1.0)


def test_monai_sliding_window(benchmark, bench_slide, slide_model, tmp_path):
    """The same bundle through MONAI's sliding_window_inference (gaussian blending) on the same
    region, against the runner's tile stage on the same slide (extra_info: the ratio)."""
    monai_inferers = pytest.importorskip("monai.inferers")
    from wsss.slide import SlideView, open_slide, plan_scale

    r = open_slide(bench_slide)
    v = SlideView(r, plan_scale(r, slide_model.mpp))
    img = torch.from_numpy(v.read(0, 0, v.plan.width, v.plan.height)).permute(2, 0, 1)[None].float()
    tile = slide_model.tile_size

    def run():
        with torch.inference_mode():  # NB: the predictor returns inference tensors MONAI updates in place
            return monai_inferers.sliding_window_inference(img, (tile, tile), BATCH, slide_model.predict,
                                                           overlap=OVERLAP / tile, mode="gaussian")

    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert out.shape == (1, K, v.plan.height, v.plan.width)
    res = run_slide(bench_slide, slide_model, tmp_path / "out",
                    RunOptions(overlap=OVERLAP, tissue="none", progress=False, batch_size=BATCH), log=lambda s: None)
    mpx = v.plan.width * v.plan.height / 1e6
    benchmark.extra_info.update(note="MONAI holds the whole region and its output in RAM; outputs only probabilities",
                                megapixels=mpx, runner_tile_stage_s=res.timings["tiles"],
                                runner_total_s=res.timings["total"])
    if benchmark.stats:
        benchmark.extra_info["monai_over_runner_tile_stage"] = benchmark.stats.stats.median / res.timings["tiles"]

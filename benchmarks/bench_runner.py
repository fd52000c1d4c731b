"""Whole-slide runner benchmarks (pytest-benchmark).

- test_model_only / test_end_to_end: the same tiles through the same model, alone and through
  the whole runner (read, blend, stitch, write every output).  extra_info has Mpx/s of both
  and the overhead; the target is end-to-end tile stage <= 1.10 x model-only.
- test_peak_memory_flat: peak RSS of a subprocess running a small and a big synthetic slide
  with a cheap predictor (WSSS_BENCH_BIG sets the big edge, default 3072; use 60000 for the
  issue's 60k x 60k case).  Target: flat.
- test_monai_sliding_window: the same model through MONAI's sliding_window_inference on the
  same (in-memory) region, only if MONAI is installed.

Run: pytest benchmarks/bench_runner.py --benchmark-only   (CI: --benchmark-disable)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsss.runner import RunOptions, SlideModel, run_slide

K = 4
TILE = 256
OVERLAP = 32
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


class SmallSegNet(torch.nn.Module):
    """A cheap but real conv net (3 convs at full resolution) standing in for a bundle."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, K, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(x.float() / 255.0), dim=1)


@pytest.fixture(scope="module")
def bench_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "slide.tif"
    write_slide(path, int(os.environ.get("WSSS_BENCH_SIZE", "1536")))
    return path


@pytest.fixture(scope="module")
def net():
    scripted = torch.jit.script(SmallSegNet().eval())

    def predict(x):
        with torch.inference_mode():
            return scripted(x)

    return predict


def _tiles_of(path: Path):
    from wsss.runner.tiling import TileGrid
    from wsss.slide import SlideView, open_slide, plan_scale

    r = open_slide(path)
    v = SlideView(r, plan_scale(r, 0.5))
    grid = TileGrid(v.plan.width, v.plan.height, TILE, OVERLAP)
    return np.stack([v.read(x, y, TILE, TILE).transpose(2, 0, 1) for x, y in grid.tiles])


def test_model_only(benchmark, bench_slide, net):
    tiles = torch.from_numpy(_tiles_of(bench_slide))

    def run():
        out = None
        for i in range(0, len(tiles), 8):
            out = net(tiles[i:i + 8])
        return out

    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert out.shape[1:] == (K, TILE, TILE)
    mpx = len(tiles) * TILE * TILE / 1e6
    benchmark.extra_info.update(tiles=len(tiles), tile=TILE, batch=8, threads=torch.get_num_threads(),
                                megapixels=mpx)
    if benchmark.stats:
        benchmark.extra_info["model_mpx_per_s"] = mpx / benchmark.stats.stats.median


def test_end_to_end(benchmark, bench_slide, net, tmp_path):
    model = SlideModel(net, ["A", "B", "C", "D"], PALETTE, 4, 0.5, TILE, "bench")
    opts = RunOptions(overlap=OVERLAP, tissue="none", progress=False, batch_size=8, workers=2)
    res = benchmark.pedantic(lambda: run_slide(bench_slide, model, tmp_path / "out", opts, log=lambda s: None),
                             rounds=3, iterations=1)
    assert res.status == "done"
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    t = run["timings_s"]
    mpx = run["tiles"]["run"] * TILE * TILE / 1e6
    benchmark.extra_info.update(tiles=run["tiles"]["run"], tile=TILE, overlap=OVERLAP, batch=8, workers=2,
                                threads=torch.get_num_threads(), megapixels=mpx, stages_s=t,
                                tile_stage_mpx_per_s=mpx / t["tiles"], total_mpx_per_s=mpx / t["total"],
                                tile_stage_overhead=t["tiles"] / t["infer"] - 1.0)


_MEM_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    sys.path.insert(0, {bench_dir!r})
    from bench_runner import PALETTE, K, write_slide
    from wsss.runner import RunOptions, SlideModel, run_slide
    path, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    write_slide(__import__('pathlib').Path(path), size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    def cheap(x):  # one-hot of red // 64: the runner, not a model, dominates
        c = (x[:, 0].long() // 64).clamp(0, K - 1)
        return torch.nn.functional.one_hot(c, K).permute(0, 3, 1, 2).float()
    m = SlideModel(cheap, ["A", "B", "C", "D"], PALETTE, 4, 0.5, 256, "cheap")
    r = run_slide(path, m, out, RunOptions(overlap=32, tissue="none", progress=False, batch_size=8), log=lambda s: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = json.load(open(out + "/run.json"))
    print(json.dumps({{"peak_rss_mb": peak / 1024, "rss_before_run_mb": base / 1024,
                      "peak_piece_mb": run["tiles"]["peak_piece_mb"], "seconds": r.timings["total"]}}))
""")


def _peak(tmp_path: Path, size: int) -> dict:
    script = tmp_path / "mem.py"
    script.write_text(_MEM_SCRIPT.format(bench_dir=str(Path(__file__).resolve().parent)))
    r = subprocess.run([sys.executable, str(script), str(tmp_path / f"s{size}.tif"), str(size),
                        str(tmp_path / f"o{size}")], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_flat(benchmark, tmp_path):
    big = int(os.environ.get("WSSS_BENCH_BIG", "3072"))
    small_size = 1024
    result = {}

    def run():
        result["small"] = _peak(tmp_path, small_size)
        result["big"] = _peak(tmp_path, big)
        return result

    benchmark.pedantic(run, rounds=1, iterations=1)
    s, b = result["small"], result["big"]
    growth = (b["peak_rss_mb"] - b["rss_before_run_mb"]) - (s["peak_rss_mb"] - s["rss_before_run_mb"])
    benchmark.extra_info.update(small=small_size, big=big, small_stats=s, big_stats=b,
                                run_rss_growth_mb=growth, area_ratio=(big / small_size) ** 2)
    # flat: 36x the pixels may not cost more than a small, width-proportional strip
    assert growth < 64 + big * 32 * 5 * 4 * 2 / 2**20, result


def test_monai_sliding_window(benchmark, bench_slide, net):
    monai_inferers = pytest.importorskip("monai.inferers")
    from wsss.slide import SlideView, open_slide, plan_scale

    r = open_slide(bench_slide)
    v = SlideView(r, plan_scale(r, 0.5))
    img = torch.from_numpy(v.read(0, 0, v.plan.width, v.plan.height).transpose(2, 0, 1).copy())[None]

    def run():
        return monai_inferers.sliding_window_inference(img, (TILE, TILE), 8, net, overlap=OVERLAP / TILE,
                                                       mode="gaussian")

    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert out.shape == (1, K, v.plan.height, v.plan.width)
    benchmark.extra_info.update(note="MONAI holds the whole region and its output in RAM")

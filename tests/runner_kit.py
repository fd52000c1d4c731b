"""Helpers shared by the runner tests: colour-coded synthetic slides and trivial predictors
whose exact output is known, so a stitched result can be checked pixel for pixel.

(Imported by tests/test_runner*.py; tests/conftest.py puts this folder on sys.path.)
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import tifffile
import torch

from wsss.runner import RunOptions, SlideModel

# the real test slide (public domain): ../shared's, or the one WSSS_REAL_SLIDE names (a GPU
# machine's copy of the tree has no ../shared: tools/gpu_check.sh passes its copy on)
REAL_SLIDE = Path(os.environ.get("WSSS_REAL_SLIDE")
                  or Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu-1-small-region.svs")

def python_env() -> dict:
    """The environment for a fresh interpreter that imports the same wsss as these tests (the
    installed package in CI, whose clone has no compiled library; PYTHONSAFEPATH keeps the
    working directory off sys.path)."""
    import wsss

    root = str(Path(wsss.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def run_python(code: str, *args: str, timeout: float = 120):
    """``python -c code args...`` with ``python_env()``; the CompletedProcess, output as text."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=python_env())


K = 4
PALETTE = [[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0], [255, 255, 255]]


def colour_slide(h: int, w: int, seed: int = 0, block: int = 5) -> np.ndarray:
    """uint8 [h, w, 3]: blocks whose red channel encodes a class (red // 64)."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, K, (h // block + 1, w // block + 1)).repeat(block, 0).repeat(block, 1)[:h, :w]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = cls * 64 + 20
    img[..., 1] = rng.integers(0, 256, (h, w))
    img[..., 2] = 255 - img[..., 0]
    return img


def write_pyramid(path: Path, levels, *, mpp=0.5, tile=32):
    with tifffile.TiffWriter(path) as tif:
        for i, img in enumerate(levels):
            res = 1e4 / (mpp * levels[0].shape[1] / img.shape[1])
            tif.write(img, tile=(tile, tile), photometric="rgb", compression="zlib", resolution=(res, res),
                      resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)


def red_class(x: torch.Tensor) -> torch.Tensor:
    """Trivial predictor: one-hot of red // 64.  uint8 [N,3,H,W] -> float32 [N,K,H,W]."""
    c = (x[:, 0].long() // 64).clamp(0, K - 1)
    return torch.nn.functional.one_hot(c, K).permute(0, 3, 1, 2).float()


def soft_colour(x: torch.Tensor) -> torch.Tensor:
    """Trivial smooth predictor: softmax of a fixed linear map of the pixel colour."""
    w = torch.tensor([[0.02, 0.0, -0.01], [-0.01, 0.01, 0.0], [0.0, -0.01, 0.02], [0.005, 0.005, 0.005]])
    logits = torch.einsum("kc,nchw->nkhw", w, x.float())
    return torch.softmax(logits, dim=1)


def dies_at(call: int, error: Exception, predict=red_class):
    """A predictor that raises ``error`` on its ``call``-th call (1-based), else predicts."""
    calls = {"n": 0}

    def dying(x):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return predict(x)

    return dying


# (height, width, tile, overlap, output tile) of the exact-reconstruction checks
GEOMETRIES = [
    (97, 131, 32, 8, 32),    # odd sizes, multiple tiles
    (31, 29, 32, 8, 16),     # slide smaller than one tile
    (150, 64, 48, 20, 32),   # big overlap, width = exact tiles
    (77, 200, 32, 0, 48),    # no overlap
    (120, 90, 40, 13, 64),   # odd overlap
]


def model(predict=red_class, tile=32, mpp=0.5, bg=4):
    return SlideModel(predict, ["A", "B", "C", "D"], PALETTE, bg, mpp, tile, identity=f"test-{predict.__name__}")


def opts(**kw):
    base = dict(tissue="none", progress=False, output_tile=32, workers=2, batch_size=3)
    base.update(kw)
    return RunOptions(**base)


# --------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# CUDA stand-ins: the stream/event logic of the CUDA paths, run on the CPU
# --------------------------------------------------------------------------------------
class FakeCudaApi:
    """Stand-ins for the torch.cuda calls of wsss.bundle._CudaOverlap, logging what is done, so
    its ring/stream/event logic runs on the CPU (NB: no real pinned memory or stream is touched)."""

    def __init__(self):
        self.log: list = []
        api = self

        class Stream:
            count = 0

            def __init__(self, device=None):
                Stream.count += 1
                self.name = f"s{Stream.count}"

            def wait_stream(self, other):
                api.log.append(("wait", self.name, other.name))

        class Event:
            count = 0

            def __init__(self, **kw):
                Event.count += 1
                self.name, self.blocking = f"e{Event.count}", kw.get("blocking", False)

            def record(self, stream):
                api.log.append(("record", self.name, stream.name))

            def synchronize(self):
                api.log.append(("sync", self.name))

            def query(self):
                return True

        self.Stream, self.Event = Stream, Event
        self.compute = Stream()
        self.compute.name = "compute"
        self.current = [self.compute]

    def stream(self, s):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.current.append(s)
            yield
            self.current.pop()
        return ctx()

    def device(self, d):
        import contextlib
        return contextlib.nullcontext()

    def current_stream(self, device=None):
        return self.current[-1]


class FakeTorch:
    """wsss.bundle's view of torch with the CUDA calls faked and pin_memory dropped (logged)."""

    def __init__(self, cuda):
        self.cuda, self.pinned = cuda, []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *args, pin_memory=False, **kw):
        t = torch.empty(*args, **kw)
        if pin_memory:
            self.pinned.append(t)
        return t

    def empty_like(self, t, device=None, **kw):
        return torch.empty_like(t, **kw)


@contextlib.contextmanager
def own_workers(monkeypatch, module):
    """A pool of worker processes of the test's own in place of ``module._WORKERS`` (outlines,
    reading), ended afterwards."""
    from wsss.runner.workers import WorkerPool

    workers = WorkerPool(module.__name__)
    monkeypatch.setattr(module, "_WORKERS", workers)
    try:
        yield workers
    finally:
        workers.shutdown()


# --------------------------------------------------------------------------------------
# a trivial bundle for the command-line tests
# --------------------------------------------------------------------------------------
class RedClassModule(torch.nn.Module):
    """Trivial bundle module: class = red // 64, one-hot scores, every class present."""

    def forward(self, tiles: torch.Tensor, with_scores: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = torch.clamp(tiles[:, 0].to(torch.int64) // 64, 0, 3)
        scores = torch.nn.functional.one_hot(c, 4).permute(0, 3, 1, 2).to(torch.float32)
        if not with_scores:
            scores = torch.empty(0)
        return c.to(torch.uint8), scores, torch.ones(tiles.shape[0], 4)


RED_BUNDLE_META = {"class_names": ["A", "B", "C", "D"],
                   "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 255, 255]],
                   "background_index": 4, "tile_size": 32, "mpp": 0.5}


def save_red_bundle(path: Path, module=None, **meta) -> Path:
    """A bundle of ``module`` (default RedClassModule) with RED_BUNDLE_META (``meta`` overrides)."""
    from wsss.bundle import save_bundle, script_module

    save_bundle(str(path), script_module(module if module is not None else RedClassModule()),
                dict(RED_BUNDLE_META, **meta))
    return path


def no_user_bundle(monkeypatch, tmp_path) -> None:
    """Keep wsss-infer from finding the user's bundle (WSSS_BUNDLE, WSSS_CONFIG, ~/.config)."""
    monkeypatch.delenv("WSSS_BUNDLE", raising=False)
    monkeypatch.delenv("WSSS_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))  # (no user config there)

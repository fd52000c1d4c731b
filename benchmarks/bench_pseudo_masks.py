"""Stage-2 throughput: batched multi-layer Grad-CAM vs the reference code's loop.

The reference (ChuHan89/WSSS-Tissue) runs one patch, one layer and one class backward at a
time (with parameter gradients); wsss runs one forward per batch, one backward per class (or
one vmapped backward over the classes) for b4_5 and b5_2 together, and no backward for bn7.  Same network, same inputs;
each benchmark checks its maps against the other method's.  Report patches/s from the
pytest-benchmark means (patches = extra_info["patches"]).

Default size (small, so CI stays fast): ResNet-38 at width 0.125, 4 patches of 64 px.
Measured at the default size (2 threads, lightly loaded, `--benchmark-only`): batched
per-class mean 53.6 ms, batched vmapped 56.7 ms, reference loop 913 ms -> 17.0x.
Earlier (heavy contention, width 0.25, 8 x 112 px, one round): 6.6 s / 10.0 s / 63.4 s -> 9.6x.
WSSS_BENCH_FULL=1: width 1.0 (the reference network), 8 patches of 224 px.
"""
import os

import pytest
import torch

from wsss.models import ResNet38Classifier
from wsss.train.pseudo_masks import gradcam_maps, gradcam_maps_reference_loop

FULL = os.environ.get("WSSS_BENCH_FULL") == "1"
WIDTH, PATCH, N = (1.0, 224, 8) if FULL else (0.125, 64, 4)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ResNet38Classifier(4, width=WIDTH).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(N, 3, PATCH, PATCH)
    reference_maps = gradcam_maps_reference_loop(model, x)  # the batched methods' oracle, every patch
    return model, x, reference_maps


def _batched(model, x, batched_backward=False):
    return gradcam_maps(model, x.detach().requires_grad_(True), batched_backward=batched_backward)


def _check(maps, ref):
    for layer in ("b4_5", "b5_2", "bn7"):
        scale = ref[layer].abs().max().item()
        assert maps[layer].shape == ref[layer].shape, layer
        assert torch.allclose(maps[layer], ref[layer], atol=1e-4 * scale + 1e-9), layer


def _info(benchmark, method):
    benchmark.group = "stage-2 Grad-CAM pseudo masks"
    benchmark.extra_info.update(method=method, patches=N, patch=PATCH, width=WIDTH, classes=4,
                                layers="b4_5,b5_2,bn7", threads=torch.get_num_threads())


def test_batched_vmapped(benchmark, setup):
    model, x, ref = setup
    _info(benchmark, "batched, one vmapped backward over classes")
    maps = benchmark(_batched, model, x, True)
    _check(maps, ref)


def test_batched_per_class(benchmark, setup):
    model, x, ref = setup
    _info(benchmark, "batched, one backward per class")
    maps = benchmark(_batched, model, x)
    _check(maps, ref)


def test_reference_loop(benchmark, setup):
    model, x, ref = setup
    _info(benchmark, "reference loop: patch x layer x class")
    maps = benchmark.pedantic(gradcam_maps_reference_loop, args=(model, x), rounds=1, iterations=1)
    _check(maps, _batched(model, x))  # (the other method's maps: not the loop's own from setup)

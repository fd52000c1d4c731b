"""Tiles per second of the networks and the whole inference module.

    pytest benchmarks/bench_models.py --benchmark-only                  # small width, batch 8
    WSSS_BENCH_REFERENCE=1 pytest benchmarks/bench_models.py --benchmark-only -k reference
    WSSS_BENCH_COMPILE=1 ...                                            # + torch.compile variants
    pytest benchmarks/bench_models.py --benchmark-disable              # each variant once (CI)
    python tools/bench_table.py bench.json --models                     # the README table

Variants (group models-<net>-<width>-b<batch>, extra_info impl "<mode> <precision>"):
- net: classifier (ResNet-38 logits), segmenter (DeepLabV3+-R101 low-resolution logits),
  tissue (the whole bundle module: uint8 tiles -> classifier, DeepLab, gate + argmax).
- mode: eager; scripted (torch.jit.script, what a bundle holds); frozen (torch.jit.freeze of
  the scripted module: BatchNorm folded); compiled (torch.compile, opt-in).
- precision: float32; bfloat16 (weights cast, channels_last: what Bundle.predictor does);
  bfloat16-autocast (float32 weights under torch.autocast).
- width: small (1/8 of the reference channels; batch 8, the runner's default; batch 2 under
  --benchmark-disable, where CI only proves that every variant runs and checks out) and reference
  (width 1, batch 1: ResNet-38 105 M params ~ 200 GFLOP per 224-px tile, seconds per tile on 2
  CPU cores, hence opt-in).

WSSS_BENCH_DEVICE=cuda (tools/gpu_check.sh) runs the reference width on the GPU instead: batch 32,
modes eager and scripted, precisions float32 (cuDNN's default TF32 convolutions, as a bundle runs),
bfloat16, bfloat16-autocast and float16-autocast (what `--precision auto` / fp16 run on CUDA).

Every variant checks its result against eager float32 (float32: allclose; tissue: label
agreement).  test_precision_agreement measures pixel-label agreement of each reduced-precision
mode against float32 on the TRAINED demo bundle (synthetic tissue tiles), which is the number
to quote: random-init networks have arbitrary logit margins.

NB: bfloat16 is fast only on CPUs with bf16 units (AVX-512 BF16 / AMX); on AVX2-only CPUs
PyTorch falls back to slow reference convolutions (extra_info["cpu_bf16_kernels"] says which
case was measured).
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

from wsss.bundle import cpu_reduced_precision_supported, script_module
from wsss.models import DeepLabV3Plus, ResNet38Classifier, TissueSegmenter

warnings.filterwarnings("ignore", category=FutureWarning)

TILE = 224
DEVICE = torch.device(os.environ.get("WSSS_BENCH_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"
REFERENCE = CUDA or os.environ.get("WSSS_BENCH_REFERENCE") == "1"
COMPILE = os.environ.get("WSSS_BENCH_COMPILE") == "1"
if CUDA:  # a GPU is for the reference network at a real batch; a small width only measures launches
    WIDTHS = {"reference": (1.0, 32)}  # tag -> (width, batch)
    MODES = ("eager", "scripted", "compiled")
    PRECISIONS = ("float32", "bfloat16", "bfloat16-autocast", "float16-autocast")
else:
    WIDTHS = {"small": (0.125, 8), "reference": (1.0, 1)}
    MODES = ("eager", "scripted", "frozen", "compiled")
    PRECISIONS = ("float32", "bfloat16", "bfloat16-autocast")
AUTOCAST = {"bfloat16-autocast": torch.bfloat16, "float16-autocast": torch.float16}


def _tiles(n: int, size: int = TILE, seed0: int = 0) -> torch.Tensor:
    """Synthetic H&E-like tiles [N,3,H,W] uint8."""
    from wsss.synthetic import render_tissue

    hwc = np.stack([render_tissue(size, size, seed=seed0 + s)[0] for s in range(n)])
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()


_NETS: dict = {}


def _network(net: str, width: float) -> torch.nn.Module:
    key = (net, width)
    if key not in _NETS:
        torch.manual_seed(0)
        clf = ResNet38Classifier(4, width=width)
        seg = DeepLabV3Plus(4, backbone="resnet101", width=width)
        # NB: random weights (no trained weights can be downloaded here)
        # NB: random init with BatchNorm statistics (0, 1) is numerically pathological (DeepLab
        # activations ~1e6, classifier outputs ~1e-3 with denormals inside, which made some
        # variants 5-100x slower or faster for no real reason): BatchNorm statistics are
        # recomputed from synthetic tissue (torch.optim.swa_utils.update_bn), as training would.
        calibration = [(_tiles(8, TILE, seed0=1000).float() / 255).to(DEVICE)]
        clf, seg = clf.to(DEVICE), seg.to(DEVICE)
        update_bn(calibration, clf)
        update_bn(calibration, seg)
        tissue = TissueSegmenter(clf, seg)
        for name, module in (("classifier", clf), ("segmenter", seg), ("tissue", tissue)):
            _NETS[(name, width)] = module.eval()
    return _NETS[key]


class _LowRes(torch.nn.Module):
    """The segmenter's inference path (logits at 1/4 resolution) as a plain forward."""

    def __init__(self, seg: torch.nn.Module) -> None:
        super().__init__()
        self.seg = seg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg.forward_low_res(x)


def _module(net: str, width: float) -> torch.nn.Module:
    m = _network(net, width)
    return _LowRes(m).eval() if net == "segmenter" else m


def _prepare(net: str, width: float, batch: int, mode: str, precision: str):
    """(callable, input) for one variant; the whole module takes uint8 tiles, a single network
    scaled float (in the weights' dtype)."""
    cast = torch.bfloat16 if precision == "bfloat16" else torch.float32
    module = copy.deepcopy(_module(net, width)).to(cast).to(memory_format=torch.channels_last).eval()
    tiles = _tiles(batch).to(DEVICE)
    x = tiles if net == "tissue" else tiles.to(cast) / 255
    x = x.contiguous(memory_format=torch.channels_last)
    if mode in ("scripted", "frozen"):
        module = script_module(module)
        if mode == "frozen":
            # NB: freeze only (constants inlined, BatchNorm folded into the convolutions).
            # optimize_for_inference on top rewrote the convolutions into prepacked oneDNN
            # ops that autocast never sees (its "bfloat16-autocast" ran float32) and was no
            # faster than plain scripting here
            module = torch.jit.freeze(module)
    elif mode == "compiled":
        module = torch.compile(module, fullgraph=True)
    if precision in AUTOCAST:
        def call(inp, _m=module, _dtype=AUTOCAST[precision]):
            with torch.autocast(DEVICE.type, dtype=_dtype):
                return _m(inp)
    else:
        call = module
    return _synced(call), x


def _synced(fn):
    """fn, then a device synchronisation when timing CUDA work (its kernels run asynchronously)."""
    if not CUDA:
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize(DEVICE)
        return out

    return run


_EXPECTED: dict = {}


def _expected(net: str, width: float, batch: int) -> torch.Tensor:
    """Eager float32 output of the variant's network on the benchmark tiles (on DEVICE), cached."""
    key = (net, width, batch)
    if key not in _EXPECTED:
        tiles = _tiles(batch).to(DEVICE)
        with torch.inference_mode():
            _EXPECTED[key] = _first(_module(net, width)(tiles if net == "tissue" else tiles.float() / 255))
    return _EXPECTED[key]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _variants():
    out = []
    for tag, (width, batch) in WIDTHS.items():
        for net in ("classifier", "segmenter", "tissue"):
            for mode in MODES:
                for precision in PRECISIONS:
                    marks = []
                    if tag == "reference" and not REFERENCE:
                        marks.append(pytest.mark.skip(reason="reference widths are opt-in: WSSS_BENCH_REFERENCE=1"))
                    elif mode == "compiled" and not COMPILE:
                        marks.append(pytest.mark.skip(reason="torch.compile variants are opt-in: WSSS_BENCH_COMPILE=1"))
                    elif mode == "compiled" and precision in AUTOCAST:
                        continue  # inductor under autocast adds nothing over the cast variant here
                    out.append(pytest.param(net, tag, mode, precision, id=f"{tag}-{net}-{mode}-{precision}",
                                            marks=marks))
    return out


@pytest.mark.parametrize("net,tag,mode,precision", _variants())
def test_models_throughput(benchmark, net, tag, mode, precision):
    width, batch = WIDTHS[tag]
    if benchmark.disabled:  # CI proves every variant runs and checks out: batch 2, no warm-up
        batch = min(batch, 2)
    benchmark.group = f"models-{net}-{tag}-b{batch}"
    module, x = _prepare(net, width, batch, mode, precision)
    expected = _expected(net, width, batch)
    with torch.inference_mode():
        if not benchmark.disabled:
            _first(module(x))  # warm-up: TorchScript profiling runs, compilation
            _first(module(x))
        heavy = tag == "reference" or precision != "float32"
        if heavy:  # seconds per call: a few rounds are enough for a stable median
            out = _first(benchmark.pedantic(module, (x,), rounds=3, iterations=1))
        else:
            out = _first(benchmark(module, x))
    benchmark.extra_info.update(
        impl=f"{mode} {precision}", net=net, width=width, mode=mode, precision=precision, batch=batch, tile=TILE,
        threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_bf16_kernels=cpu_reduced_precision_supported(torch.bfloat16), device=str(DEVICE),
    )
    if CUDA:
        benchmark.extra_info.update(gpu=torch.cuda.get_device_name(DEVICE), cudnn_tf32=torch.backends.cudnn.allow_tf32)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["tiles_per_s"] = batch / stats.stats.median
    # the result check: same shape as eager float32; float32 variants agree with it
    assert out.shape == expected.shape
    if net == "tissue":
        agreement = (out == expected).float().mean().item()
        benchmark.extra_info["label_agreement_vs_eager_fp32"] = agreement
        # NB: random weights have tiny logit margins: reduced-precision labels of these networks
        # only have to beat chance (1/K) by far; test_precision_agreement measures a trained model
        # (on CUDA TF32 float32 flips 6% of these near-tie labels between layouts: the random-weight
        # margins are that small)
        assert agreement >= ((0.9 if CUDA else 0.999) if precision == "float32" else 0.5)
    elif precision == "float32":
        # NB: channels_last and frozen (folded BatchNorm) reorder the arithmetic: compare
        # relative to the output's scale
        # (folding drifted up to 1.4e-3 of the output scale through the reference-width DeepLab)
        scale = expected.abs().max().item()
        if CUDA:
            # NB: on CUDA float32 convolutions run in TF32 (cuDNN's default, what a bundle gets),
            # ~1e-3 relative error per layer, with other algorithms per layout and mode: through
            # 100+ random-weight layers a few elements in 1e5 drift by up to ~2% of the scale
            close = ((out.float() - expected).abs() <= 2e-2 * scale).float().mean().item()
            benchmark.extra_info["share_within_2pct_of_scale"] = close
            assert close >= 0.999
        else:
            torch.testing.assert_close(out.float(), expected, rtol=1e-3, atol=(5e-3 if mode == "frozen" else 1e-3) * scale)
        benchmark.extra_info["max_abs_diff_vs_eager_fp32"] = (out.float() - expected).abs().max().item()


# --------------------------------------------------------------------------------------
# Precision agreement on the trained demo bundle
# --------------------------------------------------------------------------------------
AGREEMENT_TILES = 16


def _demo_bundle():
    from wsss.bundle import load_bundle
    from wsss.cli.infer import demo_bundle_path

    return load_bundle(demo_bundle_path())


def _tiles_and_truth(n: int, size: int, seed0: int):
    from wsss.synthetic import render_tissue

    pairs = [render_tissue(size, size, seed=seed0 + s) for s in range(n)]
    tiles = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    return tiles, torch.from_numpy(np.stack([p[1] for p in pairs]))


@pytest.mark.parametrize("precision", ["bfloat16", "bfloat16-autocast", "float16"] + (["float16-autocast"] if CUDA else []))
def test_precision_agreement(benchmark, precision):
    """Pixel-label agreement of a reduced-precision mode vs float32: the trained demo bundle
    (synthetic-only), 16 synthetic tissue tiles at its tile size.  Also records the accuracy of
    both against the generator's truth (tissue pixels), and the agreement on pixels where the
    float32 decision is not a near-tie (top-2 gated probability margin > 0.05)."""
    benchmark.group = "precision-agreement"
    bundle = _demo_bundle()
    tile = int(bundle.metadata["tile_size"])
    tiles, truth = _tiles_and_truth(AGREEMENT_TILES, tile, seed0=100)
    reference = bundle.module if not CUDA else torch.jit.load(bundle.path, map_location=DEVICE).eval()
    tiles = tiles.to(DEVICE)
    if precision in AUTOCAST:
        module = reference
        ctx = lambda: torch.autocast(DEVICE.type, dtype=AUTOCAST[precision])  # noqa: E731
    else:
        # NB: a fresh copy from the file (deepcopy of a ScriptModule touches .grad attributes)
        module = torch.jit.load(bundle.path, map_location=DEVICE).eval().to(
            {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision])
        ctx = contextlib.nullcontext
    with torch.inference_mode():
        ref_labels, ref_scores, ref_prob = reference(tiles, True)

        def run():
            with ctx():
                return module(tiles)

        labels, _, prob = benchmark.pedantic(run, rounds=1, iterations=1)
    labels, prob, ref_labels, ref_scores, ref_prob = (t.cpu() for t in (labels, prob, ref_labels, ref_scores, ref_prob))
    agree = labels == ref_labels
    top2 = ref_scores.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05
    tissue = truth < bundle.num_classes
    acc_fp32 = (ref_labels == truth)[tissue].float().mean().item()
    acc_reduced = (labels == truth)[tissue].float().mean().item()
    agreement = agree.float().mean().item()
    benchmark.extra_info.update(impl=precision, precision=precision, tiles=AGREEMENT_TILES, tile=tile,
                                label_agreement=agreement, agreement_clear_pixels=agree[clear].float().mean().item(),
                                clear_pixel_share=clear.float().mean().item(),
                                accuracy_float32=acc_fp32, accuracy_reduced=acc_reduced,
                                bundle_sha256=bundle.sha256,
                                class_prob_max_diff=(prob.float() - ref_prob).abs().max().item(),
                                cpu_capability=torch.backends.cpu.get_cpu_capability(), device=str(DEVICE))
    print(f"\n{DEVICE.type} precision {precision}: label agreement vs float32 {agreement:.5f} (demo bundle, {AGREEMENT_TILES} "
          f"tiles of {tile} px); on non-near-tie pixels ({clear.float().mean().item():.1%}) "
          f"{agree[clear].float().mean().item():.5f}; tissue accuracy vs truth {acc_fp32:.4f} (float32) / "
          f"{acc_reduced:.4f} ({precision})")
    assert agreement >= 0.95

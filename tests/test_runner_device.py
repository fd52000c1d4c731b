"""The runner's one-batch-behind model loop, the bundle predictor's submit/precision modes, and
(on a machine with a GPU) the overlapped CUDA path: pinned staging, streams, autocast."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsss.bundle import BundlePredictor, CudaGraphs, PendingPrediction, load_bundle
from wsss.errors import BundleError
from wsss.runner import SlideModel, run_slide

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices

# NB: the shipped demo bundle is part of the package (tracked, installed): never skipped for
# lacking it, the tests fail instead
from wsss.cli.infer import demo_bundle_path  # noqa: E402

DEMO_BUNDLE = demo_bundle_path()
def needs_demo(test):  # (a label of the tests that use it; nothing skipped)
    return test
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")

from runner_kit import (FakeCudaApi, FakeTorch, colour_slide, dies_at, model, opts, red_class, soft_colour,  # noqa: E402
                        write_pyramid)



class Interrupt(Exception):
    pass


class DeferredModel:
    """A model whose work happens in ``result()``, as on a GPU: ``submit`` keeps a copy of the
    tiles (the runner refills its batch buffer) and logs the order of submits and results."""

    def __init__(self, fn, fail_result_at=None):
        self.fn, self.fail_result_at = fn, fail_result_at
        self.log: list = []

    def submit(self, tiles):
        number = sum(1 for e in self.log if e[0] == "submit") + 1
        self.log.append(("submit", number, tiles.shape[0]))
        copy = tiles.clone()

        class Handle:
            def result(handle):
                self.log.append(("result", number, copy.shape[0]))
                if number == self.fail_result_at:
                    raise Interrupt(f"device fault in batch {number}")
                return self.fn(copy)

        return Handle()


def deferred(fn, **kw):
    m = model(fn)
    d = DeferredModel(fn, **kw)
    return dataclasses.replace(m, submit=d.submit), d


def outputs_equal(a: Path, b: Path, names=("labels.tiff", "areas.json", "polygons.geojson", "overlay.png")):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def nothing_left(out: Path):
    assert not (out / "run.json").exists() and not (out / "labels.tiff").exists()
    assert not list(out.glob(".*")), "temporary files left behind"


# --------------------------------------------------------------------------------------
# the one-batch-behind loop (CPU)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("predict", [red_class, soft_colour])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_deferred_results_equal_immediate_ones(tmp_path, predict, batch_size):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(101, 77, block=7)])
    o = opts(overlap=8, batch_size=batch_size, write_probs=True)
    run_slide(path, model(predict), tmp_path / "now", o)
    m, d = deferred(predict)
    r = run_slide(path, m, tmp_path / "later", o)
    outputs_equal(tmp_path / "now", tmp_path / "later", ("labels.tiff", "probs.tiff", "areas.json", "polygons.geojson"))
    # one behind: batch i's result is taken after batch i+1 was submitted; the last one is not lost
    submits = [e for e in d.log if e[0] == "submit"]
    n = len(submits)
    expected = [("submit", 1)] + [x for i in range(2, n + 1) for x in (("submit", i), ("result", i - 1))] + [("result", n)]
    assert [e[:2] for e in d.log] == expected
    tiles_run = 4 * 3  # 101x77 with tile 32 / overlap 8: 4 rows x 3 columns
    assert sum(e[2] for e in d.log if e[0] == "result") == tiles_run
    assert n == -(-tiles_run // batch_size) and submits[-1][2] == tiles_run - (n - 1) * batch_size
    assert r.status == "done"


def test_one_tile_one_batch(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(30, 20)])
    run_slide(path, model(), tmp_path / "now", opts())
    m, d = deferred(red_class)
    run_slide(path, m, tmp_path / "later", opts())
    assert [e[:2] for e in d.log] == [("submit", 1), ("result", 1)]
    outputs_equal(tmp_path / "now", tmp_path / "later")


def test_error_at_submit_names_the_batch(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(150, 140, block=9)])
    with pytest.raises(Interrupt, match="killed") as info:
        run_slide(path, model(dies_at(3, Interrupt("killed"))), tmp_path / "out", opts(overlap=8))
    assert any("the model failed on batch 3 (3 tiles" in note for note in info.value.__notes__)
    nothing_left(tmp_path / "out")


def test_error_at_result_names_its_batch_not_the_next(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(150, 140, block=9)])
    m, d = deferred(red_class, fail_result_at=2)
    with pytest.raises(Interrupt, match="device fault in batch 2") as info:
        run_slide(path, m, tmp_path / "out", opts(overlap=8))
    assert [e[:2] for e in d.log][-1] == ("result", 2) and ("submit", 3) in [e[:2] for e in d.log]
    notes = info.value.__notes__
    assert len(notes) == 1 and "failed on batch 2 " in notes[0]
    nothing_left(tmp_path / "out")


def test_wrong_shape_from_a_deferred_model(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(40, 40)])
    m, _ = deferred(lambda x: torch.zeros(x.shape[0], 4, 16, 16))
    with pytest.raises(BundleError, match=r"expected \[\d+, K, 32, 32\]"):
        run_slide(path, m, tmp_path / "out", opts())
    nothing_left(tmp_path / "out")


# --------------------------------------------------------------------------------------
# the finalising thread (stitch_threads=2: default on CUDA, any device here)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("predict", [red_class, soft_colour])
def test_finalise_thread_gives_identical_outputs(tmp_path, predict):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(173, 151, block=7)])
    base = dict(overlap=8, write_probs=True)
    one = run_slide(path, model(predict), tmp_path / "one", opts(stitch_threads=1, **base))
    two = run_slide(path, model(predict), tmp_path / "two", opts(stitch_threads=2, **base))
    assert one.status == two.status == "done"
    outputs_equal(tmp_path / "one", tmp_path / "two", ("labels.tiff", "probs.tiff", "areas.json", "areas.csv",
                                                      "polygons.geojson", "overlay.png"))
    assert "stitch (finalise thread)" in two.timings and "stitch (finalise thread)" not in one.timings
    # not part of the resume fingerprint: the outputs are the same
    again = run_slide(path, model(predict), tmp_path / "one", opts(stitch_threads=2, resume=True, **base))
    assert again.status == "skipped"


def test_finalise_thread_error_fails_the_run_and_leaves_nothing(tmp_path, monkeypatch):
    import wsss.runner.pipeline as pipeline

    make = pipeline._make_finalize

    def failing_make(*args, **kw):
        finalize, calls = make(*args, **kw), []

        def fin(x, y, probs):
            calls.append(1)
            if len(calls) == 5:
                raise Interrupt("finaliser broke")
            return finalize(x, y, probs)

        return fin

    monkeypatch.setattr(pipeline, "_make_finalize", failing_make)
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(200, 180, block=9)])
    with pytest.raises(Interrupt, match="finaliser broke"):
        run_slide(path, model(red_class), tmp_path / "out", opts(overlap=8, batch_size=1, stitch_threads=2))
    nothing_left(tmp_path / "out")


def test_predict_async_owns_a_copy_of_a_reused_output_buffer():
    """A plain callable that hands back the same buffer each call: the deferred result of batch i
    must not change when batch i+1 runs."""
    buf = np.zeros((2, 4, 32, 32), np.float32)

    def reusing(x):
        buf[:] = x[:, :1].float().numpy()
        return buf

    m = model(reusing)
    first = m.predict_async(torch.full((2, 3, 32, 32), 7, dtype=torch.uint8))
    m.predict_async(torch.full((2, 3, 32, 32), 9, dtype=torch.uint8))
    assert (first.result() == 7).all()


# --------------------------------------------------------------------------------------
# the bundle predictor on the CPU: submit, precision modes
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO_BUNDLE)


@pytest.fixture(scope="module")
def tissue_tiles():
    from wsss.synthetic import render_tissue

    return torch.from_numpy(np.stack([render_tissue(96, 96, seed=s)[0] for s in range(4)])).permute(0, 3, 1, 2)


@needs_demo
def test_submit_on_cpu_is_ready_and_equals_call(demo, tissue_tiles):
    predict = demo.predictor("cpu", "float32")
    assert isinstance(predict, BundlePredictor) and predict.precision_mode == "cast"
    want = predict(tissue_tiles, True)
    pending = predict.submit(tissue_tiles, True)
    assert isinstance(pending, PendingPrediction) and pending.ready()
    for a, b in zip(pending.result(), want):
        assert torch.equal(a, b)
    labels, scores, class_prob = predict.submit(tissue_tiles, True, outputs=("scores",)).result()
    assert labels is None and class_prob is None and torch.equal(scores, want[1])
    with pytest.raises(BundleError, match="outputs include 'scores' but with_scores is False"):
        predict.submit(tissue_tiles, False, outputs=("scores",))
    with pytest.raises(BundleError, match=r"outputs must be among .*got \['logits'\]"):
        predict.submit(tissue_tiles, True, outputs=("logits",))


@needs_demo
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["cast", "autocast"])
def test_reduced_precision_modes_on_cpu(demo, tissue_tiles, precision, mode):
    ref_labels, ref_scores, ref_prob = demo.predictor("cpu", "float32")(tissue_tiles, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "slower than float32" on CPUs without bf16/fp16 units
        predict = demo.predictor("cpu", precision, precision_mode=mode)
        private = demo.predictor("cpu", precision, precision_mode=mode, channels_last=False)
    assert private.module is not demo.module  # never the bundle's own module (nor its optimised graphs)
    weight_dtype = next(predict.module.parameters()).dtype
    assert weight_dtype == (torch.float32 if mode == "autocast" else getattr(torch, precision))
    labels, scores, class_prob = predict(tissue_tiles, True)
    assert labels.dtype == torch.uint8 and labels.shape == ref_labels.shape
    # NB: the gate and argmax run in float32 in both modes
    assert scores.dtype == torch.float32 and scores.shape == ref_scores.shape
    assert class_prob.dtype == torch.float32 and class_prob.shape == ref_prob.shape
    assert torch.equal((class_prob > 0.1), (ref_prob > 0.1))
    agreement = (labels == ref_labels).float().mean().item()
    # measured on these tiles (demo model, small logit margins): bf16 0.96-0.97, fp16 0.995
    assert agreement >= (0.93 if precision == "bfloat16" else 0.98), agreement


@needs_demo
def test_precision_mode_errors_and_identity(demo):
    with pytest.raises(BundleError, match=r"precision_mode must be one of \['cast', 'autocast'\] or None, got 'amp'"):
        demo.predictor("cpu", "float32", precision_mode="amp")
    with pytest.raises(BundleError, match="device must be cpu, cuda or cuda:N, got 'meta'"):
        demo.predictor("meta")
    assert SlideModel.from_bundle(demo, precision="float32").identity == f"{demo.sha256}:float32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = SlideModel.from_bundle(demo, precision="bfloat16", precision_mode="autocast")
        c = SlideModel.from_bundle(demo, precision="bfloat16", precision_mode="cast")
    assert a.identity != c.identity and a.description["precision_mode"] == "autocast"


@pytest.mark.parametrize("alias,name", [("fp32", "float32"), ("BF16", "bfloat16"), ("fp16", "float16"),
                                        ("half", "float16")])
def test_precision_aliases_the_help_names(alias, name):
    from wsss.runner.model import resolve_precision

    assert resolve_precision(alias, "cpu") == name  # (wsss-infer --help offers each of them)


def demo_slide(path: Path, size=200) -> Path:
    from wsss.synthetic import render_tissue

    write_pyramid(path, [render_tissue(size, size, seed=3)[0]], mpp=1.0, tile=64)
    return path


@needs_demo
def test_demo_bundle_submit_path_equals_synchronous_path(tmp_path, demo):
    path = demo_slide(tmp_path / "s.tif")
    m = SlideModel.from_bundle(demo, device="cpu", precision="float32")
    assert m.submit is not None
    o = opts(batch_size=4, write_probs=True, output_tile=64)  # 3x3 tiles of 96: batches 4, 4, 1
    run_slide(path, m, tmp_path / "async", o)
    run_slide(path, dataclasses.replace(m, submit=None), tmp_path / "sync", o)
    outputs_equal(tmp_path / "async", tmp_path / "sync", ("labels.tiff", "probs.tiff", "areas.json", "polygons.geojson"))
    # and the runner's predict is the predictor's synchronous call
    tiles = torch.from_numpy(tifffile.imread(path)[:96, :96].copy()).permute(2, 0, 1)[None]
    assert np.array_equal(m.predict_async(tiles).result(), m.predict(tiles).numpy())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_cuda_requested_without_gpu_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from wsss.cli.infer import main

    monkeypatch.delenv("WSSS_BUNDLE", raising=False)
    path = demo_slide(tmp_path / "s.tif", 100)
    assert main([str(path), "--model", str(DEMO_BUNDLE), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: CUDA is not available on this machine" in err, err
    assert not (tmp_path / "o" / "s").exists()


def test_cuda_overlap_logic_with_fake_streams(monkeypatch):
    """The staging ring, stream waits and events of the CUDA path, run on the CPU with fakes."""
    import wsss.bundle as wb

    cuda = FakeCudaApi()
    fake = FakeTorch(cuda)
    monkeypatch.setattr(wb, "torch", fake)

    def record_stream(tensor, stream):
        # NB: record_stream's schema writes its tensor: an inference tensor only inside inference mode
        assert not tensor.is_inference() or torch.is_inference_mode_enabled()
        cuda.log.append(("record_stream", stream.name))

    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream, raising=False)
    calls = []

    class Predictor:  # what _CudaOverlap needs of a BundlePredictor
        def _run(self, x, with_scores):
            calls.append(x.clone())
            n = x.shape[0]
            scores = x.float().mean(1, keepdim=True).expand(n, 2, *x.shape[2:]) / 255  # non-contiguous
            return x[:, 0].clone(), scores, torch.ones(n, 2)

    overlap = wb._CudaOverlap(torch.device("cpu"), ring_size=2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
               for n in (3, 3, 3, 1, 5)]
    pending, logs = [], []
    for b in batches:
        cuda.log = []
        logs.append(cuda.log)
        pending.append(overlap.submit(Predictor(), b, True, ("labels", "scores")))
        kinds = [e[0] for e in cuda.log]
        # upload recorded on the upload stream, compute waits for it, input kept for compute,
        # download waits for compute, outputs kept for the download stream, done recorded there
        up, down = overlap.upload.name, overlap.download.name
        assert kinds.index("record") < kinds.index("wait") and cuda.log[kinds.index("record")][2] == up
        assert ("wait", "compute", up) in cuda.log and ("record_stream", "compute") in cuda.log
        assert ("wait", down, "compute") in cuda.log and cuda.log.count(("record_stream", down)) == 2
        assert cuda.log[-1][0] == "record" and cuda.log[-1][2] == down and pending[-1]._done.blocking
    # the ring: 2 buffers of the first batch's size, reused in turn, each after waiting for the
    # event of its previous upload; the batch of 1 in a slice; the batch of 5 in a new ring,
    # after waiting for both old buffers' uploads
    uploaded = [next(e[1] for e in log if e[0] == "record") for log in logs]
    synced = [[e[1] for e in log if e[0] == "sync"] for log in logs]
    assert synced[2] == [uploaded[0]] and synced[3] == [uploaded[1]]
    assert synced[4][:2] == [uploaded[2], uploaded[3]]
    host_buffers = [t for t in fake.pinned if t.dim() == 4 and t.shape[-1] == 3]  # NHWC staging, not outputs
    assert [tuple(t.shape) for t in host_buffers] == [(3, 8, 8, 3)] * 2 + [(5, 8, 8, 3)] * 2
    for b, x, p in zip(batches, calls, pending):
        assert torch.equal(x, b) and x.is_contiguous(memory_format=torch.channels_last)
        labels, scores, class_prob = p.result()
        assert class_prob is None and torch.equal(labels, b[:, 0])
        assert scores.is_contiguous() and torch.equal(scores, b.float().mean(1, keepdim=True).expand_as(scores) / 255)
        assert all(t is not None and any(t is q for q in fake.pinned) for t in (labels, scores))


def test_on_device_uploads_like_submit_and_downloads_nothing(monkeypatch):
    """BundlePredictor.on_device (the runner's device blending) with the CUDA calls faked: the
    tiles go through the staging ring and the upload stream, the model runs on the compute
    stream, and its outputs come back as they are: no download, no host copy, no wait."""
    import wsss.bundle as wb

    cuda = FakeCudaApi()
    fake = FakeTorch(cuda)
    monkeypatch.setattr(wb, "torch", fake)
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, s: cuda.log.append(("record_stream", s.name)), raising=False)
    seen = []

    def module(x, with_scores):
        seen.append(x.clone())
        return x[:, 0].clone(), x.float() / 255, torch.ones(x.shape[0], 3)

    pred = BundlePredictor(module, torch.device("cuda"), "float32", "cast", channels_last=True)
    g = torch.Generator().manual_seed(1)
    b = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    labels, scores, _ = pred.on_device(b, True)
    up = pred._cuda.upload.name
    assert ("wait", "compute", up) in cuda.log and ("record_stream", "compute") in cuda.log
    assert [e for e in cuda.log if e[0] == "record"][0][2] == up
    assert not any(e[0] == "wait" and e[1] == pred._cuda.download.name for e in cuda.log)
    # nothing waited for (the ring's first use "waits" for its buffer's never-recorded event)
    recorded_before = set()
    for e in cuda.log:
        assert e[0] != "sync" or e[1] not in recorded_before, e
        if e[0] == "record":
            recorded_before.add(e[1])
    assert torch.equal(seen[0], b) and torch.equal(labels, b[:, 0]) and torch.equal(scores, b.float() / 255)
    # the staging ring only: no pinned output buffers
    assert len(fake.pinned) == pred.PINNED_RING and all(t.shape == (2, 8, 8, 3) for t in fake.pinned)


# --------------------------------------------------------------------------------------
# CUDA (run by tools/gpu_check.sh on a GPU machine)
# --------------------------------------------------------------------------------------
@needs_cuda
@needs_demo
def test_cuda_submit_uses_pinned_memory_and_equals_call(tissue_tiles):
    bundle = load_bundle(DEMO_BUNDLE)
    predict = bundle.predictor("cuda", "float32")
    batches = [tissue_tiles.roll(i, dims=0).contiguous() for i in range(5)] + [tissue_tiles[:1]]
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        want = [predict(b, True) for b in batches]
        # more batches in flight than the pinned ring has buffers: a buffer reused early would show
        pending = [predict.submit(b, True) for b in batches]
        got = [p.result() for p in pending]
    ring = predict._cuda._ring
    assert len(ring) == BundlePredictor.PINNED_RING and all(host.is_pinned() for host, _ in ring)
    for p, g, w in zip(pending, got, want):
        assert all(t.is_pinned() and t.device.type == "cpu" for t in p.host_outputs)
        assert torch.equal(g[0], w[0])
        torch.testing.assert_close(g[1], w[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(g[2], w[2], rtol=0, atol=1e-6)
    # tiles already on the GPU skip the staging
    on_gpu = predict.submit(tissue_tiles.cuda(), True).result()
    assert torch.equal(on_gpu[0], want[0][0])


def _distinct_batches(tiles, n):
    return [((tiles.int() + 37 * i) % 256).to(torch.uint8).roll(i, dims=0).contiguous() for i in range(n)]


@needs_cuda
@needs_demo
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cuda_graph_replays_equal_eager_calls(tissue_tiles, precision):
    """Replays give the eager module's outputs, for new inputs each time (the static input is
    refreshed), and an output handed out earlier is never overwritten by a later replay."""
    if precision == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    bundle = load_bundle(DEMO_BUNDLE)
    graphed = bundle.predictor("cuda", precision, cuda_graphs=True)
    eager = bundle.predictor("cuda", precision, cuda_graphs=False)
    assert eager.graphs is None and graphed.graphs is not None
    batches = _distinct_batches(tissue_tiles, 7)
    # NB: every call below under the same deterministic cuDNN settings: a label compared bit for
    # bit must not depend on an algorithm choice
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        want = [eager(b, True) for b in batches]
        on_device = [graphed.on_device(b, True) for b in batches]  # all queued before any is read
        got_sync = [graphed(b, True) for b in batches]
        got_async = [p.result() for p in [graphed.submit(b, True) for b in batches]]
        partial, partial_eager = graphed(batches[0][:1], True), eager(batches[0], True)
        assert graphed.graphs.captured == 1  # the full batch shape; the single tile ran in it, padded
        for w, d, s, a in zip(want, on_device, got_sync, got_async):
            for got in (tuple(t.cpu() for t in d), s, a):
                assert torch.equal(got[0], w[0])
                torch.testing.assert_close(got[1].float(), w[1], rtol=0, atol=1e-6)
                torch.testing.assert_close(got[2].float(), w[2], rtol=0, atol=1e-6)
        # NB: compared with an eager batch of 4 that starts with the same tile (the same kernels)
        assert partial[0].shape[0] == partial[1].shape[0] == partial[2].shape[0] == 1
        assert torch.equal(partial[0], partial_eager[0][:1])
        torch.testing.assert_close(partial[1].float(), partial_eager[1][:1], rtol=0, atol=1e-6)
        # smaller batches run padded in the captured graph: no graph of their own
        for n in (1, 2, 3):
            for _ in range(CudaGraphs.WARMUP + 1):
                got = graphed(batches[1][:n], True)
            assert got[0].shape[0] == n and torch.equal(got[0], eager(batches[1], True)[0][:n])
        assert graphed.graphs.captured == 1
        # at most MAX_GRAPHS shapes hold a graph (and its memory pool); larger ones run eagerly
        for n in (5, 6, 7):
            big = torch.cat([batches[2], batches[3]])[:n]
            for _ in range(CudaGraphs.WARMUP + 1):
                got = graphed(big, True)
            assert torch.equal(got[0], eager(big, True)[0])
        assert graphed.graphs.captured == CudaGraphs.MAX_GRAPHS


def test_a_smaller_batch_runs_padded_in_the_smallest_graph_that_holds_it(monkeypatch):
    """CudaGraphs' replay logic on the CPU: stand-in graphs that compute the outputs of their
    static input, as a replay would."""
    monkeypatch.setattr(CudaGraphs, "_on_cuda", staticmethod(lambda x: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    replays = []

    def graph_of(n, with_scores):
        static_in = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
        static_out = (torch.zeros(n, 4, 4, dtype=torch.uint8), torch.zeros(n if with_scores else 0),
                      torch.zeros(n, 2))

        class Graph:
            def replay(self):
                replays.append(n)
                static_out[0].copy_(static_in[:, 0])
                if with_scores:
                    static_out[1].copy_(static_in.float().mean((1, 2, 3)))
                static_out[2].copy_(static_in[:, :2, 0, 0].float())

        return Graph(), static_in, static_out

    graphs = CudaGraphs(predictor=None)
    for n in (8, 4):
        x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
        graphs._graphs[(tuple(x.shape), tuple(x.stride()), x.dtype, True, x.device)] = graph_of(n, True)
    x = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    labels, scores, class_prob = graphs.run(x, True)
    assert replays == [4]  # the smallest graph that holds 3 tiles
    assert torch.equal(labels, x[:, 0]) and torch.equal(scores, x.float().mean((1, 2, 3)))
    assert torch.equal(class_prob, x[:, :2, 0, 0].float())
    assert graphs.run(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), True) is not None and replays == [4, 4]
    labels, scores, class_prob = graphs.run(x[:1], True)
    assert replays == [4, 4, 4] and torch.equal(labels, x[:1, 0]) and scores.shape == (1,) and class_prob.shape == (1, 2)
    # no graph of 9 tiles, of other tiles' size, or without scores: eager (a capture is counted)
    assert graphs.run(torch.zeros(9, 3, 4, 4, dtype=torch.uint8), True) is None
    assert graphs.run(torch.zeros(2, 3, 5, 5, dtype=torch.uint8), True) is None
    assert graphs.run(x, False) is None and replays == [4, 4, 4]


@needs_demo
def test_a_tiles_outputs_do_not_depend_on_the_other_tiles_of_its_batch(demo, tissue_tiles):
    """What padded replays rely on: the model treats each tile on its own (eval-mode batch norm,
    per-tile attention and gate)."""
    predict = demo.predictor("cpu", "float32")
    other = tissue_tiles.clone()
    other[2:] = 255 - other[2:]
    for a, b in zip(predict(tissue_tiles, True), predict(other, True)):
        assert torch.equal(a[:2], b[:2])


@needs_cuda
@needs_demo
def test_cuda_graph_capture_failure_falls_back_to_eager(tissue_tiles, monkeypatch):
    bundle = load_bundle(DEMO_BUNDLE)
    predict = bundle.predictor("cuda", "float32", cuda_graphs=True)
    want = bundle.predictor("cuda", "float32", cuda_graphs=False)(tissue_tiles, True)

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("capture not supported here")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Broken)
    with pytest.warns(RuntimeWarning, match="capturing a CUDA graph of the model failed.*capture not supported"):
        outs = [predict(tissue_tiles, True) for _ in range(5)]
    assert not predict.graphs.enabled and predict.graphs.captured == 0
    for got in outs:
        assert torch.equal(got[0], want[0])


@needs_cuda
@needs_demo
def test_cuda_graphs_off_by_environment(monkeypatch):
    bundle = load_bundle(DEMO_BUNDLE)
    assert bundle.predictor("cuda", "float32").graphs is not None
    monkeypatch.setenv("WSSS_CUDA_GRAPHS", "0")
    assert bundle.predictor("cuda", "float32").graphs is None


@needs_demo
def test_cpu_predictors_have_no_cuda_graphs():
    bundle = load_bundle(DEMO_BUNDLE)
    assert bundle.predictor("cpu", "float32").graphs is None
    assert bundle.predictor("cpu", "float32", cuda_graphs=True).graphs is None


@needs_cuda
@needs_demo
def test_cuda_runner_async_equals_sync(tmp_path):
    bundle = load_bundle(DEMO_BUNDLE)
    path = demo_slide(tmp_path / "s.tif", 300)
    m = SlideModel.from_bundle(bundle, device="cuda", precision="float32")
    o = opts(batch_size=3, write_probs=True, output_tile=64)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        run_slide(path, m, tmp_path / "async", o)
        run_slide(path, dataclasses.replace(m, submit=None), tmp_path / "sync", o)
    outputs_equal(tmp_path / "async", tmp_path / "sync", ("labels.tiff", "probs.tiff", "areas.json"))


@needs_cuda
@needs_demo
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_cuda_autocast_agrees_with_float32(precision):
    from wsss.synthetic import render_tissue

    if precision == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    tiles = torch.from_numpy(np.stack([render_tissue(96, 96, seed=s)[0] for s in range(8)])).permute(0, 3, 1, 2)
    bundle = load_bundle(DEMO_BUNDLE)
    ref_labels, ref_scores, ref_prob = bundle.predictor("cuda", "float32")(tiles, True)
    predict = bundle.predictor("cuda", precision)
    assert predict.precision_mode == "autocast" and next(predict.module.parameters()).dtype == torch.float32
    labels, scores, class_prob = predict.submit(tiles, True).result()
    assert scores.dtype == torch.float32 and class_prob.dtype == torch.float32 and labels.dtype == torch.uint8
    agreement = (labels == ref_labels).float().mean().item()
    top2 = ref_scores.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05  # pixels whose float32 margin exceeds bf16 rounding
    clear_agreement = (labels == ref_labels)[clear].float().mean().item()
    print(f"\ncuda autocast {precision}: label agreement vs float32 {agreement:.4f}, where margin > 0.05 "
          f"{clear_agreement:.4f}")
    # NB: the demo model's logit margins are small: on the CPU bf16 gives 0.966 overall (0.9995 where
    # the margin > 0.05), fp16 0.995 (1.0)
    assert clear_agreement >= 0.99
    assert agreement >= (0.99 if precision == "float16" else 0.95)


@pytest.mark.parametrize("workers", [0, 2])
def test_model_keeps_the_callers_thread_count(tmp_path, workers):
    """Helper threads take one OpenMP thread each, but the model (main thread) keeps the caller's
    count, in the first run of a process too, and the process default is restored afterwards
    (regression: torch.set_num_threads(1) in a reader thread made the model single-threaded)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from pathlib import Path
        from runner_kit import colour_slide, write_pyramid, model, opts, red_class
        from wsss.runner import run_slide
        torch.set_num_threads(2)
        seen = []
        def predict(x):
            seen.append(torch.get_num_threads())
            return red_class(x)
        d = Path({str(tmp_path)!r})
        write_pyramid(d / "s.tif", [colour_slide(160, 160)])
        run_slide(d / "s.tif", model(predict), d / "out", opts(batch_size=2, workers={workers}), log=lambda s: None)
        import threading
        fresh = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads())); t.start(); t.join()
        print(sorted(set(seen)), torch.get_num_threads(), fresh[0])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-3:] == ["[2]", "2", "2"], r.stdout


def test_runs_shorten_the_gil_switch_interval_and_restore_it(tmp_path):
    """run_slide / run_slides of a CUDA model set pipeline.SWITCH_INTERVAL_S while they run (the
    model sees it) and give the caller's interval back afterwards, also when a slide fails; a
    CPU model's run leaves the interval alone."""
    import sys

    from wsss.runner import pipeline, run_slides

    before = sys.getswitchinterval()
    seen = []

    def predict(x):
        seen.append(sys.getswitchinterval())
        return red_class(x)

    write_pyramid(tmp_path / "s.tif", [colour_slide(96, 96)])
    # (the runner reads the device from the description: this CPU function passes for a CUDA model)
    cuda_model = dataclasses.replace(model(predict), description={"device": "cuda"})
    assert pipeline.SWITCH_INTERVAL_S != before
    run_slide(tmp_path / "s.tif", model(predict), tmp_path / "cpu", opts(batch_size=2), log=lambda s: None)
    assert set(seen) == {before}
    seen.clear()
    run_slide(tmp_path / "s.tif", cuda_model, tmp_path / "a", opts(batch_size=2), log=lambda s: None)
    assert set(seen) == {pipeline.SWITCH_INTERVAL_S} and sys.getswitchinterval() == before
    seen.clear()
    res = run_slides([tmp_path / "s.tif", tmp_path / "missing.tif"], cuda_model, [tmp_path / "b", tmp_path / "c"],
                     opts(batch_size=2), log=lambda s: None)
    assert [r.status for r in res] == ["done", "failed"]
    assert set(seen) == {pipeline.SWITCH_INTERVAL_S} and sys.getswitchinterval() == before


@pytest.mark.parametrize("workers", [0, 3])
def test_read_batches_fill_a_ring_that_never_overwrites_the_batch_handed_out(workers):
    """Readers copy tiles into their batch's slot of a ring of buffers, finishing in any order;
    each batch holds its tiles in raster order, and the batch handed out stays untouched while
    the readers run ahead, until the next one is asked for."""
    import random
    import threading
    import time

    from wsss.runner.pipeline import _StageTimer
    from wsss.runner.reading import read_batches
    from wsss.runner.tiling import TileGrid

    def tile_at(x, y):
        return np.full((16, 16, 3), (x // 8 + 7 * (y // 8)) % 251, np.uint8)

    class View:
        def reopen(self):
            return self

        def close(self):
            pass

        def read(self, x, y, w, h, out):  # (the runner reads into the batch's slot)
            time.sleep(random.random() * 0.002)  # readers finish out of order
            out[...] = tile_at(x, y)
            return out

    random.seed(workers)
    grid = TileGrid(16 * 13 - 40, 16 * 9, 16, 0)
    batches = read_batches(View(), grid, opts(batch_size=3, workers=workers), _StageTimer(), [], lambda: None)
    seen = []
    try:
        for positions, x in batches:
            assert x.shape[1:] == (3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
            copy = x.clone()
            for k, (px, py) in enumerate(positions):
                assert torch.equal(x[k].permute(1, 2, 0), torch.from_numpy(tile_at(px, py)))
            time.sleep(0.02)  # the readers fill the ring meanwhile
            assert torch.equal(x, copy)
            seen.extend(positions)
    finally:
        batches.close()
    assert seen == list(grid.tiles) and not [t for t in threading.enumerate() if t.name.startswith("wsss-read")]


def _peak_reserved_bytes(predict, tiles) -> int:
    """Device memory the caching allocator reserved beyond what it held before ``predict(tiles)``."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    predict(tiles, True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved() - base


@needs_cuda
@needs_demo
@pytest.mark.parametrize("graphs", ["0", "1"])
def test_a_real_cuda_out_of_memory_error_halves_the_batch(tmp_path, monkeypatch, graphs):
    """_BatchHalving against the allocator's own torch.OutOfMemoryError: the process is held to
    less device memory than a full batch needs, found by measuring, not guessed."""
    import gc

    from wsss.synthetic import render_tissue

    monkeypatch.setenv("WSSS_CUDA_GRAPHS", graphs)
    bundle = load_bundle(DEMO_BUNDLE)
    t = int(bundle.metadata["tile_size"])
    probe = bundle.predictor("cuda", "float32")
    tile = torch.from_numpy(render_tissue(t, t, seed=1)[0]).permute(2, 0, 1)
    batch = 32
    while True:  # a batch whose working memory dwarfs the allocator's rounding (20-MB segments)
        full = _peak_reserved_bytes(probe, tile.expand(batch, -1, -1, -1).contiguous())
        quarter = _peak_reserved_bytes(probe, tile.expand(batch // 4, -1, -1, -1).contiguous())
        if full - quarter >= 256 << 20 or batch >= 4096:
            break
        batch *= 2
    assert full - quarter >= 128 << 20, (batch, full, quarter)
    del probe
    stride = t - t // 8
    size = stride * int(np.ceil(np.sqrt(3 * batch))) + t  # ~3 full batches of tiles
    path = tmp_path / "s.tif"
    write_pyramid(path, [render_tissue(size, size, seed=3)[0]], mpp=float(bundle.metadata["mpp"] or 1.0), tile=256)
    o = opts(batch_size=batch, workers=4, stitch_device="cpu", output_tile=256)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        ref = run_slide(path, SlideModel.from_bundle(bundle, device="cuda", precision="float32"), tmp_path / "ref", o,
                        log=lambda s: None)
        assert ref.status == "done"
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        # room for the weights and the runner's staging (held now) plus about half a batch
        allowed = torch.cuda.memory_reserved() + 64 * 2**20 + (quarter + full) // 2
        lines = []
        torch.cuda.set_per_process_memory_fraction(allowed / total)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a graph capture that runs out too
                r = run_slide(path, SlideModel.from_bundle(bundle, device="cuda", precision="float32"),
                              tmp_path / "out", o, log=lines.append)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    print(f"\nreal OOM (graphs {graphs}): batch {batch}, peak {full >> 20} MiB (a quarter batch {quarter >> 20} MiB), "
          f"allowed {allowed >> 20} MiB; " + "; ".join(s for s in lines if "memory" in s))
    assert r.status == "done"
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert 1 <= run["tiles"]["batch_size_run"] < batch
    assert any("ran out of memory" in s for s in lines)
    a = tifffile.imread(tmp_path / "out" / "labels.tiff", key=0)
    b = tifffile.imread(tmp_path / "ref" / "labels.tiff", key=0)
    assert (a == b).mean() > 0.999  # other batch sizes may pick other conv algorithms: last-bit ties only

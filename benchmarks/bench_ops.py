"""Benchmarks of the wsss ops against their eager reference and torch.compile of it.

    pytest benchmarks/bench_ops.py --benchmark-only --benchmark-json=out.json
    python tools/bench_table.py out.json        # the README table (ratios within one run)

Every benchmark records shapes, dtype, threads, the minimum bytes the op must move and the
achieved GB/s in extra_info, and checks its result.  The `memory` group measures this
machine's read and copy bandwidth in the same run, and each op group times `one_read` (a
reduction over the op's inputs) right beside the kernel, so "x times one read" is a ratio
of neighbours even on a machine shared with other work.  With --benchmark-disable (CI) the sizes shrink so the file runs in seconds.
"""
from __future__ import annotations

import os

import pytest
import torch

from wsss import ops, reference

# WSSS_BENCH_DEVICE=cuda runs the same benchmarks on the GPU (tools/gpu_check.sh does).
DEVICE = torch.device(os.environ.get("WSSS_BENCH_DEVICE", "cpu"))


def _synced(fn):
    """fn, followed by a device synchronisation when timing CUDA work."""
    if DEVICE.type != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="module")
def full_size(request) -> bool:
    return not request.config.getoption("benchmark_disable", False)


def _record(benchmark, *, shape: dict, dtype: torch.dtype, min_bytes: int, impl: str) -> None:
    benchmark.extra_info.update(
        impl=impl, device=str(DEVICE), dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(), min_bytes=int(min_bytes),
        **{f"shape_{k}": v for k, v in shape.items()},
    )


def _finish(benchmark, min_bytes: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.min > 0:
        benchmark.extra_info["gb_per_s"] = round(min_bytes / stats.stats.median / 1e9, 2)


_COMPILED = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


# --------------------------------------------------------------------------------------
# Machine bandwidth (same run as the kernels)
# --------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="memory")
@pytest.mark.parametrize("kind", ["read", "copy"])
def test_memory_bandwidth(benchmark, full_size, kind):
    n = (256 if full_size else 4) * 2**20 // 4
    src = torch.rand(n, device=DEVICE)
    dst = torch.empty_like(src)
    if kind == "read":
        fn, min_bytes = (lambda: src.sum()), src.nbytes
    else:
        fn, min_bytes = (lambda: dst.copy_(src)), 2 * src.nbytes
    _record(benchmark, shape=dict(n=n), dtype=src.dtype, min_bytes=min_bytes, impl=kind)
    out = benchmark(_synced(fn))
    if kind == "copy":
        assert torch.equal(out, src)
    _finish(benchmark, min_bytes)


# --------------------------------------------------------------------------------------
# PDA: N=16, C=4096, 28x28, K=4 (the reference training batch at stage 1's feature size)
# --------------------------------------------------------------------------------------
def _pda_inputs(full_size, requires_grad=False):
    n, c, h, w, k = (16, 4096, 28, 28, 4) if full_size else (2, 64, 28, 28, 4)
    g = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(n, c, h, w, generator=g)).to(DEVICE)
    wt = (torch.randn(k, c, generator=g) / c**0.5).to(DEVICE)
    if requires_grad:
        f.requires_grad_()
        wt.requires_grad_()
    return f, wt, dict(N=n, C=c, H=h, W=w, K=k)


def _pda_eager_best(f, w, mu):
    # The best plain-PyTorch form measured here: batched matmul CAMs (not einsum), and the
    # pooled features as a batched matvec instead of materialising A * F.
    a = reference.pda_attention(f, w, mu)  # [N,1,H,W]
    n, c = f.shape[:2]
    return torch.bmm(f.reshape(n, c, -1), a.reshape(n, -1, 1)).squeeze(-1) / a[0].numel()


def _one_read(*tensors):
    """One read of the op's inputs (a reduction over each), timed beside the op in its group."""
    return [t.sum() for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 1024]


PDA_IMPLS = {
    "one_read": lambda f, w, mu: _one_read(f),
    "wsss": ops.pda_pool,
    "eager": reference.pda_pool,
    "eager_best": _pda_eager_best,
    "compiled": "compiled",
}


@pytest.mark.benchmark(group="pda_pool forward")
@pytest.mark.parametrize("impl", list(PDA_IMPLS))
def test_pda_pool_forward(benchmark, full_size, impl):
    f, w, shape = _pda_inputs(full_size)
    fn = _compiled(reference.pda_pool) if impl == "compiled" else PDA_IMPLS[impl]
    min_bytes = f.nbytes
    _record(benchmark, shape=shape, dtype=f.dtype, min_bytes=min_bytes, impl=impl)
    out = benchmark(_synced(fn), f, w, 0.9)
    if impl == "one_read":
        torch.testing.assert_close(out[0], f.sum())
    else:
        torch.testing.assert_close(out, reference.pda_pool(f, w, 0.9), rtol=1e-4, atol=1e-5)
    _finish(benchmark, min_bytes)


@pytest.mark.benchmark(group="pda_pool forward+backward")
@pytest.mark.parametrize("impl", ["wsss", "eager", "compiled"])
def test_pda_pool_forward_backward(benchmark, full_size, impl):
    f, w, shape = _pda_inputs(full_size, requires_grad=True)
    fn = {"wsss": ops.pda_pool, "eager": reference.pda_pool, "compiled": _compiled(reference.pda_pool)}[impl]
    grad = torch.randn(f.shape[0], f.shape[1], generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def step():
        f.grad = None
        w.grad = None
        fn(f, w, 0.9).backward(grad)
        return f.grad, w.grad

    min_bytes = 3 * f.nbytes  # forward read, backward read, grad_features write
    _record(benchmark, shape=shape, dtype=f.dtype, min_bytes=min_bytes, impl=impl)
    gf, gw = benchmark(_synced(step))
    fr, wr = f.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference.pda_pool(fr, wr, 0.9).backward(grad)
    torch.testing.assert_close(gf, fr.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gw, wr.grad, rtol=1e-3, atol=1e-4)
    _finish(benchmark, min_bytes)


# --------------------------------------------------------------------------------------
# Gate + argmax: N=8, K=4, 1024x1024 (a batch of segmentation tiles)
# --------------------------------------------------------------------------------------
def _gate_inputs(full_size):
    n, k, h, w = (8, 4, 1024, 1024) if full_size else (2, 4, 128, 128)
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(n, k, h, w, generator=g).to(DEVICE)
    prob = torch.rand(n, k, generator=g)
    prob[:, 1] = 0.05  # one gated class per sample
    prob = prob.to(DEVICE)
    return scores, prob, dict(N=n, K=k, H=h, W=w)


def _gate_eager_where_argmax(scores, prob, eps):
    allowed = prob > eps
    allowed = allowed | ~allowed.any(1, keepdim=True)
    masked = torch.where(allowed[:, :, None, None], scores, float("-inf"))
    return masked.argmax(1).to(torch.uint8)


def _gate_eager_max_indices(scores, prob, eps):
    # max(dim).indices: the fastest plain form on CPU (argmax(dim=1) takes a slow path).
    allowed = prob > eps
    allowed = allowed | ~allowed.any(1, keepdim=True)
    masked = torch.where(allowed[:, :, None, None], scores, float("-inf"))
    return masked.max(1).indices.to(torch.uint8)


@pytest.mark.benchmark(group="gate_argmax")
@pytest.mark.parametrize("impl", ["one_read", "wsss", "eager_reference", "eager_argmax", "eager_max_indices",
                                  "compiled"])
def test_gate_argmax(benchmark, full_size, impl):
    scores, prob, shape = _gate_inputs(full_size)
    if impl == "one_read":
        min_bytes = scores.nbytes
        _record(benchmark, shape=shape, dtype=scores.dtype, min_bytes=min_bytes, impl=impl)
        out = benchmark(_synced(_one_read), scores)
        torch.testing.assert_close(out[0], scores.sum())
        _finish(benchmark, min_bytes)
        return
    fn = {
        "wsss": ops.gate_argmax,
        "eager_reference": reference.gate_argmax,
        "eager_argmax": _gate_eager_where_argmax,
        "eager_max_indices": _gate_eager_max_indices,
        "compiled": _compiled(_gate_eager_max_indices),
    }[impl]
    # NB: a gated class's plane is never read: the minimum is the allowed planes + uint8 labels.
    allowed = prob > 0.1
    allowed = allowed | ~allowed.any(1, keepdim=True)
    # (one [H, W] plane per allowed (sample, class) pair: scores[0, 0], not scores[:, 0], which
    # is N planes - that slip counted N times the bytes and overstated GB/s N-fold)
    min_bytes = int(scores[0, 0].nbytes * allowed.sum().item()) + scores[:, 0].numel()
    _record(benchmark, shape=shape, dtype=scores.dtype, min_bytes=min_bytes, impl=impl)
    if impl == "eager_reference" and full_size:
        out = benchmark.pedantic(_synced(fn), args=(scores, prob, 0.1), rounds=3, iterations=1)
    else:
        out = benchmark(_synced(fn), scores, prob, 0.1)
    assert torch.equal(out, reference.gate_argmax(scores, prob, 0.1))  # (the spec: not ops', which wsss is)
    _finish(benchmark, min_bytes)


# --------------------------------------------------------------------------------------
# Grad-CAM combination: N=8, K=4, C=1024 (b5_2), 28x28
# --------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="gradcam")
@pytest.mark.parametrize("impl", ["one_read", "wsss", "eager", "compiled"])
def test_gradcam(benchmark, full_size, impl):
    n, k, c, h, w = (8, 4, 1024, 28, 28) if full_size else (2, 4, 64, 28, 28)
    g = torch.Generator().manual_seed(3)
    f = torch.randn(n, c, h, w, generator=g).to(DEVICE)
    grads = torch.randn(n, k, c, h, w, generator=g).to(DEVICE)
    min_bytes = f.nbytes + grads.nbytes + n * k * h * w * 4
    _record(benchmark, shape=dict(N=n, K=k, C=c, H=h, W=w), dtype=f.dtype, min_bytes=min_bytes, impl=impl)
    if impl == "one_read":
        out = benchmark(_synced(_one_read), f, grads)
        torch.testing.assert_close(out[1], grads.sum())
    else:
        fn = {"wsss": ops.gradcam, "eager": reference.gradcam, "compiled": _compiled(reference.gradcam)}[impl]
        out = benchmark(_synced(fn), f, grads)
        torch.testing.assert_close(out, reference.gradcam(f, grads), rtol=1e-4, atol=1e-4)
    _finish(benchmark, min_bytes)

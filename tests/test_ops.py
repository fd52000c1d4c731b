"""The wsss custom ops against their pure-PyTorch specification (wsss/reference.py).

Values are proven by the reference comparison; opcheck proves the registration (fake
kernels, autograd, schema); script/compile/export prove the ops work where users call them.
"""
from __future__ import annotations

import pytest
import torch

import wsss
from wsss import ops, reference
from wsss.bundle import script_module

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def _features(n, c, h, w, k, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(k, c, generator=g, dtype=torch.float64) / c**0.5
    return f.to(device=device, dtype=dtype), wt.to(device=device, dtype=dtype)


PDA_SHAPES = [(1, 1, 1, 1, 1), (2, 8, 5, 7, 4), (3, 33, 9, 4, 3), (4, 64, 28, 28, 4), (2, 130, 3, 17, 10)]


# --------------------------------------------------------------------------------------
# PDA: reference match
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", PDA_SHAPES)
@pytest.mark.parametrize("mu", [1.0, 0.985, 0.65, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pda_matches_reference(device, shape, mu, dtype):
    f, w = _features(*shape, dtype=dtype, device=device)
    torch.testing.assert_close(ops.pda_attention(f, w, mu), reference.pda_attention(f, w, mu), **TOL[dtype])
    torch.testing.assert_close(ops.pda_pool(f, w, mu), reference.pda_pool(f, w, mu), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pda_reduced_precision_matches_float64_reference(dtype):
    # Inputs are rounded to the low precision first; the kernel computes in float32.
    f, w = _features(2, 48, 6, 5, 4, dtype=dtype)
    want_a = reference.pda_attention(f.double(), w.double(), 0.9)
    want_p = reference.pda_pool(f.double(), w.double(), 0.9)
    got_a, got_p = ops.pda_attention(f, w, 0.9), ops.pda_pool(f, w, 0.9)
    assert got_a.dtype == dtype and got_p.dtype == dtype
    torch.testing.assert_close(got_a.double(), want_a, **TOL[dtype])
    torch.testing.assert_close(got_p.double(), want_p, **TOL[dtype])


def test_pda_threshold_drops_peaks_exactly():
    # One channel, identity weight: CAM = ReLU(F).  mu = 0.5 drops everything above half the max.
    f = torch.tensor([[[[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 2.5, 2.0]]]])
    w = torch.ones(1, 1)
    a = ops.pda_attention(f, w, 0.5)
    assert torch.equal(a, torch.tensor([[[[1.0, 2.0, 0.0, 0.0], [0.0, 0.5, 0.0, 2.0]]]]))
    # Two classes: A is their mean.
    w2 = torch.tensor([[1.0], [-1.0]])
    a2 = ops.pda_attention(f, w2, 1.0)
    assert torch.equal(a2, (f.clamp(min=0) + (-f).clamp(min=0)) / 2)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded_weight"])
def test_pda_non_contiguous(layout):
    f, w = _features(3, 24, 7, 9, 4)
    if layout == "channels_last":
        fx, wx = f.to(memory_format=torch.channels_last), w
    elif layout == "sliced":
        big = torch.randn(3, 48, 14, 9)
        fx, wx = big[:, ::2, ::2], torch.randn(24, 4).t()
        f, w = fx.contiguous(), wx.contiguous()
    else:
        fx, wx = f, w[:1].expand(4, 24)
        w = wx.contiguous()
    assert not (fx.is_contiguous() and wx.is_contiguous())
    torch.testing.assert_close(ops.pda_pool(fx, wx, 0.8), reference.pda_pool(f, w, 0.8))
    torch.testing.assert_close(ops.pda_attention(fx, wx, 0.8), reference.pda_attention(f, w, 0.8))


@pytest.mark.parametrize("shape", [(0, 4, 3, 3, 2), (2, 0, 3, 3, 2), (2, 4, 0, 3, 2)])
def test_pda_empty_inputs(shape):
    f, w = _features(*shape)
    torch.testing.assert_close(ops.pda_attention(f, w, 0.9), reference.pda_attention(f, w, 0.9), equal_nan=True)
    torch.testing.assert_close(ops.pda_pool(f, w, 0.9), reference.pda_pool(f, w, 0.9), equal_nan=True)


def test_pda_result_independent_of_thread_count():
    f, w = _features(3, 200, 9, 9, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (ops.pda_pool(f, w, 0.7), ops.pda_attention(f, w, 0.7))
        torch.set_num_threads(max(2, before))
        two = (ops.pda_pool(f, w, 0.7), ops.pda_attention(f, w, 0.7))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# --------------------------------------------------------------------------------------
# PDA: gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["pda_pool", "pda_attention"])
@pytest.mark.parametrize("mu", [1.0, 0.7])
def test_pda_gradcheck(op, mu):
    f, w = _features(2, 6, 4, 3, 3, dtype=torch.float64, seed=1)
    f.requires_grad_()
    w.requires_grad_()
    fn = getattr(ops, op)
    assert torch.autograd.gradcheck(lambda f, w: fn(f, w, mu), (f, w))


@pytest.mark.parametrize("op", ["pda_pool", "pda_attention"])
@pytest.mark.parametrize("shape", PDA_SHAPES[1:])
def test_pda_backward_matches_reference_autograd(op, shape):
    f, w = _features(*shape, dtype=torch.float64, seed=2)
    out_shape = (shape[0], shape[1]) if op == "pda_pool" else (shape[0], 1, shape[2], shape[3])
    grad = torch.randn(out_shape, dtype=torch.float64)
    got = torch.autograd.grad(getattr(ops, op)(f.requires_grad_(), w.requires_grad_(), 0.8), (f, w), grad)
    want = torch.autograd.grad(getattr(reference, op)(f, w, 0.8), (f, w), grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def test_pda_backward_float32_and_bfloat16():
    f, w = _features(2, 40, 6, 6, 4, seed=3)
    grad = torch.randn(2, 40)
    fd, wd = f.double().requires_grad_(), w.double().requires_grad_()
    want = torch.autograd.grad(reference.pda_pool(fd, wd, 0.9), (fd, wd), grad.double())
    for dtype in (torch.float32, torch.bfloat16):
        fx, wx = f.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        got = torch.autograd.grad(ops.pda_pool(fx, wx, 0.9), (fx, wx), grad.to(dtype))
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
        # bf16 rounds the inputs: compare against the reference on the rounded inputs.
        if dtype == torch.bfloat16:
            fd2, wd2 = fx.detach().double().requires_grad_(), wx.detach().double().requires_grad_()
            want2 = torch.autograd.grad(reference.pda_pool(fd2, wd2, 0.9), (fd2, wd2), grad.to(dtype).double())
        else:
            want2 = want
        for g, r in zip(got, want2):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), r, **tol)


def test_pda_pool_gradient_reaches_classifier_weight_through_attention():
    # A is not detached: with mu < 1, the weight gets a gradient even though pda_pool's
    # output does not multiply the weight directly.
    f, w = _features(2, 8, 5, 5, 3, seed=4)
    w.requires_grad_()
    ops.pda_pool(f, w, 0.5).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("op", ["pda_pool", "pda_attention"])
def test_pda_double_backward_matches_reference(op):
    # The fused backward kernels have no derivative: with create_graph=True the gradient is
    # built from PyTorch ops.  (It was silently zero: torch only warned.)
    f, w = _features(2, 8, 5, 6, 3, dtype=torch.float64, seed=5)
    results = []
    for impl in (ops, reference):
        fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
        gf, gw = torch.autograd.grad(getattr(impl, op)(fx, wx, 0.7).pow(2).sum(), (fx, wx), create_graph=True)
        second = torch.autograd.grad(gf.pow(2).sum() + gw.sin().sum(), (fx, wx))
        gf3, = torch.autograd.grad(getattr(impl, op)(fx, wx, 0.7).pow(3).sum(), fx, create_graph=True)
        gg, = torch.autograd.grad(gf3.pow(2).sum(), fx, create_graph=True)
        third = torch.autograd.grad(gg.pow(2).sum(), wx)
        results.append((gf, gw, *second, *third))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    if op == "pda_pool":  # the reviewer's case: d/df |d/df |pda_pool|^2|^2 is not zero
        assert results[0][2].norm() > 0.1


@pytest.mark.parametrize("op", ["pda_pool", "pda_attention"])
@pytest.mark.parametrize("mu", [1.0, 0.7])
def test_pda_gradgradcheck(op, mu):
    f, w = _features(2, 6, 4, 3, 3, dtype=torch.float64, seed=1)
    fn = getattr(ops, op)
    assert torch.autograd.gradgradcheck(lambda f, w: fn(f, w, mu), (f.requires_grad_(), w.requires_grad_()))


def test_pda_first_order_backward_uses_the_fused_kernel(monkeypatch):
    """Only a backward asked for a graph takes the PyTorch-ops path; training (eager and
    compiled) keeps the fused backward kernels."""
    calls = []
    real = ops._pda_grads_differentiable
    monkeypatch.setattr(ops, "_pda_grads_differentiable", lambda *a, **k: calls.append(1) or real(*a, **k))
    f, w = _features(2, 8, 5, 6, 3, seed=6)
    f.requires_grad_()
    w.requires_grad_()

    def loss(f, w):
        return ops.pda_pool(f, w, 0.8).square().sum() + ops.pda_attention(f, w, 0.8).sum()

    loss(f, w).backward()
    torch._dynamo.reset()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(f, w).backward()
    assert calls == []
    torch.autograd.grad(loss(f, w), (f, w), create_graph=True)
    assert len(calls) == 2


@pytest.mark.parametrize("op", ["pda_pool", "pda_attention"])
def test_pda_backward_ops_refuse_to_be_differentiated(op):
    f, w = _features(2, 6, 4, 3, 3, dtype=torch.float64, seed=7)
    f.requires_grad_()
    grad = torch.randn((2, 6) if op == "pda_pool" else (2, 1, 4, 3), dtype=torch.float64)
    gf, _ = getattr(torch.ops.wsss, f"{op}_backward")(grad, f, w, 0.7)
    with pytest.raises(RuntimeError, match=rf"wsss::{op}_backward is not differentiable: differentiate wsss::{op}"):
        gf.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mu", [0.0, 0.7, 1.0])
def test_pda_non_finite_features_match_reference(dtype, value, mu):
    """NaN propagates (wsss.reference.pda_attention): a sample whose CAM has a NaN (a NaN
    feature; inf - inf; 0 * inf with mu = 0) has a NaN threshold and an all-NaN map; the other
    samples are untouched.  The kernel's max used to skip NaN (a plausible map with one zero)."""
    f, w = _features(3, 8, 5, 6, 3, dtype=dtype, seed=8)
    f[1, 2, 1, 3] = value
    for op in ("pda_attention", "pda_pool"):
        got, want = getattr(ops, op)(f, w, mu), getattr(reference, op)(f, w, mu)
        torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all()
        if value != value:
            assert got[1].isnan().all()
        grad = torch.randn_like(want)
        fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
        fr, wr = f.clone().requires_grad_(), w.clone().requires_grad_()
        got_g = torch.autograd.grad(getattr(ops, op)(fx, wx, mu), (fx, wx), grad)
        want_g = torch.autograd.grad(getattr(reference, op)(fr, wr, mu), (fr, wr), grad)
        for g, r in zip(got_g, want_g):
            torch.testing.assert_close(g, r, equal_nan=True, rtol=1e-4, atol=1e-5)
    # the reviewer's case: NaN feature, mu 0.7: the whole sample's map is NaN, not a map with a hole
    if value != value and mu == 0.7:
        assert ops.pda_attention(f, w, mu)[1].isnan().all()


# --------------------------------------------------------------------------------------
# gate_argmax
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 4, 5, 7), (3, 5, 33, 17), (2, 4, 64, 64), (1, 12, 3, 2049)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_gate_argmax_matches_reference(device, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    scores = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    prob = torch.rand(shape[:2], generator=g).to(device=device, dtype=dtype)
    prob[0] = 0.01  # first sample: no class passes -> ungated argmax
    got = ops.gate_argmax(scores, prob, 0.3)
    assert got.dtype == torch.uint8 and got.shape == (shape[0], shape[2], shape[3])
    assert torch.equal(got, reference.gate_argmax(scores, prob, 0.3))


def test_gate_excludes_gated_class_even_where_all_allowed_scores_are_negative():
    # The reference code multiplies logits by 0/1, so a gated class (logit -> 0) wins where
    # all allowed logits are negative.  Here class 0 is gated and must never win.
    scores = torch.tensor([[[[5.0, -1.0]], [[-3.0, -2.0]], [[-4.0, -0.5]]]])  # [1,3,1,2]
    prob = torch.tensor([[0.05, 0.9, 0.8]])
    assert ops.gate_argmax(scores, prob, 0.1).tolist() == [[[1, 2]]]
    buggy = (scores * (prob > 0.1)[:, :, None, None]).argmax(1)
    assert buggy.tolist() == [[[0, 0]]]  # what the reference code would have said


def test_gate_none_pass_keeps_ungated_argmax_and_ties_go_low():
    scores = torch.tensor([[[[1.0, 2.0, 2.0]], [[1.0, 3.0, 2.0]]]])  # [1,2,1,3]
    none = torch.tensor([[0.0, 0.1]])  # eps = 0.1: 0.1 is not > 0.1
    assert ops.gate_argmax(scores, none, 0.1).tolist() == [[[0, 1, 0]]]
    only_first = torch.tensor([[0.5, 0.0]])
    assert ops.gate_argmax(scores, only_first, 0.1).tolist() == [[[0, 0, 0]]]


def test_gate_eps_compares_in_class_prob_dtype():
    # float32(0.1) > 0.1 is False in PyTorch (eps is cast to the tensor's dtype); the op agrees.
    scores = torch.tensor([[[[0.0]], [[1.0]]]])
    prob = torch.tensor([[0.9, 0.1]], dtype=torch.float32)
    assert ops.gate_argmax(scores, prob, 0.1).item() == 0
    assert reference.gate_argmax(scores, prob, 0.1).item() == 0


def test_gate_infinite_scores_and_gated_classes():
    scores = torch.tensor([[[[-float("inf")]], [[-float("inf")]], [[float("inf")]]]])
    prob = torch.tensor([[0.0, 0.9, 0.0]])
    assert ops.gate_argmax(scores, prob, 0.5).item() == 1


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
def test_gate_tissue_mask_and_background_index(mask_dtype):
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 4, 9, 10, generator=g)
    prob = torch.rand(2, 4, generator=g)
    mask = (torch.rand(2, 9, 10, generator=g) > 0.3).to(mask_dtype)
    got = ops.gate_argmax(scores, prob, 0.2, mask, 4)
    assert torch.equal(got, reference.gate_argmax(scores, prob, 0.2, mask, 4))
    assert (got[mask == 0] == 4).all() and (got[mask != 0] < 4).all()


def test_gate_non_contiguous_inputs():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(2, 9, 4, 11, generator=g)
    scores = base.permute(0, 3, 1, 2)[:, ::2]  # [2, 6, 9, 4] strided
    prob = torch.rand(6, 2, generator=g).t()
    assert torch.equal(ops.gate_argmax(scores, prob, 0.4), reference.gate_argmax(scores, prob, 0.4))
    cl = torch.randn(2, 4, 8, 8, generator=g).to(memory_format=torch.channels_last)
    p2 = torch.rand(2, 4, generator=g)
    assert torch.equal(ops.gate_argmax(cl, p2, 0.4), reference.gate_argmax(cl.contiguous(), p2, 0.4))


def test_gate_empty():
    assert ops.gate_argmax(torch.zeros(0, 4, 3, 3), torch.zeros(0, 4), 0.1).shape == (0, 3, 3)
    assert ops.gate_argmax(torch.zeros(2, 4, 0, 3), torch.ones(2, 4), 0.1).shape == (2, 0, 3)


def test_gated_scores_zero_exactly_the_gated_classes():
    probs = torch.rand(2, 3, 4, 4)
    cp = torch.tensor([[0.9, 0.05, 0.5], [0.0, 0.0, 0.0]])
    out = ops.gated_scores(probs, cp, 0.1)
    assert torch.equal(out[0, 1], torch.zeros(4, 4)) and torch.equal(out[0, 0], probs[0, 0])
    assert torch.equal(out[1], probs[1])  # none pass -> ungated
    assert torch.equal(ops.gate_argmax(out, torch.ones(2, 3), 0.0), ops.gate_argmax(probs, cp, 0.1))


# --------------------------------------------------------------------------------------
# gradcam
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 17, 5, 6), (3, 4, 64, 28, 28), (1, 2, 130, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradcam_matches_reference(device, shape, dtype):
    n, k, c, h, w = shape
    g = torch.Generator().manual_seed(7)
    f = torch.randn(n, c, h, w, generator=g).to(device=device, dtype=dtype)
    gr = torch.randn(n, k, c, h, w, generator=g).to(device=device, dtype=dtype)
    torch.testing.assert_close(ops.gradcam(f, gr), reference.gradcam(f, gr), **TOL[dtype])


def test_gradcam_reduced_precision_and_non_contiguous():
    g = torch.Generator().manual_seed(8)
    f = torch.randn(2, 16, 6, 5, generator=g)
    gr = torch.randn(2, 3, 16, 6, 5, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        got = ops.gradcam(f.to(dtype), gr.to(dtype))
        torch.testing.assert_close(got.double(), reference.gradcam(f.to(dtype).double(), gr.to(dtype).double()),
                                   **TOL[dtype])
    fx = f.to(memory_format=torch.channels_last)
    grx = gr.transpose(3, 4).contiguous().transpose(3, 4)
    assert not fx.is_contiguous() and not grx.is_contiguous()
    torch.testing.assert_close(ops.gradcam(fx, grx), reference.gradcam(f, gr))
    assert ops.gradcam(torch.zeros(0, 3, 2, 2), torch.zeros(0, 2, 3, 2, 2)).shape == (0, 2, 2, 2)
    assert torch.equal(ops.gradcam(torch.ones(1, 0, 2, 2), torch.ones(1, 2, 0, 2, 2)), torch.zeros(1, 2, 2, 2))


def test_gradcam_gradcheck():
    g = torch.Generator().manual_seed(9)
    f = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gr = torch.randn(2, 3, 5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.gradcam, (f, gr))


# --------------------------------------------------------------------------------------
# band_accumulate: the runner's device-side blend; bit-identical to the tile-by-tile loop
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("xs,rows,width", [
    ([0, 12, 24, 36], 16, 52),   # overlapping neighbours, the last one ending at the edge
    ([0, 12, 20, 40], 7, 45),    # uneven steps, the last tile clipped at the edge (5 of 16 columns)
    ([30, 3, 3], 16, 46),        # any order, repeats: adds in the order given
    ([5], 0, 21),                # no rows: nothing changes
])
def test_band_accumulate_matches_reference_bit_for_bit(device, dtype, xs, rows, width):
    g = torch.Generator().manual_seed(len(xs) * 100 + rows)
    tiles = torch.rand(len(xs), 5, 16, 16, generator=g, dtype=dtype).to(device)
    acc = torch.rand(5, 16, width, generator=g, dtype=dtype).to(device)
    before, want = acc.clone(), acc.clone()
    reference.band_accumulate(want, tiles, xs, rows)
    ops.band_accumulate(acc, tiles, xs, rows)
    assert torch.equal(acc, want)
    assert torch.equal(acc[:, rows:], before[:, rows:])  # rows below `rows` untouched
    added = sum(float(tiles[i, :, :rows, :width - x].double().sum()) for i, x in enumerate(xs))
    assert float((acc - before).double().sum()) == pytest.approx(added, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_band_accumulate_with_a_window_adds_weighted_tiles_and_the_weights(device):
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(3, 4, 16, 16, generator=g).to(device)
    window = (torch.rand(16, 16, generator=g) + 0.1).to(device)
    acc = torch.rand(5, 16, 40, generator=g).to(device)
    want, ref = acc.clone(), acc.clone()
    weighted = torch.empty(3, 5, 16, 16, device=device)  # what the runner's Python did before
    torch.mul(probs, window, out=weighted[:, :4])
    weighted[:, 4] = window
    ops.band_accumulate(want, weighted, [0, 12, 30], 13)
    ops.band_accumulate(acc, probs, [0, 12, 30], 13, window)
    reference.band_accumulate(ref, probs, [0, 12, 30], 13, window)
    assert torch.equal(acc, want) and torch.equal(ref, want)


def _band(device, k=3, r=8, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch.rand(k + 1, r, w, generator=g) * 2
    acc[:, 1, 3:7] = 0  # pixels no tile covered (weight sum 0)
    acc[k, 2, 5] = 0  # uncovered, with stray class sums: still background
    return acc.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,shift", [(5, 5), (8, 3), (6, 8), (4, 11), (8, 0), (0, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_band_finalize_matches_reference(device, rows, shift, masked):
    k, bg = 3, 7
    values = torch.tensor([0, 1, 2, bg], dtype=torch.uint8, device=device)
    mask = (torch.rand(rows, 20, generator=torch.Generator().manual_seed(rows)) > 0.3).to(device) if masked else None
    results = []
    for impl in (ops, reference):
        acc, counts = _band(device), torch.tensor([5, 0, 0, 1], device=device)
        labels, half = impl.band_finalize(acc, rows, shift, mask, bg, values, counts, True)
        results.append((labels, half, counts, acc))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
    labels, half, counts, acc = results[0]
    before = _band(device)
    assert labels.shape == (rows, 20) and half.shape == (k, rows, 20) and half.dtype == torch.float16
    assert int(counts.sum()) == 6 + rows * 20
    assert bool((labels[~(before[k, :rows] > 0)] == bg).all())
    if masked:
        assert bool((labels[~mask] == bg).all())
    keep = max(8 - shift, 0) if shift else 8
    assert torch.equal(acc[:, :keep], before[:, shift:shift + keep]) and not acc[:, keep:].any()
    # without probabilities: an empty half tensor, the same labels
    acc, counts = _band(device), torch.tensor([5, 0, 0, 1], device=device)
    labels2, empty = ops.band_finalize(acc, rows, shift, mask, bg, values, counts, False)
    assert empty.numel() == 0 and torch.equal(labels2, labels)


BAND_FINALIZE_ERRORS = [
    (lambda d: (torch.zeros(1, 4, 5, device=d), 2, 0, None, 7), r"wsss::band_finalize: acc must be a 3-D tensor "
     r"\[K\+1, R, W\] with K >= 1, got shape \[1, 4, 5\]"),
    (lambda d: (torch.zeros(3, 4, 5, device=d), 5, 0, None, 7), r"wsss::band_finalize: rows must be in \[0, 4\], got 5"),
    (lambda d: (torch.zeros(3, 4, 5, device=d), 2, -1, None, 7), r"wsss::band_finalize: shift must be >= 0, got -1"),
    (lambda d: (torch.zeros(3, 4, 5, device=d), 2, 0, torch.ones(2, 4, dtype=torch.bool, device=d), 7),
     r"wsss::band_finalize: tissue_mask must have shape \[rows, W\] = \[2, 5\], got shape \[2, 4\]"),
    # (these were gate_argmax's messages from the kernel and not checked at all by the fake)
    (lambda d: (torch.zeros(3, 4, 5, device=d), 2, 0, torch.ones(2, 5, device=d), 7),
     r"wsss::band_finalize: tissue_mask must be Bool or Byte, got Float"),
    (lambda d: (torch.zeros(3, 4, 5, device=d), 2, 0, None, 300),
     r"wsss::band_finalize: background_index must be in \[0, 255\], got 300"),
    (lambda d: (torch.zeros(3, 4, 5, device=d), 2, 0, torch.ones(2, 5, dtype=torch.bool, device=d), -1),
     r"wsss::band_finalize: background_index must be in \[0, 255\], got -1"),
    (lambda d: (torch.zeros(301, 2, 3, device=d), 2, 0, None, 7),
     r"wsss::band_finalize: acc must have 1 to 255 classes \(K = acc.size\(0\) - 1\), got 300"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", range(len(BAND_FINALIZE_ERRORS)))
def test_band_finalize_errors(device, case):
    make_args, message = BAND_FINALIZE_ERRORS[case]
    values, counts = torch.tensor([0, 1, 7], dtype=torch.uint8, device=device), torch.zeros(3, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.wsss.band_finalize(*make_args(device), values, counts, False)


def _awkward_band(k: int, r: int, w: int, seed: int = 0) -> torch.Tensor:
    """A band accumulator with what the fused CUDA kernel must get right: uncovered pixels (weight
    0, some with stray sums), ties between classes, NaN weights and NaN class sums (as class 0 and
    later), denormal-small weights (clamp_min's 1e-30)."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.rand(k + 1, r, w, generator=g) * 2
    row = lambda i: i % r  # noqa: E731  (short bands get several of these in one row)
    acc[:, row(1), 3:40] = 0
    acc[k, row(2), 5:9] = 0
    if k > 1:
        acc[1, row(3), :] = acc[0, row(3), :]  # ties: the lowest class wins
        acc[1, row(4), 10:20] = float("nan")  # a later class's NaN never wins
    acc[0, row(4), 20:30] = float("nan")  # class 0's NaN wins (gate_argmax's rule)
    acc[k, row(5), 0:6] = float("nan")  # a NaN weight: not covered -> background, probabilities NaN
    acc[k, row(6), 7:11] = 1e-35  # below clamp_min's 1e-30 (still covered)
    return acc


@pytest.mark.skipif(not CUDA, reason="the fused band_finalize kernel needs a CUDA device")
@pytest.mark.parametrize("k,r,w,rows,shift", [(4, 224, 16384 + 77, 224, 224), (4, 256, 1000, 200, 30), (1, 9, 300, 9, 4),
                                              (255, 3, 70, 3, 0), (3, 8, 20, 0, 2)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "uint8"])
def test_band_finalize_cuda_kernel_equals_the_composite_op(k, r, w, rows, shift, mask_kind):
    """The CUDA build's fused kernel against the CPU composite (the ATen calls it replaced), bit
    for bit: labels, counts (duplicated and absent values included), float16 probabilities (NaN
    where NaN), the shifted accumulator.  Many blocks and a partial last warp (W not a multiple
    of 256), K = 1 and K = 255, rows = 0."""
    bg = 7 if k < 7 else 0
    acc = _awkward_band(k, r, w)
    values = torch.tensor(sorted(set(range(min(k, 254))) | {bg}) + [bg, 250], dtype=torch.uint8)
    mask = None
    if mask_kind is not None:
        m = torch.rand(rows, w, generator=torch.Generator().manual_seed(1)) > 0.2
        mask = m if mask_kind == "bool" else m.to(torch.uint8) * 3  # (any non-zero byte is tissue)
    out = {}
    for device in ("cpu", "cuda"):
        a, counts = acc.clone().to(device), torch.arange(len(values), dtype=torch.long).to(device)
        labels, half = torch.ops.wsss.band_finalize(a, rows, shift, None if mask is None else mask.to(device), bg,
                                                    values.to(device), counts, True)
        out[device] = [t.cpu() for t in (labels, half, counts, a)]
    (l0, h0, c0, a0), (l1, h1, c1, a1) = out["cpu"], out["cuda"]
    assert torch.equal(l0, l1) and torch.equal(c0, c1)
    torch.testing.assert_close(h1, h0, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(a1, a0, rtol=0, atol=0, equal_nan=True)
    assert int((c1 - torch.arange(len(values))).sum()) >= rows * w  # (duplicated values count twice)


@pytest.mark.skipif(not CUDA, reason="the fused band_finalize kernel needs a CUDA device")
def test_band_finalize_cuda_takes_the_aten_route_where_the_kernel_cannot():
    """A non-contiguous accumulator, non-contiguous counts or more than 256 counted values: the
    CUDA op falls back to the composite's ATen calls, with the same results."""
    acc = _awkward_band(3, 6, 50)
    four = torch.tensor([0, 1, 2, 7], dtype=torch.uint8)
    cases = {  # name: (accumulator, values, counts) on a device
        "acc not contiguous": lambda d: (acc.transpose(1, 2).contiguous().to(d).transpose(1, 2), four.to(d),
                                         torch.zeros(4, dtype=torch.long, device=d)),
        "counts strided": lambda d: (acc.clone().to(d), four.to(d), torch.zeros(8, dtype=torch.long, device=d)[::2]),
        "300 values": lambda d: (acc.clone().to(d), torch.arange(300).remainder(8).to(torch.uint8).to(d),
                                 torch.zeros(300, dtype=torch.long, device=d)),
    }
    for name, make in cases.items():
        out = []
        for device in ("cpu", "cuda"):
            a, values, counts = make(device)
            labels, half = torch.ops.wsss.band_finalize(a, 5, 2, None, 7, values, counts, True)
            out.append([t.cpu() for t in (labels, half, counts, a)])
        (l0, h0, c0, a0), (l1, h1, c1, a1) = out
        assert torch.equal(l0, l1) and torch.equal(c0, c1), name
        torch.testing.assert_close(h1, h0, rtol=0, atol=0, equal_nan=True, msg=name)
        torch.testing.assert_close(a1, a0, rtol=0, atol=0, equal_nan=True, msg=name)


def test_band_finalize_accepts_255_classes():
    acc = torch.rand(256, 2, 3)
    values, counts = torch.tensor([0, 254], dtype=torch.uint8), torch.zeros(2, dtype=torch.long)
    for device in ("cpu", "meta"):
        labels, _ = torch.ops.wsss.band_finalize(acc.to(device), 2, 0, None, 255, values.to(device), counts.to(device), False)
        assert labels.shape == (2, 3)


def test_band_finalize_and_inflate_tiles_refuse_a_tensor_on_another_device():
    """A meta tensor among host tensors lands in the fake kernel (Meta wins the dispatch): it
    used to return uninitialised labels (band_finalize) or do nothing (inflate_tiles) silently."""
    acc, values, counts = _band("cpu"), torch.tensor([0, 1, 2, 7], dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    before = acc.clone()
    with pytest.raises(RuntimeError, match=r"wsss::band_finalize: tissue_mask must be on the device of acc \(cpu\), "
                                           r"got meta"):
        ops.band_finalize(acc, 4, 2, torch.ones(4, 20, dtype=torch.bool, device="meta"), 7, values, counts, True)
    assert torch.equal(acc, before) and not counts.any()
    with pytest.raises(RuntimeError, match=r"wsss::band_finalize: tissue_mask must be on the device of acc \(meta\), "
                                           r"got cpu"):
        ops.band_finalize(acc.to("meta"), 4, 2, torch.ones(4, 20, dtype=torch.bool), 7, values.to("meta"),
                          counts.to("meta"), True)
    if CUDA:  # the kernel's own check (a CUDA acc and a host mask reach the CUDA registration)
        with pytest.raises(RuntimeError, match=r"wsss::band_finalize: tissue_mask must be on the device of acc "
                                               r"\(cuda:0\), got cpu"):
            ops.band_finalize(acc.cuda(), 4, 2, torch.ones(4, 20, dtype=torch.bool), 7, values.cuda(), counts.cuda(), True)
    tiles = torch.randint(0, 4, (2, 16, 16), dtype=torch.uint8)
    data, ends = ops.deflate_tiles(tiles, [0])
    out = torch.full((1, 16, 16), 7, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"wsss::inflate_tiles: data must be on the device of out \(cpu\), got meta"):
        ops.inflate_tiles(data.to("meta"), [0], [int(ends[0])], out)
    assert bool((out == 7).all())
    with pytest.raises(RuntimeError, match=r"wsss::inflate_tiles: data must be on the device of out \(meta\), got cpu"):
        ops.inflate_tiles(data, [0], [int(ends[0])], out.to("meta"))
    ops.inflate_tiles(data.to("meta"), [0], [int(ends[0])], out.to("meta"))  # (both meta: fine)


def test_band_accumulate_sums_in_tile_order():
    # 1 + 1e-8 rounds to 1 in float32; so the order of three terms shows in the result
    acc = torch.zeros(1, 1, 2)
    tiles = torch.tensor([1.0, -1.0, 1e-8]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    ops.band_accumulate(acc, tiles, [0, 0, 0], 1)
    assert acc[0, 0, 0].item() == pytest.approx(1e-8)  # (0 + 1 - 1) + 1e-8, not (0 + 1 + 1e-8) - 1


# deflate_tiles: the runner's tile compression, many tiles per call; the contract is the
# inflated content (the reference uses Python's zlib, the op miniz)
@pytest.mark.parametrize("shape,dtype", [((5, 32, 32), torch.uint8), ((3, 4, 16, 16), torch.float16),
                                         ((2, 256, 256), torch.uint8), ((4, 0), torch.uint8)])
def test_deflate_tiles_inflates_to_the_chosen_tiles(shape, dtype):
    import zlib

    g = torch.Generator().manual_seed(shape[0])
    tiles = (torch.rand(shape, generator=g) * 4).to(dtype)
    tiles[0].zero_()  # one all-background tile: a short stream
    index = [shape[0] - 1, 0, shape[0] - 1] + ([1] if shape[0] > 1 else [])
    for impl in (ops, reference):
        data, ends = impl.deflate_tiles(tiles, index)
        assert data.dtype == torch.uint8 and ends.dtype == torch.int64 and ends.shape == (len(index),)
        assert int(ends[-1]) == data.numel() and bool((ends[1:] >= ends[:-1]).all())
        starts = [0] + ends.tolist()[:-1]
        for j, i in enumerate(index):
            raw = zlib.decompress(data[starts[j]:int(ends[j])].numpy().tobytes())
            assert raw == tiles[i].numpy().tobytes()
    data, ends = ops.deflate_tiles(tiles, [])
    assert data.numel() == 0 and ends.numel() == 0


def test_deflate_tiles_compresses_at_the_given_level():
    tiles = (torch.arange(64 * 64) // 7 % 4).to(torch.uint8).reshape(1, 64, 64).repeat(2, 1, 1)
    stored, _ = ops.deflate_tiles(tiles, [0], 0)
    fast, _ = ops.deflate_tiles(tiles, [0], 1)
    assert stored.numel() > 64 * 64 > 5 * fast.numel()  # (level 0: stored blocks, no compression)


def test_majority_downsample_matches_reference_on_every_block():
    import itertools

    blocks = torch.tensor(list(itertools.product(range(4), repeat=4)), dtype=torch.uint8)  # 256 blocks a b c d
    labels = blocks.reshape(-1, 2, 2).permute(1, 0, 2).reshape(2, -1)  # side by side: [2, 2 * 256]
    got = ops.majority_downsample(labels)
    assert torch.equal(got, reference.majority_downsample(labels))
    for (a, b, c, d), g in zip(blocks.tolist(), got[0].tolist()):
        counts = [(a, b, c, d).count(v) for v in (a, b, c, d)]
        assert (a, b, c, d).count(g) == max(counts)
        assert g == a or (a, b, c, d).count(a) < max(counts)  # ties keep the top-left class
    wide = (torch.rand(40, 64, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    assert torch.equal(ops.majority_downsample(wide.t()), reference.majority_downsample(wide.t()))  # non-contiguous


def test_inflate_tiles_is_deflate_tiles_undone():
    g = torch.Generator().manual_seed(3)
    tiles = (torch.rand(4, 2, 16, 16, generator=g) * 3).to(torch.float16)
    data, ends = ops.deflate_tiles(tiles, [3, 1, 1])
    starts = [0] + ends.tolist()[:-1]
    for impl in (ops, reference):
        out = torch.empty(3, 2, 16, 16, dtype=torch.float16)
        impl.inflate_tiles(data, starts, ends.tolist(), out)
        assert torch.equal(out, tiles[[3, 1, 1]])
    ops.inflate_tiles(data, [], [], torch.empty(0, 2, 16, 16, dtype=torch.float16))
    short = torch.empty(1, 2, 16, 8, dtype=torch.float16)  # the stream holds twice as many bytes
    with pytest.raises(RuntimeError, match=r"wsss::inflate_tiles: stream 0 is not a zlib stream of 512 bytes"):
        ops.inflate_tiles(data, starts[:1], ends.tolist()[:1], short)
    with pytest.raises(RuntimeError, match=r"wsss::inflate_tiles: stream 0 is not a zlib stream of 1024 bytes"):
        ops.inflate_tiles(torch.zeros(20, dtype=torch.uint8), [0], [20], out[:1])


# the host-side ops' errors: (op, args(device), message, devices); the kernels' own checks of
# data (contiguity, stream offsets) have no fake-kernel counterpart
HOST_OP_ERRORS = [
    ("inflate_tiles", lambda d: (torch.zeros(4, 2, dtype=torch.uint8, device=d), [0], [1], torch.empty(1, 4, device=d)),
     r"wsss::inflate_tiles: data must be a contiguous 1-D uint8 tensor, got shape \[4, 2\] of Byte", ("cpu", "meta")),
    ("inflate_tiles", lambda d: (torch.zeros(8, dtype=torch.uint8, device=d), [0, 1], [1], torch.empty(2, 4, device=d)),
     r"wsss::inflate_tiles: starts and ends must hold one offset per tile of out \(2\), got 2 and 1", ("cpu", "meta")),
    ("inflate_tiles", lambda d: (torch.zeros(8, dtype=torch.uint8, device=d), [4], [9], torch.empty(1, 4, device=d)),
     r"wsss::inflate_tiles: stream 0 \[4, 9\) is not within data \[0, 8\)", ("cpu",)),
    ("deflate_tiles", lambda d: (torch.zeros((), dtype=torch.uint8, device=d), [0]),
     r"wsss::deflate_tiles: tiles must have a leading tile dimension \[N, ...\], got a 0-d tensor", ("cpu", "meta")),
    ("deflate_tiles", lambda d: (torch.zeros(2, 4, 4, dtype=torch.uint8, device=d), [0, 2]),
     r"wsss::deflate_tiles: every index must be in \[0, 2\), got 2", ("cpu", "meta")),
    ("deflate_tiles", lambda d: (torch.zeros(2, 4, 4, dtype=torch.uint8, device=d), [0], 11),
     r"wsss::deflate_tiles: level must be in \[0, 10\], got 11", ("cpu", "meta")),
    ("majority_downsample", lambda d: (torch.zeros(4, 5, dtype=torch.uint8, device=d),),
     r"wsss::majority_downsample: labels must be a 2-D tensor \[2h, 2w\] \(even sizes\), got shape \[4, 5\]", ("cpu", "meta")),
    ("majority_downsample", lambda d: (torch.zeros(4, 4, device=d),),
     r"wsss::majority_downsample: labels must be uint8 \(Byte\), got Float", ("cpu", "meta")),
    ("deflate_tiles", lambda d: (torch.zeros(2, 4, 4, dtype=torch.uint8, device=d)[:, :, ::2], [0]),
     r"wsss::deflate_tiles: tiles must be contiguous, got a non-contiguous tensor of shape \[2, 4, 2\]", ("cpu",)),
]


@pytest.mark.parametrize("device,case", [(d, i) for i, e in enumerate(HOST_OP_ERRORS) for d in e[3]])
def test_host_op_errors(device, case):
    op, make_args, message, _ = HOST_OP_ERRORS[case]
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.wsss, op)(*make_args(device))


# --------------------------------------------------------------------------------------
# Error messages: the kernels and the fake (meta) kernels say the same words
# --------------------------------------------------------------------------------------
ERRORS = [
    ("pda_pool", lambda d: (torch.zeros(2, 3, 4, device=d), torch.zeros(2, 3, device=d), 0.5),
     r"wsss::pda_pool: features must be a 4-D tensor \[N, C, H, W\], got shape \[2, 3, 4\]"),
    ("pda_pool", lambda d: (torch.zeros(2, 3, 4, 4, device=d), torch.zeros(2, 5, device=d), 0.5),
     r"wsss::pda_pool: weight must have shape \[K, C\] with K >= 1 and C = features.size\(1\) = 3, got shape \[2, 5\]"),
    ("pda_attention", lambda d: (torch.zeros(2, 3, 4, 4, device=d), torch.zeros(2, 3, device=d), 1.5),
     r"wsss::pda_attention: mu must be in \[0, 1\], got 1.5"),
    ("pda_attention", lambda d: (torch.zeros(2, 3, 4, 4, device=d), torch.zeros(2, 3, dtype=torch.float64, device=d), 0.5),
     r"wsss::pda_attention: weight must have the dtype of features \(Float\), got Double"),
    ("pda_pool", lambda d: (torch.zeros(2, 3, 4, 4, dtype=torch.int64, device=d), torch.zeros(2, 3, device=d), 0.5),
     r"wsss::pda_pool: features must be a floating tensor \(Float, Double, BFloat16, Half\), got Long"),
    ("gate_argmax", lambda d: (torch.zeros(2, 4, 3, 3, device=d), torch.zeros(2, 3, device=d), 0.1),
     r"wsss::gate_argmax: class_prob must have shape \[N, K\] = \[2, 4\], got shape \[2, 3\]"),
    ("gate_argmax", lambda d: (torch.zeros(4, 3, 3, device=d), torch.zeros(2, 3, device=d), 0.1),
     r"wsss::gate_argmax: scores must be a 4-D tensor \[N, K, H, W\], got shape \[4, 3, 3\]"),
    ("gate_argmax", lambda d: (torch.zeros(1, 256, 1, 1, device=d), torch.zeros(1, 256, device=d), 0.1),
     r"wsss::gate_argmax: scores must have 1 to 255 classes \(dim 1\), got 256"),
    ("gate_argmax", lambda d: (torch.zeros(2, 4, 3, 3, device=d), torch.zeros(2, 4, device=d), 0.1,
                               torch.ones(2, 3, 4, dtype=torch.bool, device=d)),
     r"wsss::gate_argmax: tissue_mask must have shape \[N, H, W\] = \[2, 3, 3\], got shape \[2, 3, 4\]"),
    ("gate_argmax", lambda d: (torch.zeros(2, 4, 3, 3, device=d), torch.zeros(2, 4, device=d), 0.1,
                               torch.ones(2, 3, 3, dtype=torch.float32, device=d)),
     r"wsss::gate_argmax: tissue_mask must be Bool or Byte, got Float"),
    ("gate_argmax", lambda d: (torch.zeros(2, 4, 3, 3, device=d), torch.zeros(2, 4, device=d), 0.1, None, 300),
     r"wsss::gate_argmax: background_index must be in \[0, 255\], got 300"),
    ("band_accumulate", lambda d: (torch.zeros(5, 4, device=d), torch.zeros(2, 5, 4, 4, device=d), [0, 1], 4),
     r"wsss::band_accumulate: acc must be a 3-D tensor \[C, R, W\], got shape \[5, 4\]"),
    ("band_accumulate", lambda d: (torch.zeros(5, 4, 9, device=d), torch.zeros(2, 4, 4, 4, device=d), [0, 1], 4),
     r"wsss::band_accumulate: tiles must have shape \[N, C, T, T\] with C = acc.size\(0\) = 5, got shape \[2, 4, 4, 4\]"),
    ("band_accumulate", lambda d: (torch.zeros(5, 4, 9, device=d), torch.zeros(2, 5, 4, 4, dtype=torch.float64, device=d), [0, 1], 4),
     r"wsss::band_accumulate: tiles must have the dtype of acc \(Float\), got Double"),
    ("band_accumulate", lambda d: (torch.zeros(5, 4, 9, dtype=torch.int64, device=d), torch.zeros(2, 5, 4, 4, dtype=torch.int64, device=d), [0, 1], 4),
     r"wsss::band_accumulate: acc must be a floating tensor \(Float, Double, BFloat16, Half\), got Long"),
    ("band_accumulate", lambda d: (torch.zeros(5, 4, 9, device=d), torch.zeros(2, 5, 4, 4, device=d), [0], 4),
     r"wsss::band_accumulate: xs must hold one column per tile \(2\), got 1"),
    ("band_accumulate", lambda d: (torch.zeros(5, 3, 9, device=d), torch.zeros(2, 5, 4, 4, device=d), [0, 1], 4),
     r"wsss::band_accumulate: rows must be in \[0, 3\], got 4"),
    ("band_accumulate", lambda d: (torch.zeros(5, 4, 9, device=d), torch.zeros(2, 5, 4, 4, device=d), [0, 9], 4),
     r"wsss::band_accumulate: every x must be in \[0, 9\), got 9"),
    ("gradcam", lambda d: (torch.zeros(2, 3, 4, 4, device=d), torch.zeros(2, 2, 3, 4, 5, device=d)),
     r"wsss::gradcam: grads must have shape \[N, K, C, h, w\] = \[2, K, 3, 4, 4\], got shape \[2, 2, 3, 4, 5\]"),
    ("gradcam", lambda d: (torch.zeros(2, 3, 4, 4, device=d), torch.zeros(2, 2, 3, 4, 4, dtype=torch.float64, device=d)),
     r"wsss::gradcam: grads must have the dtype of features \(Float\), got Double"),
]


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("op,make_args,message", ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)])
def test_error_messages(device, op, make_args, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.wsss, op)(*make_args(device))


def test_backward_grad_shape_errors():
    f, w = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3)
    for device in DEVICES + ["meta"]:
        with pytest.raises(RuntimeError, match=r"wsss::pda_pool_backward: grad_pooled must have shape \[2, 3\], got shape \[2, 4\]"):
            torch.ops.wsss.pda_pool_backward(torch.zeros(2, 4, device=device), f.to(device), w.to(device), 0.5)
        with pytest.raises(RuntimeError, match=r"wsss::pda_attention_backward: grad_attention must have shape \[2, 1, 4, 4\], got shape \[2, 4, 4\]"):
            torch.ops.wsss.pda_attention_backward(torch.zeros(2, 4, 4, device=device), f.to(device), w.to(device), 0.5)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_host_op_error_messages(device):
    """band_finalize's values/counts and the tile codecs' layout checks: the same words from the
    kernels and their fakes (torch.compile / export see them at trace time)."""
    acc = torch.zeros(5, 4, 6, device=device)
    with pytest.raises(RuntimeError, match=r"wsss::band_finalize: values must be a 1-D uint8 tensor on the device of "
                                           r"acc, got shape \[3\] of Long on " + device):
        torch.ops.wsss.band_finalize(acc, 4, 0, None, 4, torch.zeros(3, dtype=torch.int64, device=device),
                                     torch.zeros(3, dtype=torch.int64, device=device), False)
    with pytest.raises(RuntimeError, match=r"wsss::band_finalize: counts must be an int64 tensor \[3\] on the device "
                                           r"of acc, got shape \[2\]"):
        torch.ops.wsss.band_finalize(acc, 4, 0, None, 4, torch.zeros(3, dtype=torch.uint8, device=device),
                                     torch.zeros(2, dtype=torch.int64, device=device), False)
    strided = torch.zeros(4, 8, 8, dtype=torch.uint8, device=device)[:, :, ::2]
    with pytest.raises(RuntimeError, match=r"wsss::deflate_tiles: tiles must be contiguous, got a non-contiguous "
                                           r"tensor of shape \[4, 8, 4\]"):
        torch.ops.wsss.deflate_tiles(strided, [0], 1)
    with pytest.raises(RuntimeError, match=r"wsss::inflate_tiles: out must be a contiguous tensor \[M, \.\.\.\], got "
                                           r"shape \[4, 8, 4\]"):
        torch.ops.wsss.inflate_tiles(torch.zeros(10, dtype=torch.uint8, device=device), [0] * 4, [1] * 4, strided)
    with pytest.raises(RuntimeError, match=r"wsss::inflate_tiles: stream 1 \[5, 12\) is not within data \[0, 10\)"):
        torch.ops.wsss.inflate_tiles(torch.zeros(10, dtype=torch.uint8, device=device), [0, 5], [5, 12],
                                     torch.zeros(2, 4, dtype=torch.uint8, device=device))


def test_backward_grad_on_another_device_is_refused():
    """The PDA backward checks where its gradient is (the CUDA kernel would read a host pointer)."""
    f, w = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3)
    other = "meta"
    with pytest.raises(RuntimeError, match=r"wsss::pda_pool_backward: grad_pooled must be on the device of features "
                                           r"\(cpu\), got meta"):
        torch.ops.wsss.pda_pool_backward(torch.zeros(2, 3, device=other), f, w, 0.5)
    with pytest.raises(RuntimeError, match=r"wsss::pda_attention_backward: grad_attention must be on the device of "
                                           r"features \(cpu\), got meta"):
        torch.ops.wsss.pda_attention_backward(torch.zeros(2, 1, 4, 4, device=other), f, w, 0.5)
    if CUDA:
        with pytest.raises(RuntimeError, match=r"grad_pooled must be on the device of features \(cuda:0\), got cpu"):
            torch.ops.wsss.pda_pool_backward(torch.zeros(2, 3), f.cuda(), w.cuda(), 0.5)


def test_device_mismatch_message():
    if not CUDA:
        with pytest.raises(RuntimeError, match=r"wsss::pda_pool: weight must be on the device of features \(meta\), got cpu"):
            torch.ops.wsss.pda_pool(torch.zeros(2, 3, 4, 4, device="meta"), torch.zeros(2, 3), 0.5)
    else:
        with pytest.raises(RuntimeError, match=r"weight must be on the device of features \(cuda:0\), got cpu"):
            torch.ops.wsss.pda_pool(torch.zeros(2, 3, 4, 4, device="cuda"), torch.zeros(2, 3), 0.5)


# --------------------------------------------------------------------------------------
# Registration: opcheck (schema, fake kernels, autograd, dynamic shapes)
# --------------------------------------------------------------------------------------
def _deflated():
    data, ends = ops.deflate_tiles(torch.arange(3 * 64).to(torch.uint8).reshape(3, 8, 8), [2, 0])
    return data, [0, int(ends[0])], ends.tolist()


def _opcheck_cases():
    f, w = _features(2, 6, 5, 3, 3, seed=10)
    fg, wg = f.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.Generator().manual_seed(11)
    scores, prob = torch.randn(2, 3, 5, 6, generator=g), torch.rand(2, 3, generator=g)
    mask = torch.rand(2, 5, 6, generator=g) > 0.5
    gf = torch.randn(2, 6, 5, 3, generator=g)
    gg = torch.randn(2, 3, 6, 5, 3, generator=g)
    return [
        ("pda_attention", (f, w, 0.8)),
        ("pda_attention", (fg, wg, 0.8)),
        ("pda_pool", (f, w, 0.8)),
        ("pda_pool", (fg, wg, 1.0)),
        ("pda_pool_backward", (torch.randn(2, 6), f, w, 0.8)),
        ("pda_attention_backward", (torch.randn(2, 1, 5, 3), f, w, 0.8)),
        ("gate_argmax", (scores, prob, 0.3)),
        ("gate_argmax", (scores, prob, 0.3, mask, 7)),
        ("gradcam", (gf, gg)),
        ("gradcam", (gf.clone().requires_grad_(), gg.clone().requires_grad_())),
        ("band_accumulate", (torch.randn(4, 5, 20, generator=g), torch.randn(3, 4, 6, 6, generator=g), [0, 5, 16], 5)),
        ("band_accumulate", (torch.randn(4, 5, 20, generator=g), torch.rand(3, 3, 6, 6, generator=g), [0, 5, 16], 5,
                             torch.rand(6, 6, generator=g))),
        ("band_finalize", (torch.rand(4, 6, 9, generator=g), 4, 4, torch.rand(4, 9, generator=g) > 0.5, 7,
                           torch.tensor([0, 1, 2, 7], dtype=torch.uint8), torch.zeros(4, dtype=torch.long), True)),
        ("deflate_tiles", ((torch.rand(3, 8, 8, generator=g) * 4).to(torch.uint8), [2, 0], 1)),
        ("majority_downsample", ((torch.rand(6, 10, generator=g) * 4).to(torch.uint8),)),
        ("inflate_tiles", (*_deflated(), torch.empty(2, 8, 8, dtype=torch.uint8))),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.wsss, name).default, args)


# --------------------------------------------------------------------------------------
# Callers: TorchScript, torch.compile, torch.export
# --------------------------------------------------------------------------------------
class AllOps(torch.nn.Module):
    """Calls every op through the scriptable wrappers."""

    def __init__(self, eps: float = 0.3):
        super().__init__()
        self.eps = eps

    def forward(self, f: torch.Tensor, w: torch.Tensor, grads: torch.Tensor, class_prob: torch.Tensor):
        pooled = ops.pda_pool(f, w, 0.8)
        attention = ops.pda_attention(f, w, 0.8)
        cams = ops.gradcam(f, grads)
        labels = ops.gate_argmax(cams, class_prob, self.eps)
        return pooled, attention, cams, labels


def _all_ops_inputs(seed=12):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(2, 8, 6, 5, generator=g)
    w = torch.randn(3, 8, generator=g)
    grads = torch.randn(2, 3, 8, 6, 5, generator=g)
    cp = torch.rand(2, 3, generator=g)
    return f, w, grads, cp


def _assert_same(a, b):
    for x, y in zip(a, b):
        if x.dtype == torch.uint8:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y)


def test_scripted_caller_saved_reloaded_matches_eager(tmp_path):
    model = AllOps()
    scripted = script_module(model)
    path = tmp_path / "all_ops.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    inputs = _all_ops_inputs()
    _assert_same(loaded(*inputs), model(*inputs))
    # Autograd through the scripted caller.
    f, w, grads, cp = _all_ops_inputs(13)
    f.requires_grad_()
    w.requires_grad_()
    pooled, attention, _, _ = loaded(f, w, grads, cp)
    (pooled.sum() + attention.sum()).backward()
    fe, we = f.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (reference.pda_pool(fe, we, 0.8).sum() + reference.pda_attention(fe, we, 0.8).sum()).backward()
    torch.testing.assert_close(f.grad, fe.grad)
    torch.testing.assert_close(w.grad, we.grad)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = AllOps()
    compiled = torch.compile(model, fullgraph=True)
    inputs = _all_ops_inputs()
    _assert_same(compiled(*inputs), model(*inputs))


def test_compile_fullgraph_backward_aot_eager():
    torch._dynamo.reset()

    def loss(f, w):
        return ops.pda_pool(f, w, 0.8).square().sum() + ops.pda_attention(f, w, 0.8).sum()

    f, w = _features(2, 8, 4, 4, 3, seed=14)
    f1, w1 = f.clone().requires_grad_(), w.clone().requires_grad_()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(f1, w1).backward()
    f2, w2 = f.clone().requires_grad_(), w.clone().requires_grad_()
    loss(f2, w2).backward()
    torch.testing.assert_close(f1.grad, f2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_export_keeps_custom_ops_as_graph_nodes():
    model = AllOps()
    inputs = _all_ops_inputs()
    exported = torch.export.export(model, inputs)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    for name in ("pda_pool", "pda_attention", "gradcam", "gate_argmax"):
        assert f"wsss.{name}.default" in targets, targets
    _assert_same(exported.module()(*inputs), model(*inputs))


def test_library_loaded_once_and_reload_is_harmless(monkeypatch):
    """A second load never loads the file again (a second TORCH_LIBRARY for the namespace aborts
    the process): cached, and where the ops are registered already (a host loaded them), noticed."""
    path = wsss._library.load()
    loads = []
    monkeypatch.setattr(torch.ops, "load_library", loads.append)
    assert wsss._library.load() == path
    monkeypatch.setattr(wsss._library, "_LOADED", None)  # (as a process where a host loaded the ops first)
    assert wsss._library.load() == path
    assert loads == [] and hasattr(torch.ops.wsss, "pda_pool")


# --------------------------------------------------------------------------------------
# CPU/CUDA parity (only where a GPU is present)
# --------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_cpu_parity(dtype):
    f, w = _features(4, 96, 28, 28, 4, dtype=dtype, seed=15)
    tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else dict(rtol=3e-2, atol=3e-2)
    for mu in (1.0, 0.7):
        torch.testing.assert_close(ops.pda_pool(f.cuda(), w.cuda(), mu).cpu(), ops.pda_pool(f, w, mu), **tol)
        torch.testing.assert_close(ops.pda_attention(f.cuda(), w.cuda(), mu).cpu(), ops.pda_attention(f, w, mu), **tol)
        g = torch.randn(4, 96, dtype=torch.float64).to(dtype)
        fc, wc = f.cuda().requires_grad_(), w.cuda().requires_grad_()
        got = torch.autograd.grad(ops.pda_pool(fc, wc, mu), (fc, wc), g.cuda())
        fh, wh = f.clone().requires_grad_(), w.clone().requires_grad_()
        want = torch.autograd.grad(ops.pda_pool(fh, wh, mu), (fh, wh), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, **tol)
    s = torch.randn(3, 5, 67, 131, dtype=torch.float64).to(dtype)
    p = torch.rand(3, 5, dtype=torch.float64).to(dtype)
    m = torch.rand(3, 67, 131) > 0.2
    assert torch.equal(ops.gate_argmax(s.cuda(), p.cuda(), 0.4, m.cuda(), 9).cpu(), ops.gate_argmax(s, p, 0.4, m, 9))
    # an eps beyond the dtype's range is inf there (no class passes: the ungated argmax), as on
    # the CPU and in the reference; CUDA raised "value cannot be converted to type float"
    for eps in (1e39, 1e309, -1e39):
        want = reference.gate_argmax(s, p, eps, m, 9)
        assert torch.equal(ops.gate_argmax(s, p, eps, m, 9), want)
        assert torch.equal(ops.gate_argmax(s.cuda(), p.cuda(), eps, m.cuda(), 9).cpu(), want)
    gf = torch.randn(2, 64, 28, 28, dtype=torch.float64).to(dtype)
    gg = torch.randn(2, 4, 64, 28, 28, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(ops.gradcam(gf.cuda(), gg.cuda()).cpu(), ops.gradcam(gf, gg), **tol)


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
def test_cuda_batches_beyond_the_grid_y_limit():
    """The CUDA kernels put samples on grid y (at most 65535 blocks): bigger batches loop, and
    agree with the reference sample for sample (pda_attention also covers the contraction)."""
    from wsss import reference

    g = torch.Generator().manual_seed(0)
    n = 70_000
    scores = torch.rand(n, 3, 2, 2, generator=g)
    class_prob = torch.rand(n, 3, generator=g)
    want = reference.gate_argmax(scores, class_prob, 0.3)
    got = torch.ops.wsss.gate_argmax(scores.cuda(), class_prob.cuda(), 0.3).cpu()
    assert torch.equal(got, want)
    f, w = torch.rand(n, 4, 2, 2, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(torch.ops.wsss.pda_attention(f.cuda(), w.cuda(), 0.9).cpu(),
                               reference.pda_attention(f, w, 0.9), rtol=1e-5, atol=1e-6)


def test_pda_attention_of_no_channels_is_zero():
    """C = 0: every CAM is 0, so is the attention (the CUDA kernel launched zero blocks)."""
    for device in DEVICES:
        out = torch.ops.wsss.pda_attention(torch.zeros(2, 0, 3, 3, device=device), torch.zeros(2, 0, device=device), 0.5)
        assert out.shape == (2, 1, 3, 3) and not out.any()

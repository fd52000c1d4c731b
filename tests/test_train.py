"""Training pieces: mu schedules, batched Grad-CAM == the reference loop, pseudo-mask rules,
resumable checkpoints, CLI errors.  Tiny networks and patches only."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.train.classifier import ClassifierConfig, mu_for_epoch, train_classifier
from wsss.train.common import poly_lr, random_flips
from wsss.train.pseudo_masks import (background_mask, gradcam_maps, gradcam_maps_reference_loop,
                                     masks_from_cams)


def test_mu_schedules():
    paper = [mu_for_epoch("paper", e) for e in range(40)]
    assert paper[:3] == [1.0, 1.0, 1.0]
    assert paper[3] == pytest.approx(0.985) and paper[4] == pytest.approx(0.985 ** 2)
    assert min(paper) == pytest.approx(0.65) and paper[-1] == pytest.approx(0.65)
    ref = [mu_for_epoch("reference", e) for e in range(6)]
    assert ref[:3] == [None, None, None] and ref[3] == pytest.approx(0.98 ** 3)
    assert mu_for_epoch("constant", 7, 1.0) == 1.0 and mu_for_epoch("none", 5) is None
    warm = [mu_for_epoch("warmup-constant", e, 1.0) for e in range(5)]
    assert warm == [None, None, None, 1.0, 1.0]


def test_poly_and_flips():
    assert poly_lr(0.01, 0, 100) == 0.01 and poly_lr(0.01, 100, 100) == 0.0
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    x = torch.arange(2 * 1 * 3 * 3).reshape(2, 1, 3, 3)
    m = x[:, 0].clone()
    a, b = random_flips(x, torch.Generator().manual_seed(0), masks=m)
    assert torch.equal(a[:, 0], b)  # image and mask flipped together
    a2 = random_flips(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, a2)


@pytest.fixture(scope="module")
def tiny_classifier():
    from wsss.models import ResNet38Classifier

    torch.manual_seed(0)
    model = ResNet38Classifier(4, width=1 / 16).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_batched_gradcam_equals_reference_loop(tiny_classifier):
    x = torch.rand(3, 3, 40, 48)
    batched = gradcam_maps(tiny_classifier, x.clone().requires_grad_(True), batched_backward=True)
    per_class = gradcam_maps(tiny_classifier, x.clone().requires_grad_(True))
    loop = gradcam_maps_reference_loop(tiny_classifier, x)
    for layer in ("b4_5", "b5_2", "bn7"):
        scale = loop[layer].abs().max()
        assert batched[layer].shape == (3, 4, 5, 6)
        torch.testing.assert_close(batched[layer], loop[layer], atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(per_class[layer], loop[layer], atol=1e-5 * scale, rtol=1e-4)
    assert all(not p.requires_grad for p in tiny_classifier.parameters())


def test_gradcam_needs_eval_mode(tiny_classifier):
    from wsss.errors import WsssError

    tiny_classifier.train()
    try:
        with pytest.raises(WsssError, match="eval mode"):
            gradcam_maps(tiny_classifier, torch.rand(1, 3, 16, 16))
    finally:
        tiny_classifier.eval()


def test_masks_from_cams_rules():
    cams = torch.zeros(1, 3, 2, 2)
    cams[0, 0] = torch.tensor([[5.0, 1.0], [0.0, 0.0]])
    cams[0, 1] = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    cams[0, 2] = torch.tensor([[9.0, 9.0], [9.0, 9.0]])  # absent from the label: must never win
    cams[0, :, 1, 0] = torch.tensor([-1.0, 3.0, 9.0])
    labels = torch.tensor([[1, 1, 0]])
    bg = torch.tensor([[[False, False], [False, True]]])
    out = masks_from_cams(cams, labels, (2, 2), bg, background_index=3)
    assert out.dtype == torch.uint8
    assert out[0].tolist() == [[0, 1], [1, 3]]
    # Without a background rule every pixel is a class.
    assert masks_from_cams(cams, labels, (2, 2), None, 3).max() < 3


def test_background_mask_removes_small_white_specks():
    img = np.full((1, 3, 40, 40), 100, np.uint8)
    img[:, :, :20, :] = 250  # big white region -> background
    img[:, :, 30:33, 30:33] = 250  # 9 px speck -> stays tissue
    bg = background_mask(torch.from_numpy(img))
    assert bg[0, :20].all() and not bg[0, 30:33, 30:33].any() and not bg[0, 25:].any()


def _tiny_dataset(root, n=12, patch=32):
    from wsss.synthetic import write_patch_dataset

    write_patch_dataset(root, n_train=n, n_val=2, n_test=2, patch=patch, seed=3)


def test_classifier_checkpoints_resume_exactly(tmp_path):
    data = str(tmp_path / "data")
    _tiny_dataset(data)
    kw = dict(data_root=data, batch_size=4, width=1 / 16, progress=False, seed=1)
    straight = train_classifier(ClassifierConfig(out_dir=str(tmp_path / "a"), epochs=2, **kw))
    # Interrupted after one epoch, then resumed.
    first = train_classifier(ClassifierConfig(out_dir=str(tmp_path / "b"), epochs=2, stop_after_epochs=1, **kw))
    assert not first["finished"] and not os.path.exists(tmp_path / "b" / "classifier.pt")
    ckpt = torch.load(tmp_path / "b" / "classifier_last.pt", weights_only=True)
    assert ckpt["kind"] == "classifier" and ckpt["epoch"] == 0 and "optimizer" in ckpt and "config" in ckpt
    resumed = train_classifier(ClassifierConfig(out_dir=str(tmp_path / "b"), epochs=2, **kw))
    a = torch.load(straight["checkpoint"], weights_only=True)["model"]
    b = torch.load(resumed["checkpoint"], weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    from wsss.models.checkpoints import load_classifier_checkpoint

    assert load_classifier_checkpoint(straight["checkpoint"]).num_classes == 4


def test_cli_errors_are_one_line(tmp_path, capsys):
    from wsss.cli.eval import main as eval_main
    from wsss.cli.train_cls import main as cls_main

    assert cls_main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wsss-train-cls: error: ") and "missing" in err and "\n" not in err
    os.makedirs(tmp_path / "empty" / "train")
    assert cls_main([str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "empty split" in capsys.readouterr().err
    assert eval_main([str(tmp_path), "--segmenter", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_evaluate_segmenter_gate_diagnostics():
    """The gate's cost is measured: pixels whose true class the classifier gates out."""
    from wsss.synthetic import synthetic_description
    from wsss.train.segmenter import evaluate_segmenter

    description = synthetic_description(4)
    masks = torch.tensor([[[0, 1], [1, 4]], [[2, 2], [3, 1]]])  # index 4 = background, not scored
    items = [{"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "mask": m, "name": str(i)} for i, m in enumerate(masks)]

    class Segmenter(torch.nn.Module):
        def forward(self, x):  # class 1 everywhere, class 0 second
            return torch.tensor([2.0, 3.0, 0.0, 0.0])[None, :, None, None].expand(x.shape[0], 4, *x.shape[2:])

    class Classifier(torch.nn.Module):
        def forward(self, x):  # sigmoid(-3) = 0.047 <= 0.1: class 1 gated; the others pass
            return torch.tensor([3.0, -3.0, 3.0, 3.0]).expand(x.shape[0], 4)

    out = evaluate_segmenter(Segmenter(), Classifier(), items, description, batch_size=2, eps=0.1)
    gate = out["gate"]
    assert gate["pixels_true_class_gated"] == pytest.approx(3 / 7)  # 3 of 7 tissue pixels are class 1
    assert gate["present_gated"] == pytest.approx(2 / 5)  # present pairs: {0,1} and {1,2,3}
    assert gate["absent_passed"] == pytest.approx(1.0)  # absent pairs {2,3} and {0}: all pass
    assert out["ungated"]["iou"]["LYM"] == 0.0 and out["gated"]["acc"] == pytest.approx(1 / 7)  # gated: class 0 wins

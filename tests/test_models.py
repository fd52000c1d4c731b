"""Networks: reference module names (strict load), script -> save -> load -> compare, heads, checkpoints."""
from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import wsss.reference as reference
from wsss.bundle import script_module
from wsss.errors import BundleError
from wsss.models import DeepLabV3Plus, ResNet38Classifier, TissueSegmenter
from wsss.models.checkpoints import (load_classifier_checkpoint, load_segmenter_checkpoint, read_checkpoint)

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices

SHARED = Path(__file__).resolve().parents[2] / "shared"
KEYS_FILE = SHARED / "reference_checkpoint_keys.json"
SMALL = 0.0625


def _reference_keys() -> dict:
    if not KEYS_FILE.is_file():
        pytest.skip(f"{KEYS_FILE} is absent (the shared folder next to the repository)")
    return json.loads(KEYS_FILE.read_text())


def _reference_state_dict(shapes: dict) -> dict:
    """A state_dict with the reference code's keys and shapes; cheap distinct values (the
    reference-width networks are large, only the keys and shapes matter here)."""
    out = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        else:
            out[key] = torch.full(shape, 0.5 + 1e-3 * i)
    return out


def _randomise_bn(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics so eval-mode comparisons exercise them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def _small_classifier(k: int = 4) -> ResNet38Classifier:
    torch.manual_seed(0)
    return _randomise_bn(ResNet38Classifier(k, width=SMALL)).eval()


def _small_segmenter(k: int = 4) -> DeepLabV3Plus:
    torch.manual_seed(0)
    return _randomise_bn(DeepLabV3Plus(k, backbone="resnet50", width=SMALL)).eval()


def _script_roundtrip(module):
    buf = io.BytesIO()
    torch.jit.save(script_module(module), buf)
    buf.seek(0)
    return torch.jit.load(buf)


# ----------------------------------------------------------------------------- reference names
def test_classifier_strict_load_of_reference_stage1_state_dict():
    keys = _reference_keys()
    assert keys["stage1_resnet38_cls_train"] == keys["stage1_resnet38_cls"]  # PDA adds no parameters
    model = ResNet38Classifier(4)
    sd = _reference_state_dict(keys["stage1_resnet38_cls"])
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.fc8.weight, sd["fc8.weight"])
    assert torch.equal(model.b7.bn_branch2b2.running_var, sd["b7.bn_branch2b2.running_var"])
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(105.1e6, rel=2e-3)


def test_deeplab_strict_load_of_reference_stage2_state_dict_and_shape():
    keys = _reference_keys()["stage2_deeplab_resnet101_os16"]
    model = DeepLabV3Plus(4)
    assert list(model.state_dict()) == list(keys)  # same order as the reference too
    model.load_state_dict(_reference_state_dict(keys), strict=True)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(59.3e6, rel=2e-3)
    # reference-width shape check on a small input (output stride 16: 64 -> 4 -> logits at 64)
    with torch.inference_mode():
        out = model.eval()(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 4, 64, 64)


def test_deeplab_dilations_follow_reference_multigrid():
    model = DeepLabV3Plus(3, backbone="resnet50", width=SMALL)
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 4, 8]
    assert [b.conv2.padding[0] for b in model.backbone.layer4] == [2, 4, 8]
    assert model.backbone.layer4[0].downsample[0].stride == (1, 1)
    assert [m.atrous_conv.dilation[0] for m in (model.aspp.aspp1, model.aspp.aspp2, model.aspp.aspp3,
                                                 model.aspp.aspp4)] == [1, 6, 12, 18]


# ----------------------------------------------------------------------------- classifier heads
def test_classifier_shapes_and_feature_maps_logits():
    model = _small_classifier(3)
    x = torch.rand(2, 3, 64, 64)
    maps = model.feature_maps(x)
    assert maps["b4_5"].shape == (2, 32, 8, 8)
    assert maps["b5_2"].shape == (2, 64, 8, 8)
    assert maps["bn7"].shape == (2, 256, 8, 8)
    assert (maps["bn7"] >= 0).all()
    torch.testing.assert_close(maps["logits"], model(x))
    # reference inference: fc8 as a 1x1 conv on the pooled map
    ref = F.conv2d(F.adaptive_avg_pool2d(maps["bn7"], 1), model.fc8.weight).flatten(1)
    torch.testing.assert_close(model(x), ref)


def test_feature_maps_support_gradcam_gradients():
    model = _small_classifier()
    maps = model.feature_maps(torch.rand(1, 3, 48, 48))
    grads = torch.autograd.grad(maps["logits"][:, 1].sum(), [maps["b4_5"], maps["b5_2"], maps["bn7"]])
    assert all(g.shape == maps[k].shape for g, k in zip(grads, ("b4_5", "b5_2", "bn7")))
    assert all(g.abs().sum() > 0 for g in grads)


def test_forward_pda_matches_reference_composition_in_eval_mode():
    model = _small_classifier()
    x = torch.rand(2, 3, 64, 64)
    feats = model.features(x)
    w = model.fc8.weight.flatten(1)
    for mu in (1.0, 0.8, 0.65):
        attention = reference.pda_attention(feats, w, mu)
        expected = F.conv2d(F.adaptive_avg_pool2d(attention * feats, 1), model.fc8.weight).flatten(1)
        torch.testing.assert_close(model.forward_pda(x, mu), expected, rtol=1e-4, atol=1e-5)


def test_forward_pda_trains_fc8_and_features_through_attention():
    model = ResNet38Classifier(4, width=SMALL).train()
    logits = model.forward_pda(torch.rand(2, 3, 48, 48), 0.7)
    F.multilabel_soft_margin_loss(logits, torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])).backward()
    assert model.fc8.weight.grad is not None and model.fc8.weight.grad.abs().sum() > 0
    assert model.b7.conv_branch2b2.weight.grad.abs().sum() > 0


def test_training_dropout_is_channel_dropout_of_pooled_vector():
    model = ResNet38Classifier(2, width=SMALL).train()
    torch.manual_seed(3)
    x = torch.rand(4, 3, 32, 32)
    # eval-mode features (BN running stats) so only the head dropout is random
    model.eval()
    feats = model.features(x)
    model.train()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout2d)):
            m.eval()
    torch.manual_seed(5)
    pooled = model.dropout7(feats.mean(dim=(2, 3)))
    kept = pooled != 0
    assert 0.2 < kept.float().mean() < 0.8  # p = 0.5
    torch.testing.assert_close(pooled[kept], (feats.mean(dim=(2, 3)) * 2)[kept])


def test_freeze_reference_layers_matches_reference_training():
    model = ResNet38Classifier(4, width=SMALL).freeze_reference_layers()
    model.train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n in frozen for n, _ in model.conv1a.named_parameters(prefix="conv1a"))
    assert all(n in frozen for n, _ in model.b2_2.named_parameters(prefix="b2_2"))
    assert "b3.conv_branch2a.weight" not in frozen and "fc8.weight" not in frozen
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in bns)
    assert all(not m.weight.requires_grad for m in bns)
    assert model.b6.dropout_2b1.training  # dropout still trains


# ----------------------------------------------------------------------------- script/save/load
def test_classifier_script_save_load_matches_eager():
    model = _small_classifier()
    loaded = _script_roundtrip(model)
    x = torch.rand(2, 3, 56, 72)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.forward_pda(x, 0.75), model.forward_pda(x, 0.75), rtol=1e-6, atol=1e-6)
    maps, ref = loaded.feature_maps(x), model.feature_maps(x)
    assert set(maps) == {"b4_5", "b5_2", "bn7", "logits"}
    for k in maps:
        torch.testing.assert_close(maps[k], ref[k], rtol=0, atol=0)


def test_segmenter_script_save_load_matches_eager_at_odd_size():
    model = _small_segmenter()
    loaded = _script_roundtrip(model)
    x = torch.rand(2, 3, 70, 54)
    out = model(x)
    assert out.shape == (2, 4, 70, 54)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)


def test_tissue_segmenter_outputs_and_gate():
    clf, seg = _small_classifier(), _small_segmenter()
    module = TissueSegmenter(clf, seg, eps=0.1).eval()
    tiles = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    labels, scores, class_prob = module(tiles, with_scores=True)
    assert labels.dtype == torch.uint8 and labels.shape == (2, 64, 64)
    assert scores.dtype == torch.float32 and scores.shape == (2, 4, 64, 64)
    assert class_prob.shape == (2, 4)
    x = tiles.float() * module.input_scale  # NB: x * (1/255), not x / 255 (1 ulp apart)
    expected_prob = torch.sigmoid(clf(x))
    torch.testing.assert_close(class_prob, expected_prob, rtol=1e-5, atol=1e-6)
    logits = seg(x)
    torch.testing.assert_close(labels, reference.gate_argmax(logits, class_prob, 0.1))
    torch.testing.assert_close(scores, torch.softmax(logits, 1) *
                               ((class_prob > 0.1) | ~(class_prob > 0.1).any(1, keepdim=True))[..., None, None],
                               rtol=1e-5, atol=1e-6)
    # float input in 0..255 gives the same answer; scores empty on request
    labels_f, empty, _ = module(tiles.float(), with_scores=False)
    assert torch.equal(labels_f, labels) and empty.numel() == 0


def test_tissue_segmenter_gate_excludes_low_probability_classes():
    clf, seg = _small_classifier(), _small_segmenter()
    with torch.no_grad():
        clf.fc8.weight.zero_()  # logits 0 -> class_prob 0.5 for every class
    module = TissueSegmenter(clf, seg, eps=0.6)  # nothing passes: ungated argmax kept
    tiles = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    labels, _, prob = module(tiles)
    torch.testing.assert_close(prob, torch.full((1, 4), 0.5))
    assert torch.equal(labels, seg(tiles.float() * module.input_scale).argmax(1).to(torch.uint8))
    # classes 1 and 3 below eps, and the segmenter favouring them: they win nowhere gated, and
    # the rest of the map is the argmax over classes 0 and 2
    with torch.no_grad():  # (fc8 has no bias; its input, a mean of ReLU outputs, is positive)
        clf.fc8.weight.copy_(torch.tensor([1e3, -1e3, 1e3, -1e3])[:, None, None, None].expand_as(clf.fc8.weight))
        seg.decoder.last_conv[8].bias.add_(torch.tensor([0.0, 4.0, 0.0, 4.0]))
    module = TissueSegmenter(clf, seg, eps=0.1)
    labels, _, prob = module(tiles)
    assert torch.equal(prob > 0.1, torch.tensor([[True, False, True, False]]))
    logits = seg(tiles.float() * module.input_scale)
    ungated = logits.argmax(1)
    assert ((ungated == 1) | (ungated == 3)).float().mean() > 0.5  # (the gate has work to do)
    assert not ((labels == 1) | (labels == 3)).any()
    assert torch.equal(labels.long(), torch.where(logits[:, 0] >= logits[:, 2], 0, 2))


def test_tissue_segmenter_script_roundtrip_is_exact_and_rejects_bad_tiles():
    module = TissueSegmenter(_small_classifier(), _small_segmenter()).eval()
    loaded = _script_roundtrip(module)
    tiles = torch.randint(0, 256, (3, 3, 48, 40), dtype=torch.uint8)
    for a, b in zip(module(tiles, True), loaded(tiles, True)):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match=r"tiles must have shape \[N, 3, H, W\]"):
        loaded(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="classifier has 4 classes but segmenter has 3"):
        TissueSegmenter(_small_classifier(4), _small_segmenter(3))


@pytest.mark.parametrize("dtype,name", [(torch.int64, "torch.int64"), (torch.bool, "torch.bool"),
                                        (torch.int32, "torch.int32"), (torch.complex64, "torch.complex64")])
def test_tissue_segmenter_names_a_refused_tile_dtype_also_when_scripted(dtype, name):
    # TorchScript formats a dtype as its integer code: the scripted bundle module said "got 4"
    module = TissueSegmenter(_small_classifier(), _small_segmenter()).eval()
    loaded = _script_roundtrip(module)
    tiles = torch.zeros(1, 3, 8, 8, dtype=dtype)
    message = rf"TissueSegmenter: tiles must be uint8 or floating, got {name}$"
    with pytest.raises(ValueError, match=message):
        module(tiles)
    with pytest.raises(Exception) as info:
        loaded(tiles)
    assert any(re.search(message, line) for line in str(info.value).splitlines()), str(info.value)


# ----------------------------------------------------------------------------- checkpoints
def test_load_reference_stage1_and_stage2_files(tmp_path):
    # reference-format files of a SMALL network: same keys, shapes scaled (loader reads widths off shapes)
    clf = _small_classifier()
    torch.save(clf.state_dict(), tmp_path / "stage1.pth")
    seg = _small_segmenter()
    torch.save({"state_dict": seg.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "stage2.pth")
    loaded_clf = load_classifier_checkpoint(tmp_path / "stage1.pth")
    loaded_seg = load_segmenter_checkpoint(tmp_path / "stage2.pth")
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded_clf(x), clf(x)) and torch.equal(loaded_seg(x), seg(x))
    assert loaded_seg.backbone_name == "resnet50" and not loaded_clf.training
    assert read_checkpoint(tmp_path / "stage2.pth").source_format == "reference-stage2"
    # (and the keys are the reference checkpoints', where ../shared lists them)
    assert set(clf.state_dict()) == set(_reference_keys()["stage1_resnet38_cls"])


def test_load_wsss_training_checkpoint_and_dataparallel_prefix(tmp_path):
    clf = _small_classifier(3)
    sd = {"module." + k: v for k, v in clf.state_dict().items()}
    torch.save({"model": sd, "config": {"width": SMALL}, "epoch": 4, "kind": "classifier"}, tmp_path / "c.pt")
    contents = read_checkpoint(tmp_path / "c.pt")
    assert (contents.source_format, contents.kind, contents.epoch) == ("wsss", "classifier", 4)
    assert contents.config == {"width": SMALL}
    model = load_classifier_checkpoint(tmp_path / "c.pt", num_classes=3)
    assert model.num_classes == 3


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(BundleError, match="no such file"):
        load_classifier_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(BundleError, match="not a PyTorch checkpoint"):
        load_classifier_checkpoint(tmp_path / "text.pth")
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(BundleError, match=r"not a PyTorch checkpoint \((?!.*weights_only)"):
        load_classifier_checkpoint(tmp_path / "random.pth")
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "pickled_module.pth")
    with pytest.raises(BundleError, match="holds pickled Python objects .* weights_only=True and unpickles nothing else"):
        load_classifier_checkpoint(tmp_path / "pickled_module.pth")
    with pytest.raises(BundleError, match="is a directory, not a checkpoint file"):
        load_classifier_checkpoint(tmp_path)
    from wsss.bundle import METADATA_FILE

    # (only a TorchScript archive carrying bundle metadata: save_bundle refuses a module that is no segmenter)
    torch.jit.save(script_module(torch.nn.Identity()), str(tmp_path / "model.pt"),
                   _extra_files={METADATA_FILE: json.dumps({"class_names": ["a"], "format_version": 1})})
    with pytest.raises(BundleError, match="is a wsss model bundle .* not a training checkpoint"):
        load_classifier_checkpoint(tmp_path / "model.pt")
    seg = _small_segmenter()
    torch.save({"state_dict": seg.state_dict(), "optimizer": {}}, tmp_path / "seg.pth")
    with pytest.raises(BundleError, match="wrong network: expected a classifier checkpoint, got a segmenter"):
        load_classifier_checkpoint(tmp_path / "seg.pth")
    clf_sd = _small_classifier().state_dict()
    torch.save(clf_sd, tmp_path / "clf.pth")
    with pytest.raises(BundleError, match="wrong num_classes: the classifier has 4 classes, expected 5"):
        load_classifier_checkpoint(tmp_path / "clf.pth", num_classes=5)
    broken = dict(clf_sd)
    del broken["b3.conv_branch1.weight"]
    broken["b9.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(BundleError, match=r"1 missing keys: b3.conv_branch1.weight; 1 unexpected keys: b9.weight"):
        load_classifier_checkpoint(tmp_path / "broken.pth")
    torch.save({"model": clf_sd, "kind": "segmenter"}, tmp_path / "liar.pt")
    with pytest.raises(BundleError, match="says kind='segmenter' but holds classifier weights"):
        load_segmenter_checkpoint(tmp_path / "liar.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(BundleError, match="not a wsss network"):
        load_classifier_checkpoint(tmp_path / "other.pth")

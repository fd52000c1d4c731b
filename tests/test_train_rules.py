"""Training and evaluation rules of METHOD.md checked against hand-computed oracles.

Each test guards a rule whose breaking (found by hand mutation testing) left the rest of the
suite green: which mu each stage-1 epoch trains with, the stage-1/stage-3 optimiser settings
and loss, the 0.2/0.2/0.6 layer weights, the poly schedule's per-group multipliers, the gate,
metric corner cases, label/mask reading and the pseudo-mask rules.  Stub models stand in for
the networks (the rules live in the training loops, not in the networks), so the file is fast.
"""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data import LUAD_HISTOSEG, DatasetDescription, get_description, parse_label, read_mask
from wsss.errors import DataError

K = 4


def _png(path, array, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img.putpalette(palette)
    img.save(path)


def _train_folder(root, names, size=8):
    rng = np.random.default_rng(0)
    for n in names:
        _png(os.path.join(root, "train", n), rng.integers(20, 230, (size, size, 3), dtype=np.uint8))


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------------- stage 1

class _StubClassifier(torch.nn.Module):
    """Fixed logits (so the loss has a hand-computable value) on the graph of a few parameters
    named like the real model's (conv weights, BN affine, fc8); records every call."""

    LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0])

    def __init__(self, k):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc8 = torch.nn.Conv2d(4, k, 1, bias=False)
        self.calls = []

    def _out(self, x):
        y = self.fc8(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.LOGITS.expand_as(y) + 0.0 * y

    def forward(self, x):
        self.calls.append(("plain", None, x.detach().clone()))
        return self._out(x)

    def forward_pda(self, x, mu):
        self.calls.append(("pda", mu, x.detach().clone()))
        return self._out(x)


def _run_classifier(tmp_path, monkeypatch, **options):
    """train_classifier with a stub model and a train_epoch that runs each epoch's loss_of once
    on a real batch; returns (per-epoch records, the stub)."""
    import wsss.train.classifier as classifier
    import wsss.train.common as common
    from wsss.train.classifier import ClassifierConfig, train_classifier

    data = str(tmp_path / "data")
    _train_folder(data, ["p0-[1 0 0 1].png", "p1-[0 1 1 0].png", "p2-[1 1 0 0].png", "p3-[0 0 0 1].png"])
    stub = _StubClassifier(K)
    monkeypatch.setattr(classifier, "build_classifier", lambda k, width: stub)
    real_flips = common.random_flips
    flips = []

    def recording_flips(images, gen, vertical=True, masks=None):
        flips.append(vertical)
        return real_flips(images, gen, vertical=vertical, masks=masks)

    monkeypatch.setattr(common, "random_flips", recording_flips)
    records = []

    def fake_train_epoch(model, optimizer, loader, *, step, steps, max_steps, base_lr, poly_power, loss_of,
                         **kw):
        batch = next(iter(loader))
        stub.calls.clear()
        loss, n = loss_of(batch)
        records.append({"calls": list(stub.calls), "loss": loss, "batch": batch, "optimizer": optimizer,
                        "base_lr": base_lr, "poly_power": poly_power, "max_steps": max_steps, "steps": steps,
                        "vertical": flips[-1]})
        return float(loss.detach()), step + steps

    monkeypatch.setattr(common, "train_epoch", fake_train_epoch)
    cfg = ClassifierConfig(data_root=data, out_dir=str(tmp_path / "out"), batch_size=2, progress=False,
                           **options)
    train_classifier(cfg, resume=False)
    return records, stub


def test_each_stage1_epoch_trains_with_pda_at_the_paper_mu(tmp_path, monkeypatch):
    """Defect guarded: the training loop ignoring PDA (plain GAP logits every epoch) or handing
    forward_pda the mu of another epoch.  METHOD: mu = 1 for the first 3 epochs, then
    mu_t = 0.985 mu_{t-1} (floor 0.65), so epoch e (0-based) trains with 0.985 ** (e - 2)."""
    records, _ = _run_classifier(tmp_path, monkeypatch)
    assert len(records) == 20  # METHOD: 20 epochs
    for e, rec in enumerate(records):
        assert len(rec["calls"]) == 1
        kind, mu, _ = rec["calls"][0]
        assert kind == "pda", f"epoch {e} trained without PDA"
        expected = 1.0 if e < 3 else max(0.65, 0.985 ** (e - 2))
        assert mu == pytest.approx(expected, abs=1e-12), f"epoch {e}"


def test_reference_schedule_trains_plain_gap_then_pda(tmp_path, monkeypatch):
    """Defect guarded: PDA used during the reference schedule's 3 warm-up epochs, or later epochs
    without it.  METHOD: the reference multiplies mu by 0.98 after every epoch from epoch 0 and
    enables PDA from epoch 3 (mu_e = 0.98 ** e while above 0.65)."""
    records, _ = _run_classifier(tmp_path, monkeypatch, mu_schedule="reference", epochs=6)
    kinds = [(r["calls"][0][0], r["calls"][0][1]) for r in records]
    assert [k for k, _ in kinds] == ["plain"] * 3 + ["pda"] * 3
    assert [mu for _, mu in kinds[3:]] == pytest.approx([0.98 ** 3, 0.98 ** 4, 0.98 ** 5])


def test_stage1_loss_is_multilabel_soft_margin_on_scaled_flipped_inputs(tmp_path, monkeypatch):
    """Defects guarded: another loss (e.g. the soft margin of sigmoid outputs), inputs not
    scaled by 1/255, vertical flips dropped.  METHOD: loss = multilabel soft margin of the logits,
    pixel values /255 only, random horizontal + vertical flips."""
    records, _ = _run_classifier(tmp_path, monkeypatch, epochs=1)
    rec = records[0]
    y = rec["batch"]["label"]
    z = _StubClassifier.LOGITS
    expected = 0.0
    for row in y.tolist():
        expected += -sum(t * math.log(1 / (1 + math.exp(-v))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-v)))
                         for t, v in zip(row, z.tolist())) / len(row)
    expected /= len(y)
    assert float(rec["loss"].detach()) == pytest.approx(expected, rel=1e-6)
    x = rec["calls"][0][2]
    images = rec["batch"]["image"].float() / 255.0
    assert 0.0 < float(x.max()) <= 1.0
    for i in range(len(images)):  # each input is one of the four flips of its scaled image
        assert any(torch.allclose(x[i], images[i].flip(*dims)) if dims else torch.allclose(x[i], images[i])
                   for dims in ((), (-1,), (-2,), (-1, -2)))
    assert rec["vertical"] is True


def test_stage1_optimiser_matches_the_reference(tmp_path, monkeypatch):
    """Defects guarded: fc8 not at 10x the learning rate, fc8 without weight decay, a wrong
    default weight decay, poly power or base lr.  METHOD: SGD lr 0.01 (fc8 10x), poly decay
    power 0.9, weight decay 5e-4; BatchNorm affine parameters carry no decay."""
    records, stub = _run_classifier(tmp_path, monkeypatch, epochs=2)
    rec = records[0]
    assert rec["base_lr"] == 0.01 and rec["poly_power"] == 0.9
    assert rec["max_steps"] == 2 * rec["steps"] == 4  # 4 patches, batch 2, 2 epochs
    groups = rec["optimizer"].param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    fc8 = by_param[id(stub.fc8.weight)]
    conv = by_param[id(stub.conv.weight)]
    bn = by_param[id(stub.bn.weight)]
    assert fc8["lr_mult"] == 10.0 and fc8["weight_decay"] == 5e-4
    assert conv["lr_mult"] == 1.0 and conv["weight_decay"] == 5e-4
    assert bn["lr_mult"] == 1.0 and bn["weight_decay"] == 0.0


def test_poly_lr_is_applied_with_each_groups_multiplier():
    """Defect guarded: train_epoch setting every group to the plain poly lr (fc8's 10x, or
    ASPP+decoder's 10x, lost).  METHOD: lr_t = base (1 - t/T) ** 0.9, times the group's factor."""
    from wsss.train.common import train_epoch

    a = torch.nn.Parameter(torch.ones(1))
    b = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [a], "lr_mult": 1.0}, {"params": [b], "lr_mult": 10.0}], lr=0.01)
    seen = []

    def loss_of(batch):
        seen.append([g["lr"] for g in opt.param_groups])
        return (a * b).sum(), 1

    _, step = train_epoch(torch.nn.Linear(1, 1), opt, [None] * 5, step=3, steps=5, max_steps=10, base_lr=0.01,
                          poly_power=0.9, loss_of=loss_of, diverged=lambda i, l: "diverged", desc="",
                          progress=False)
    assert step == 8
    expected = [[0.01 * (1 - s / 10) ** 0.9, 0.1 * (1 - s / 10) ** 0.9] for s in range(3, 8)]
    assert np.allclose(seen, expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------- stage 3

class _StubSegmenter(torch.nn.Module):
    """Spatially constant logits [0, 1, 2, 3] (so each layer's CE is a hand-computable
    -log softmax); one backbone and one head parameter."""

    def __init__(self, k):
        super().__init__()
        self.body = torch.nn.Parameter(torch.zeros(1))
        self.head = torch.nn.Parameter(torch.arange(k, dtype=torch.float32))

    def backbone_parameters(self):
        return [self.body]

    def head_parameters(self):
        return [self.head]

    def forward(self, x):
        n, _, h, w = x.shape
        return (self.head + self.body)[None, :, None, None].expand(n, -1, h, w) + 0.0 * x.mean()


def _run_segmenter(tmp_path, monkeypatch, batches):
    """train_segmenter (default options, 1 epoch) with a stub model; loss_of is evaluated on the
    given hand-made batches.  Returns (losses, train_epoch's arguments, the stub)."""
    import wsss.train.common as common
    import wsss.train.segmenter as segmenter
    from wsss.train.segmenter import SegmenterConfig, train_segmenter

    data = str(tmp_path / "data")
    names = ["p0-[1 0 0 1].png", "p1-[0 1 1 0].png"]
    _train_folder(data, names)
    pseudo = str(tmp_path / "pseudo")
    for layer in ("b4_5", "b5_2", "bn7"):
        for n in names:
            _png(os.path.join(pseudo, layer, n), np.zeros((8, 8), np.uint8), LUAD_HISTOSEG.palette_flat())
    stub = _StubSegmenter(K)
    monkeypatch.setattr(segmenter, "build_segmenter", lambda k, backbone, width: stub)
    seen = {}

    def fake_train_epoch(model, optimizer, loader, *, loss_of, **kw):
        seen.update(kw, optimizer=optimizer, losses=[loss_of(b)[0] for b in batches])
        raise _Stop

    monkeypatch.setattr(common, "train_epoch", fake_train_epoch)
    cfg = SegmenterConfig(data_root=data, mask_dir=pseudo, out_dir=str(tmp_path / "out"), epochs=1,
                          val_split=None, progress=False)
    with pytest.raises(_Stop):
        train_segmenter(cfg, resume=False)
    return seen["losses"], seen, stub


def _log_softmax_0123(c):
    return c - math.log(sum(math.exp(v) for v in range(4)))


def test_stage3_loss_weights_each_layers_mask_as_the_paper(tmp_path, monkeypatch):
    """Defects guarded: the weights 0.2/0.2/0.6 permuted or given to the wrong layer's mask,
    every term computed on the bn7 mask, background pixels scored.  METHOD: loss =
    0.2 CE(PM_b4_5) + 0.2 CE(PM_b5_2) + 0.6 CE(PM_bn7), background pixels carry no loss."""
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.int64)  # [N, layer (b4_5, b5_2, bn7), H, W]
    masks[:, 1] = 1
    masks[:, 2] = 2
    masks[:, :, 0, :] = 4  # background: no loss in any layer
    batch = {"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "masks": masks}
    (loss,), _, _ = _run_segmenter(tmp_path, monkeypatch, [batch])
    expected = -(0.2 * _log_softmax_0123(0) + 0.2 * _log_softmax_0123(1) + 0.6 * _log_softmax_0123(2))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_stage3_all_background_batch_carries_no_loss(tmp_path, monkeypatch):
    """Defect guarded: an all-background batch giving a nan loss (CE with every pixel ignored is
    0/0), which train_epoch reports as divergence.  METHOD: background pixels carry no loss (the
    reference's constant 100 logit makes such a batch a zero loss, not an error)."""
    batch = {"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "masks": torch.full((2, 3, 4, 4), 4)}
    (loss,), _, _ = _run_segmenter(tmp_path, monkeypatch, [batch])
    assert loss.requires_grad and float(loss.detach()) == 0.0


def test_stage3_optimiser_matches_the_reference(tmp_path, monkeypatch):
    """Defects guarded: ASPP+decoder not at 10x, weight decay or momentum missing, another poly
    power or base lr.  METHOD: SGD momentum 0.9, wd 5e-4, lr 0.01 (ASPP+decoder 10x), poly 0.9."""
    batch = {"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "masks": torch.zeros(2, 3, 4, 4, dtype=torch.int64)}
    _, seen, stub = _run_segmenter(tmp_path, monkeypatch, [batch])
    assert seen["base_lr"] == 0.01 and seen["poly_power"] == 0.9
    groups = {id(p): g for g in seen["optimizer"].param_groups for p in g["params"]}
    body, head = groups[id(stub.body)], groups[id(stub.head)]
    assert body["lr_mult"] == 1.0 and head["lr_mult"] == 10.0
    for g in (body, head):
        assert g["momentum"] == 0.9 and g["weight_decay"] == 5e-4


# ---------------------------------------------------------------------------------- the gate

def _gate_eval(seg_logits, cls_logits, truth_class, **kw):
    from wsss.synthetic import synthetic_description
    from wsss.train.segmenter import evaluate_segmenter

    class Seg(torch.nn.Module):
        def forward(self, x):
            return torch.tensor(seg_logits)[None, :, None, None].expand(x.shape[0], 4, *x.shape[2:])

    class Cls(torch.nn.Module):
        def forward(self, x):
            return torch.tensor(cls_logits).expand(x.shape[0], 4)

    items = [{"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "mask": torch.full((2, 2), truth_class),
              "name": "a"}]
    return evaluate_segmenter(Seg(), Cls(), items, synthetic_description(4), batch_size=1, **kw)


def test_gate_thresholds_sigmoid_probabilities_at_eps_0_1():
    """Defects guarded: the gate comparing raw logits (not sigmoid probabilities) with eps, or a
    default eps other than 0.1.  METHOD: o_k = 0 where sigmoid(fc8(...))_k <= 0.1."""
    # class 1 wins the segmentation; its logit -1 is a probability 0.27 > 0.1: it passes the gate
    out = _gate_eval([0.0, 5.0, 1.0, 1.0], [3.0, -1.0, 3.0, 3.0], truth_class=1)
    assert out["gated"]["acc"] == 1.0
    # logit -2.5 is a probability 0.076 <= 0.1: gated, the next class (2) wins
    out = _gate_eval([0.0, 5.0, 1.0, 0.5], [3.0, -2.5, 3.0, 3.0], truth_class=2)
    assert out["gated"]["acc"] == 1.0 and out["ungated"]["acc"] == 0.0


def test_gate_excludes_gated_classes_even_where_allowed_logits_are_negative():
    """Defect guarded: the reference's gate (raw logits times 0/1), under which a gated class
    scores 0 and wins where every allowed logit is negative.  METHOD: the gate must exclude gated
    classes outright."""
    out = _gate_eval([-1.0, -5.0, -2.0, -3.0], [-3.0, 3.0, 3.0, 3.0], truth_class=2)
    assert out["gated"]["acc"] == 1.0


# ---------------------------------------------------------------------------------- metrics

def test_fwiou_weights_by_ground_truth_frequency():
    """Defect guarded: FwIoU weighted by the predicted share.  METHOD: FwIoU = sum_k freq_k IoU_k
    with freq_k the ground-truth share."""
    from wsss.train.metrics import ConfusionMatrix

    cm = ConfusionMatrix(2, background_index=2)
    cm.update(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]))
    s = cm.scores()
    # IoU_0 = 2/3 (TP 2, FN 1), IoU_1 = 1/2 (TP 1, FP 1); truth shares 3/4 and 1/4
    assert s["fwiou"] == pytest.approx(3 / 4 * 2 / 3 + 1 / 4 * 1 / 2)


def test_background_prediction_is_no_vote_for_another_class():
    """Defect guarded: a prediction at index K (background) counted inside the K x K matrix,
    where t*K + K lands in the next row's first cell (a phantom pixel of class t+1 predicted as
    0).  METHOD: one K x K confusion matrix; a class in neither truth nor prediction is nan."""
    from wsss.train.metrics import ConfusionMatrix

    cm = ConfusionMatrix(2, background_index=2)
    cm.update(np.array([0, 0]), np.array([0, 2]))
    s = cm.scores()
    assert s["iou"]["0"] == pytest.approx(0.5) and math.isnan(s["iou"]["1"])
    assert s["miou"] == pytest.approx(0.5) and s["acc"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------- data

def test_labels_come_from_the_last_bracket_group_and_bracket_reads_both_forms():
    """Defects guarded: the label read from the first '[...]' of a name, and the "bracket" parser
    reading one form only.  METHOD: LUAD `...-[1 0 0 1].png` (spaced), BCSS `...[1101].png`."""
    assert parse_label("slide[ab]-1031280-[1 0 0 1].png", LUAD_HISTOSEG) == [1, 0, 0, 1]
    either = DatasetDescription(name="either", class_names=("A", "B", "C", "D"), palette=LUAD_HISTOSEG.palette,
                                background_index=4, label_parser="bracket")
    assert parse_label("x-[0 1 1 0].png", either) == [0, 1, 1, 0]
    assert parse_label("x+0[1101].png", either) == [1, 1, 0, 1]


def test_mask_index_k_is_refused_when_background_is_another_index(tmp_path):
    """Defect guarded: read_mask accepting index K as if it were background when the description's
    background index is not K.  Allowed: 0..K-1 and the background index."""
    d = DatasetDescription(name="bg255", class_names=("A", "B", "C", "D"), palette=LUAD_HISTOSEG.palette[:4],
                           background_index=255)
    path = str(tmp_path / "m.png")
    _png(path, np.full((4, 4), 4, np.uint8))
    with pytest.raises(DataError, match="palette index 4 out of range"):
        read_mask(path, d)
    _png(path, np.array([[0, 3], [255, 1]], np.uint8))
    assert read_mask(path, d).tolist() == [[0, 3], [255, 1]]


def test_rgb_masks_read_through_the_palette(tmp_path):
    """Defect guarded: RGB-coloured masks decoded with the channels swapped.  METHOD: LUAD palette
    0..4 = (205,51,51) (0,255,0) (65,105,225) (255,165,0) (255,255,255)."""
    rgb = np.array([[[205, 51, 51], [0, 255, 0], [65, 105, 225]], [[255, 165, 0], [255, 255, 255], [205, 51, 51]]],
                   np.uint8)
    path = str(tmp_path / "m.png")
    _png(path, rgb)
    assert read_mask(path, LUAD_HISTOSEG).tolist() == [[0, 1, 2], [3, 4, 0]]


def test_luad_background_rule_numbers():
    """Defect guarded: other numbers in LUAD's background rule.  METHOD: gray > 200, small
    objects (< 50 px) removed; BCSS keeps white as tissue."""
    luad = get_description("luad")
    assert luad.white_threshold == 200 and luad.min_object_px == 50 and not luad.background_is_tissue
    assert get_description("bcss").background_is_tissue


# ---------------------------------------------------------------------------------- pseudo masks

def test_background_beats_a_present_class_at_its_peak():
    """Defect guarded: the background channel scoring exactly 1, tying (and losing) with the
    normalised peak of a class.  METHOD: background becomes a channel with score just above 1."""
    from wsss.train.pseudo_masks import masks_from_cams

    cams = torch.tensor([[[[0.0, 5.0]], [[1.0, 2.0]]]])  # jointly normalised: [0, 1] and [0.2, 0.4]
    bg = torch.tensor([[[False, True]]])
    assert masks_from_cams(cams, torch.tensor([[1, 1]]), (1, 2), bg, 7)[0].tolist() == [[1, 7]]


def test_white_objects_of_50_px_stay_background():
    """Defect guarded: objects of exactly 50 px removed from the background.  METHOD: objects
    smaller than 50 px are removed (49 px go, 50 px stay)."""
    from wsss.train.pseudo_masks import background_mask

    img = np.full((1, 3, 30, 30), 100, np.uint8)
    img[:, :, 1:6, 1:11] = 255  # 5 x 10 = 50 px
    img[:, :, 20:27, 20:27] = 255  # 7 x 7 = 49 px
    bg = background_mask(torch.from_numpy(img), 200, 50)[0]
    assert bg[1:6, 1:11].all() and int(bg.sum()) == 50


def test_absent_classes_are_zeroed_after_the_joint_min_max():
    """Defect guarded: absent classes zeroed before the normalisation, so that the min-max runs
    over the present maps and zeros: a present class's lowest pixel then normalises to 0, ties
    with the absent class's 0 and the absent class (lower index) wins there.  METHOD: one joint
    min-max over all K maps, then maps of absent classes set to 0."""
    from wsss.train.pseudo_masks import masks_from_cams

    cams = torch.tensor([[[[-5.0, -5.0]], [[-1.0, 2.0]]]])  # class 0 absent, class 1 present
    out = masks_from_cams(cams, torch.tensor([[0, 1]]), (1, 2), None, 2)
    # joint min -5, max 2: class 1 -> [4/7, 1] beats the absent class's 0 everywhere
    assert out[0].tolist() == [[1, 1]]


@pytest.mark.parametrize("dataset, expect_background", [("luad", True), ("bcss", False)])
def test_white_pseudo_mask_pixels_are_background_for_luad_only(tmp_path, dataset, expect_background):
    """Defect guarded: the background rule applied to BCSS (or not to LUAD).  METHOD: LUAD's
    gray > 200 regions become background; BCSS keeps white regions as tissue."""
    from wsss.train import pseudo_masks as pm
    from wsss.train.classifier import build_classifier

    data = str(tmp_path / "data")
    label = "-[1 0 0 1]" if dataset == "luad" else "+0[1001]"
    for i in range(2):
        _png(os.path.join(data, "train", f"p{i}{label}.png"), np.full((16, 16, 3), 255, np.uint8))
    torch.manual_seed(0)
    ckpt = str(tmp_path / "c.pt")
    torch.save({"model": build_classifier(4, 1 / 16).state_dict(), "kind": "classifier"}, ckpt)
    pm.generate_pseudo_masks(pm.PseudoMaskConfig(data_root=data, checkpoint=ckpt, out_dir=str(tmp_path / "pm"),
                                                 dataset=dataset, batch_size=2, layers=("bn7",), progress=False))
    description = get_description(dataset)
    mask = read_mask(str(tmp_path / "pm" / "bn7" / f"p0{label}.png"), description)
    assert bool((mask == 4).all()) is expect_background
    if not expect_background:
        assert set(np.unique(mask).tolist()) <= {0, 3}

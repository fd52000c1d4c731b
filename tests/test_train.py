"""Training pieces: mu schedules, batched Grad-CAM == the reference loop, pseudo-mask rules,
resumable checkpoints, CLI errors.  Tiny networks and patches only."""
import json
import os

import numpy as np
import pytest
import torch

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
    # the reference multiplies only while mu > 0.65: 0.98 ** 21 = 0.654 still is, 0.98 ** 22 is not
    assert mu_for_epoch("reference", 22) == pytest.approx(0.98 ** 22)
    assert mu_for_epoch("reference", 30) == mu_for_epoch("reference", 22) == pytest.approx(0.6412, abs=1e-4)
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
    # each image is one of its four flips, and over a few draws every flip happens
    seen = set()
    for seed in range(40):
        out = random_flips(x, torch.Generator().manual_seed(seed))
        for i in range(2):
            flips = {(h, v): x[i].flip(*([-1] if h else []), *([-2] if v else [])) if (h or v) else x[i]
                     for h in (0, 1) for v in (0, 1)}
            match = [k for k, f in flips.items() if torch.equal(out[i], f)]
            assert match, (seed, i)
            seen.update(match)
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


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
    # (a frozen classifier and an input without grad: gradcam_maps makes its own graph)
    batched = gradcam_maps(tiny_classifier, x, batched_backward=True)
    per_class = gradcam_maps(tiny_classifier, x)
    assert not x.requires_grad
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


def test_gradcam_layers_are_the_named_blocks_outputs(tiny_classifier):
    """The Grad-CAM layers are the outputs of the modules METHOD names (b4_5, b5_2, ReLU(bn7)),
    caught by forward hooks: the batched Grad-CAM and its reference loop share feature_maps,
    so their agreement alone would not notice it returning another block."""
    caught = {}
    hooks = [getattr(tiny_classifier, name).register_forward_hook(
        lambda m, i, o, name=name: caught.__setitem__(name, o)) for name in ("b4_5", "b5_2", "bn7")]
    try:
        maps = tiny_classifier.feature_maps(torch.rand(2, 3, 40, 48))
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(maps["b4_5"], caught["b4_5"]) and torch.equal(maps["b5_2"], caught["b5_2"])
    assert torch.equal(maps["bn7"], torch.relu(caught["bn7"]))


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
    # One min-max over all K maps together (METHOD), not one per class: class 1's map peaks at 2,
    # so per class its 1.5 (0.75) would beat class 0's 4 of 10 (0.4); jointly 0.4 beats 0.15
    joint = torch.tensor([[[[0.0, 4.0, 10.0]], [[0.0, 1.5, 2.0]]]])
    assert masks_from_cams(joint, torch.tensor([[1, 1]]), (1, 3), None, 2)[0].tolist() == [[0, 0, 0]]


def test_background_mask_removes_small_white_specks():
    img = np.full((1, 3, 40, 40), 100, np.uint8)
    img[:, :, :20, :] = 250  # big white region -> background
    img[:, :, 30:33, 30:33] = 250  # 9 px speck -> stays tissue
    bg = background_mask(torch.from_numpy(img))
    assert bg[0, :20].all() and not bg[0, 30:33, 30:33].any() and not bg[0, 25:].any()


@pytest.mark.parametrize("rgb,background", [((201, 200, 200), False), ((202, 201, 201), True),
                                            ((200, 200, 210), True), ((200, 200, 200), False)])
def test_background_gray_is_the_references_rounded_luma(rgb, background):
    """The reference thresholds OpenCV's uint8 gray (rounded luma) at > 200: (201, 200, 200) has
    luma 200.3 but gray 200, so it is tissue (an unrounded luma called it background)."""
    img = torch.tensor(rgb, dtype=torch.uint8)[None, :, None, None].expand(1, 3, 16, 16)
    assert bool(background_mask(img).all()) is background and bool(background_mask(img).any()) is background


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


def test_resuming_with_other_options_is_refused_by_name(tmp_path, capsys):
    """A checkpoint left by a run with other options is not silently continued: the message
    names each difference and the way out; where and how the run goes may change."""
    from wsss.cli.train_cls import main

    data = str(tmp_path / "data")
    _tiny_dataset(data)
    base = [data, "--out", str(tmp_path / "o"), "--width", "0.0625", "--batch-size", "4", "--epochs", "2",
            "--quiet", "--max-steps-per-epoch", "1"]
    assert main(base + ["--stop-after-epochs", "1"]) == 0
    last = tmp_path / "o" / "classifier_last.pt"
    before = last.read_bytes()
    assert main(base + ["--lr", "0.1", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{last} was saved by a run with other options: --lr 0.01 (now 0.1); --seed 0 (now 3)" in err
    assert "--no-resume" in err and last.read_bytes() == before and not (tmp_path / "o" / "classifier.pt").exists()
    assert main(base + ["--workers", "0", "--device", "cpu"]) == 0  # resumed: same run
    assert (tmp_path / "o" / "classifier.pt").exists()


def test_segmenter_checkpoints_resume_exactly_and_say_when_unfinished(tmp_path, monkeypatch):
    """A stage-3 run killed after its first epoch and resumed trains exactly as an uninterrupted
    one (dropout masks from a per-epoch seed); until the run ends its best checkpoint says it is
    unfinished, and reading it warns."""
    import wsss.train.common as common
    from wsss.models.checkpoints import read_checkpoint
    from wsss.train.segmenter import SegmenterConfig, train_segmenter

    data = str(tmp_path / "data")
    _tiny_dataset(data)
    kw = dict(data_root=data, mask_dir=os.path.join(data, "train_truth"), layers=("",), layer_weights=(1.0,),
              backbone="resnet50", width=1 / 16, epochs=2, batch_size=4, progress=False, seed=1, val_split="val")
    straight = train_segmenter(SegmenterConfig(out_dir=str(tmp_path / "a"), **kw))

    class Killed(Exception):
        pass

    real_save = common.save_atomic

    def save_then_die(obj, path):
        if obj["epoch"] == 1:  # NB: not only at segmenter_last.pt: whether epoch 2 writes a best
            raise Killed  # checkpoint first depends on float rounding (this CPU's kernels)
        real_save(obj, path)

    monkeypatch.setattr(common, "save_atomic", save_then_die)
    with pytest.raises(Killed):
        train_segmenter(SegmenterConfig(out_dir=str(tmp_path / "b"), **kw))
    monkeypatch.setattr(common, "save_atomic", real_save)
    best = str(tmp_path / "b" / "segmenter_best.pt")
    with pytest.warns(UserWarning, match=r"unfinished training run \(epoch 1 of 2\)"):
        read_checkpoint(best)
    resumed = train_segmenter(SegmenterConfig(out_dir=str(tmp_path / "b"), **kw))
    a = torch.load(straight["last"], weights_only=True)
    b = torch.load(resumed["last"], weights_only=True)
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]
    # the patch size a bundle of it runs at (wsss-export's default --tile-size)
    assert a["config"]["patch_size"] == 32  # (_tiny_dataset's patches)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], msg=k)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_checkpoint(resumed["best"]).kind == "segmenter"  # finished: no warning


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


@pytest.mark.parametrize("command,extra,message", [
    ("train_cls", ["--lr", "-0.1"], "--lr must be positive, got -0.1"),
    ("train_cls", ["--momentum", "-1"], "--momentum must be in [0, 1), got -1.0"),
    ("train_cls", ["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    ("train_cls", ["--workers", "-1"], "--workers must be 0 or more, got -1"),
    ("train_cls", ["--width", "0.001"], "--width must be in [1/64, 4]"),
    ("train_cls", ["--max-steps-per-epoch", "-1"], "--max-steps-per-epoch must be at least 1, got -1"),
    ("train_cls", ["--stop-after-epochs", "0"], "--stop-after-epochs must be at least 1, got 0"),
    ("train_cls", ["--epochs", "0"], "--epochs must be at least 1"),
    ("train_seg", ["--masks", "m", "--gate-eps", "5"], "--gate-eps must be in [0, 1), got 5.0"),
    ("train_seg", ["--masks", "m", "--tile-size", "0"], "--tile-size must be between 16 and 8192 pixels"),
    ("train_seg", ["--masks", "m", "--lr", "nan"], "--lr must be positive, got nan"),
    ("pseudo_masks", ["--classifier", "c.pt", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("pseudo_masks", ["--classifier", "c.pt", "--layers", ""], "--layers names no layer"),
    ("eval", ["--segmenter", "s.pt", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("eval", ["--segmenter", "s.pt", "--gate-eps", "-3"], "--gate-eps must be in [0, 1), got -3.0"),
])
def test_cli_bad_numbers_are_one_line_before_any_work(tmp_path, capsys, command, extra, message):
    import importlib

    main = importlib.import_module(f"wsss.cli.{command}").main
    out = [] if command == "eval" else ["--out", str(tmp_path / "o")]
    assert main([str(tmp_path / "data")] + out + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_training_cli_speaks_infers_names():
    """--precision float32/bfloat16 and --no-progress as wsss-infer spells them."""
    from wsss.cli.train_cls import build_parser

    a = build_parser().parse_args(["d", "--out", "o", "--precision", "bfloat16", "--no-progress"])
    assert (a.precision, a.quiet) == ("bf16", True)
    assert build_parser().parse_args(["d", "--out", "o", "--precision", "fp32"]).precision == "fp32"
    # and the output the same ways in every command (-o / --out / --output)
    import importlib

    for command in ("train_cls", "train_seg", "pseudo_masks", "export", "infer"):
        parser = importlib.import_module(f"wsss.cli.{command}").build_parser()
        dest = "output" if command == "infer" else "out"
        [action] = [a for a in parser._actions if a.dest == dest]
        assert {"-o", "--out", "--output"} <= set(action.option_strings), command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["d", "--out", "o", "--precision", "int8"])


def test_pseudo_masks_truth_folder_checked_first(tmp_path, capsys):
    from wsss.cli.pseudo_masks import main

    assert main([str(tmp_path), "--classifier", "c.pt", "--out", str(tmp_path / "o"),
                 "--truth", str(tmp_path / "nonexist")]) == 2
    assert f"--truth {tmp_path / 'nonexist'}: no such folder" in capsys.readouterr().err


def test_cli_unusable_output_paths_are_one_line(tmp_path, capsys):
    from wsss.cli.eval import main as eval_main
    from wsss.cli.train_cls import main as cls_main
    from wsss.cli.train_seg import main as seg_main

    (tmp_path / "afile").write_text("x")
    assert cls_main([str(tmp_path), "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert f"--out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    assert cls_main([str(tmp_path), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert eval_main([str(tmp_path), "--segmenter", "s.pt", "--json", str(tmp_path / "afile" / "x.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert seg_main([str(tmp_path), "--masks", "m", "--out", str(tmp_path / "o"), "--classifier", str(tmp_path / "afile"),
                     "--bundle", str(tmp_path)]) == 2
    assert f"--bundle {tmp_path}: is a folder, not a file" in capsys.readouterr().err


def test_cli_unwritable_output_folder_is_one_line_before_any_work(tmp_path, capsys, unwritable_folder):
    from wsss.cli.eval import main as eval_main
    from wsss.cli.train_cls import main as cls_main

    out = unwritable_folder / "run"
    assert cls_main([str(tmp_path), "--out", str(out)]) == 2
    assert f"--out {out}: {unwritable_folder} cannot be written" in capsys.readouterr().err
    assert eval_main([str(tmp_path), "--segmenter", "s.pt", "--json", str(out / "m.json")]) == 2
    assert f"--json {out / 'm.json'}: {unwritable_folder} cannot be written" in capsys.readouterr().err
    assert not out.exists()


def test_metrics_json_is_strict_json(tmp_path):
    """An absent class's IoU is NaN: written as null (bare NaN is not JSON)."""
    import json

    import numpy as np

    from wsss.cli.eval import write_json

    write_json(str(tmp_path / "m.json"), {"iou": {"TAS": float("nan"), "TE": np.float32(0.5)}, "n": np.int64(3),
                                          "per": [float("inf"), 1.0]})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"iou": {"TAS": None, "TE": 0.5}, "n": 3, "per": [None, 1.0]}


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

    class GatesAll(torch.nn.Module):
        def forward(self, x):  # every class gated: gate_argmax keeps the ungated decision
            return torch.full((x.shape[0], 4), -3.0)

    out = evaluate_segmenter(Segmenter(), GatesAll(), items, description, batch_size=2, eps=0.1)
    assert out["gated"]["acc"] == out["ungated"]["acc"]
    assert out["gate"]["pixels_true_class_gated"] == 0.0 and out["gate"]["present_gated"] == 0.0
    assert out["gate"]["absent_passed"] == 1.0


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_on_a_cpu_without_bf16_units_is_flagged(monkeypatch, fast):
    import warnings

    import wsss.bundle
    from wsss.train.common import autocast

    monkeypatch.setattr(wsss.bundle, "cpu_reduced_precision_supported", lambda dtype: fast)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with autocast(torch.device("cpu"), "bf16"):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        with autocast(torch.device("cpu"), "fp32"):
            pass
    flagged = [str(w.message) for w in seen if "no fast bfloat16 kernels" in str(w.message)]
    assert len(flagged) == (0 if fast else 1)


def test_resolve_device_is_every_commands_device_check():
    from wsss.errors import WsssError
    from wsss.train.common import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("foo", "mps", "cuda:x"):
        with pytest.raises(WsssError, match="is not a device"):
            resolve_device(bad)
    with pytest.raises(WsssError, match="CUDA is not available" if not torch.cuda.is_available() else "CUDA device"):
        resolve_device("cuda:99")


def test_step_plan_counts_the_batches_an_epoch_runs():
    """The poly schedule's length is the optimiser steps actually taken: the loaders drop the last
    short batch (LUAD: 16678 patches, batch 20 -> 833 steps per epoch, as the reference's
    len(dataset) // batch_size), except where the data make only one batch."""
    from wsss.train.common import drops_last, make_loader, step_plan

    assert step_plan(16678, 20, 20, None) == (833, 16660)
    assert step_plan(10, 20, 3, None) == (1, 3)
    assert step_plan(45, 20, 2, 1) == (1, 2)
    for n, bs in ((45, 20), (40, 20), (7, 20)):
        loader = make_loader(list(range(n)), bs, shuffle=True, seed=0, drop_last=drops_last(n, bs))
        assert len(list(loader)) == step_plan(n, bs, 1, None)[0], (n, bs)


def test_init_weights_are_checked_and_a_resume_needs_no_init(tmp_path, capsys):
    """--init from another network (here another --width) is one message naming the file, not a
    traceback; a run started from --init resumes without it (its weights are in the checkpoint)
    and keeps its frozen layers."""
    from wsss.cli.train_cls import main
    from wsss.train.classifier import build_classifier

    data = str(tmp_path / "data")
    _tiny_dataset(data)
    init = tmp_path / "init.pt"
    torch.save(build_classifier(4, 1 / 8).state_dict(), init)
    base = [data, "--out", str(tmp_path / "o"), "--width", "0.0625", "--batch-size", "4", "--epochs", "2",
            "--quiet", "--max-steps-per-epoch", "1"]
    assert main(base + ["--init", str(init)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--init {init}: does not match the network:" in err and "shape mismatches" in err and "\n" not in err, err
    torch.save(build_classifier(4, 1 / 16).state_dict(), init)
    assert main(base + ["--init", str(init), "--stop-after-epochs", "1"]) == 0
    assert main(base) == 0, capsys.readouterr().err  # resumed without --init
    ckpt = torch.load(tmp_path / "o" / "classifier.pt", weights_only=True)
    assert ckpt["config"]["freeze_resolved"] == "reference" and ckpt["epoch"] == 1


def test_classifier_init_may_lack_batchnorm_counters(tmp_path):
    """The reference code's MXNet -> PyTorch converter writes no num_batches_tracked (and no fc8):
    such a file is a valid --init; a missing weight is still one message."""
    from wsss.errors import BundleError
    from wsss.train.classifier import _load_init, build_classifier

    source = build_classifier(4, 1 / 16)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in source.state_dict().items()
             if not k.endswith("num_batches_tracked") and not k.startswith("fc8")}
    torch.save(state, tmp_path / "a1.pth")
    model = build_classifier(4, 1 / 16)
    _load_init(model, str(tmp_path / "a1.pth"))
    assert torch.equal(model.state_dict()["b2.conv_branch2a.weight"], state["b2.conv_branch2a.weight"])
    del state["b2.conv_branch2a.weight"]
    torch.save(state, tmp_path / "a1.pth")
    with pytest.raises(BundleError, match=r"1 missing keys: b2.conv_branch2a.weight"):
        _load_init(model, str(tmp_path / "a1.pth"))


def test_segmenter_init_takes_a_resnet_backbone(tmp_path, capsys):
    """wsss-train-seg --init: a ResNet state_dict in torchvision's names (fc.* ignored, no BN
    counters needed) starts the backbone; one of another depth, or stage 1's classifier, is one
    message naming the file and the --backbone / --width it had to fit."""
    from wsss.cli.train_seg import main
    from wsss.train.classifier import build_classifier
    from wsss.train.segmenter import build_segmenter

    data = str(tmp_path / "data")
    _tiny_dataset(data)
    torch.manual_seed(5)
    resnet = {k: v for k, v in build_segmenter(4, "resnet50", 1 / 16).backbone.state_dict().items()
              if not k.endswith("num_batches_tracked")}
    resnet["fc.weight"] = torch.zeros(1000, 128)  # (an ImageNet head: ignored)
    init = tmp_path / "resnet50.pth"
    torch.save(resnet, init)

    def train(out, backbone="resnet50"):
        return main([data, "--masks", os.path.join(data, "train_truth"), "--layers", ".", "--layer-weights", "1",
                     "--backbone", backbone, "--width", "0.0625", "--epochs", "1", "--batch-size", "4",
                     "--max-steps-per-epoch", "1", "--val-split", "none", "--lr", "1e-9", "--quiet",
                     "-o", str(tmp_path / out), "--init", str(init)])

    assert train("o") == 0, capsys.readouterr().err
    trained = torch.load(tmp_path / "o" / "segmenter_last.pt", weights_only=True)["model"]
    for key in ("conv1.weight", "layer4.2.conv3.weight"):  # (lr 1e-9: one step moves nothing visible)
        torch.testing.assert_close(trained["backbone." + key], resnet[key], rtol=0, atol=1e-6)
    assert train("p", backbone="resnet101") == 2
    err = capsys.readouterr().err.strip()
    assert f"--init {init} (for --backbone resnet101 --width 0.0625): does not match the network:" in err, err
    assert "missing keys: layer3." in err and "\n" not in err
    torch.save(build_classifier(4, 1 / 16).state_dict(), init)
    assert train("q") == 2
    assert "is a ResNet-38 classifier" in capsys.readouterr().err


def test_patches_of_mixed_sizes_are_one_message(tmp_path, capsys):
    """A patch of another size in the train split: one message naming two files (it was
    torch.stack's "stack expects each tensor to be equal size" traceback)."""
    from PIL import Image

    from wsss.cli.train_cls import main

    data = tmp_path / "data"
    _tiny_dataset(str(data))
    train = data / "train"
    odd = sorted(train.iterdir())[0]
    Image.open(odd).resize((40, 40)).save(odd)
    rc = main([str(data), "--out", str(tmp_path / "o"), "--width", "0.0625", "--batch-size", "12", "--epochs", "1",
               "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "patches of different sizes:" in err and "is 40x40 px" in err and "\n" not in err, err


def test_a_killed_pseudo_mask_run_is_not_taken_for_a_finished_one(tmp_path, monkeypatch):
    """A run killed while it computes leaves an older complete folder as it was (its masks wait
    in a staging folder); one killed while its masks move into place would leave a mix of two
    runs: the folder carries a marker until the last mask is in place and the manifest written,
    and training refuses a folder with it; a finished rerun clears it."""
    import wsss.train.pseudo_masks as pm
    from wsss.data import PseudoMaskPatches, get_description
    from wsss.errors import DataError
    from wsss.train.classifier import build_classifier

    data = str(tmp_path / "data")
    _tiny_dataset(data)
    ckpt = tmp_path / "c.pt"
    torch.save(build_classifier(4, 1 / 16).state_dict(), ckpt)
    cfg = pm.PseudoMaskConfig(data_root=data, checkpoint=str(ckpt), out_dir=str(tmp_path / "pm"), batch_size=4,
                              layers=("bn7",), progress=False)
    pm.generate_pseudo_masks(cfg)
    description = get_description("auto", data)
    PseudoMaskPatches(data, cfg.out_dir, ["bn7"], description)  # (complete: accepted)

    def killed_on_call(real, n):
        calls = [0]

        def killed(*a, **kw):
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt
            real(*a, **kw)
        return killed

    monkeypatch.setattr(pm, "save_png", killed_on_call(pm.save_png, 3))
    with pytest.raises(KeyboardInterrupt):
        pm.generate_pseudo_masks(cfg)
    PseudoMaskPatches(data, cfg.out_dir, ["bn7"], description)  # (the earlier run's, untouched)
    monkeypatch.undo()
    monkeypatch.setattr(pm, "_move", killed_on_call(pm._move, 2))
    with pytest.raises(KeyboardInterrupt):
        pm.generate_pseudo_masks(cfg)
    with pytest.raises(DataError, match="from a wsss-pseudo-masks run that did not finish"):
        PseudoMaskPatches(data, cfg.out_dir, ["bn7"], description)
    monkeypatch.undo()
    pm.generate_pseudo_masks(cfg)
    PseudoMaskPatches(data, cfg.out_dir, ["bn7"], description)


def test_train_cls_warns_when_the_loss_barely_moved(tmp_path, capsys, monkeypatch):
    import wsss.train.classifier as classifier
    from wsss.cli.train_cls import main as cls_main

    def fake(history):
        return lambda cfg, resume=True: {"checkpoint": str(tmp_path / "classifier.pt"), "finished": True,
                                         "history": [{"epoch": i, "loss": v} for i, v in enumerate(history)]}

    monkeypatch.setattr(classifier, "train_classifier", fake([0.70, 0.69, 0.68, 0.67]))
    assert cls_main([str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "warning: the loss barely moved (0.7000 in the first epoch, 0.6700 in the last)" in capsys.readouterr().err
    monkeypatch.setattr(classifier, "train_classifier", fake([0.70, 0.50, 0.30, 0.20]))
    assert cls_main([str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_choices_are_the_libraries_own():
    """The training commands spell their choices out (their --help imports no torch); they must
    stay the ones the library accepts."""
    from wsss.cli.train_cls import build_parser as cls_parser
    from wsss.cli.train_seg import build_parser as seg_parser
    from wsss.models.deeplab import BACKBONE_LAYERS
    from wsss.train.classifier import MU_SCHEDULES

    def choices(parser, dest):
        return tuple(next(a for a in parser._actions if a.dest == dest).choices)

    assert choices(cls_parser(), "mu_schedule") == tuple(MU_SCHEDULES)
    assert set(choices(seg_parser(), "backbone")) == set(BACKBONE_LAYERS)


def test_the_four_commands_end_to_end(tmp_path, capsys, monkeypatch):
    """wsss-train-cls -> wsss-pseudo-masks -> wsss-train-seg --bundle -> wsss-eval through their
    main(), one tiny step each: the options only the commands handle (--layers with '.',
    --val-split none, the bundle written after training through wsss-export's path, eval's
    --json) work together."""
    from wsss.bundle import load_bundle
    from wsss.cli.eval import main as eval_main
    from wsss.cli.pseudo_masks import main as pm_main
    from wsss.cli.train_cls import main as cls_main
    from wsss.cli.train_seg import main as seg_main

    data = str(tmp_path / "data")
    _tiny_dataset(data)
    small = ["--batch-size", "4", "--epochs", "1", "--max-steps-per-epoch", "1", "--quiet"]
    assert cls_main([data, "--out", str(tmp_path / "cls"), "--width", "0.0625"] + small) == 0
    clf = str(tmp_path / "cls" / "classifier.pt")
    assert pm_main([data, "--classifier", clf, "--out", str(tmp_path / "pm"), "--layers", "bn7", "--batch-size", "4",
                    "--quiet"]) == 0
    bundle = tmp_path / "b.pt"
    assert seg_main([data, "--masks", str(tmp_path / "pm" / "bn7"), "--layers", ".", "--layer-weights", "1",
                     "--out", str(tmp_path / "seg"), "--backbone", "resnet50", "--width", "0.0625",
                     "--val-split", "none", "--classifier", clf, "--bundle", str(bundle)] + small) == 0
    b = load_bundle(bundle)
    assert b.metadata["tile_size"] == 32 and b.metadata["config"]["segmenter"]["train_config"]["patch_size"] == 32
    assert b.metadata["synthetic_only"] is True  # (trained on wsss.synthetic data: wsss-infer warns on real slides)
    report = tmp_path / "m.json"
    assert eval_main([data, "--segmenter", str(tmp_path / "seg" / "segmenter_best.pt"), "--classifier", clf,
                      "--json", str(report), "--quiet"]) == 0
    metrics = json.loads(report.read_text())
    assert set(metrics) >= {"ungated", "gated"} and 0.0 <= metrics["ungated"]["acc"] <= 1.0
    # --workers reaches the loader (it was accepted and ignored): same numbers from a worker process
    import wsss.train.common as common

    loaders = []
    real_make_loader = common.make_loader
    monkeypatch.setattr(common, "make_loader",
                        lambda *a, **k: loaders.append(k.get("workers")) or real_make_loader(*a, **k))
    assert eval_main([data, "--segmenter", str(tmp_path / "seg" / "segmenter_best.pt"), "--classifier", clf,
                      "--json", str(report), "--quiet", "--workers", "1"]) == 0
    assert loaders == [1] and json.loads(report.read_text()) == metrics


def _seg_args(data, masks, out, *extra):
    """wsss-train-seg arguments for one tiny step on ``masks`` (a folder of masks, --layers .)."""
    return [str(data), "--masks", str(masks), "--layers", ".", "--layer-weights", "1", "--backbone", "resnet50",
            "--width", "0.0625", "--epochs", "1", "--max-steps-per-epoch", "1", "--val-split", "none", "--quiet",
            "-o", str(out)] + list(extra)


def test_a_batch_of_one_is_refused_up_front(tmp_path, capsys):
    """Training BatchNorm needs 2 patches per batch: stage 3's ASPP image pooling sees 1x1 maps, so
    --batch-size 1 (or a one-patch train split) ended in torch's "Expected more than 1 value per
    channel when training" traceback, as stage 1 did on small patches.  Each is one line before
    any work (stage 1 with frozen BatchNorm, from --init weights, may use batches of one), and no
    other configuration forms a batch of one (a short last batch is dropped)."""
    import shutil

    from wsss.cli.train_cls import main as cls_main
    from wsss.cli.train_seg import main as seg_main
    from wsss.train.classifier import build_classifier
    from wsss.train.common import drops_last, make_loader, step_plan

    data = tmp_path / "data"
    _tiny_dataset(str(data), n=4)
    one = tmp_path / "one"
    shutil.copytree(data, one)
    for p in sorted((one / "train").iterdir())[1:]:
        p.unlink()
    masks = data / "train_truth"
    cls = ["-o", str(tmp_path / "c"), "--width", "0.0625", "--epochs", "1", "--max-steps-per-epoch", "1", "--quiet"]
    for main, args, message in [
            (seg_main, _seg_args(data, masks, tmp_path / "s", "--batch-size", "1"),
             "--batch-size must be at least 2 for stage 3, got 1: training BatchNorm needs 2 patches per batch"),
            (seg_main, _seg_args(one, masks, tmp_path / "s", "--batch-size", "4"),
             f"the train split {one / 'train'} has 1 patch; stage 3 needs at least 2"),
            (cls_main, [str(data), "--batch-size", "1"] + cls, "--batch-size must be at least 2 for stage 1, got 1"),
            (cls_main, [str(one), "--batch-size", "4"] + cls, "has 1 patch; stage 1 needs at least 2")]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()
    init = tmp_path / "init.pt"
    torch.save(build_classifier(4, 1 / 16).state_dict(), init)
    assert cls_main([str(data), "--batch-size", "1", "--init", str(init)] + cls) == 0, capsys.readouterr().err
    for n in range(2, 12):
        for bs in range(2, 7):
            sizes = [len(b) for b in make_loader(list(range(n)), bs, shuffle=True, seed=0,
                                                 drop_last=drops_last(n, bs))]
            assert min(sizes) >= 2 and len(sizes) == step_plan(n, bs, 1, None)[0], (n, bs, sizes)


def test_resuming_on_other_data_is_refused_by_name(tmp_path, capsys):
    """A run resumed on other data (4 of its 8 patches, another label, regenerated masks) was
    silently continued, its steps per epoch and poly schedule changed: the checkpoint carries
    a fingerprint of the data (patch names and labels, mask names and sizes) and such a resume
    is one line naming what changed.  A moved copy of the data resumes, and so does a checkpoint
    from before the fingerprint."""
    import shutil

    from PIL import Image

    from wsss.cli.train_cls import main as cls_main
    from wsss.cli.train_seg import main as seg_main

    data = tmp_path / "data"
    _tiny_dataset(str(data), n=8)
    sub, relabelled, moved = tmp_path / "sub", tmp_path / "relabelled", tmp_path / "moved"
    for d in (sub, relabelled, moved):
        shutil.copytree(data, d)
    for p in sorted((sub / "train").iterdir())[4:]:
        p.unlink()
    first = sorted((relabelled / "train").iterdir())[0]
    label = first.name[first.name.rindex("["):]
    first.rename(first.with_name(first.name.replace(label, "[1 1 1 1].png" if label != "[1 1 1 1].png"
                                                    else "[1 0 0 0].png")))
    out = tmp_path / "o"
    base = ["--out", str(out), "--width", "0.0625", "--batch-size", "2", "--epochs", "2", "--max-steps-per-epoch",
            "1", "--quiet"]
    assert cls_main([str(data)] + base + ["--stop-after-epochs", "1"]) == 0
    last = out / "classifier_last.pt"
    before = last.read_bytes()
    for other, change in ((sub, "the train split had 8 patches, now 4"),
                          (relabelled, "the train split's patch names or labels changed (8 patches)")):
        assert cls_main([str(other)] + base) == 2
        err = capsys.readouterr().err.strip()
        assert f"{last} was saved by a run on other data: {change}. Resume it with the same data, or start over " \
               f"with --no-resume" in err and "\n" not in err, err
        assert last.read_bytes() == before and not (out / "classifier.pt").exists()
    assert cls_main([str(moved)] + base) == 0, capsys.readouterr().err
    # a checkpoint without the fingerprint (an older wsss) resumes
    assert cls_main([str(data)] + base + ["--no-resume", "--stop-after-epochs", "1"]) == 0
    ckpt = torch.load(last, weights_only=True)
    del ckpt["config"]["train_data"]
    torch.save(ckpt, last)
    assert cls_main([str(data)] + base) == 0, capsys.readouterr().err
    assert torch.load(out / "classifier.pt", weights_only=True)["config"]["train_data"]["train"]["patches"] == 8

    masks, other_masks = tmp_path / "masks", tmp_path / "other_masks"
    shutil.copytree(data / "train_truth", masks)
    shutil.copytree(masks, other_masks)
    m = sorted(other_masks.iterdir())[0]
    img = Image.open(m)
    arr = np.array(img)
    arr[:8, :8] = (arr[:8, :8] + 1) % 4
    changed = Image.fromarray(arr, mode="P")
    changed.putpalette(img.getpalette())
    changed.save(m, compress_level=0)
    seg_out = tmp_path / "s"
    assert seg_main(_seg_args(data, masks, seg_out, "--batch-size", "4")) == 0
    best = (seg_out / "segmenter_best.pt").read_bytes()
    assert seg_main(_seg_args(data, other_masks, seg_out, "--batch-size", "4")) == 2
    err = capsys.readouterr().err.strip()
    assert "segmenter_last.pt was saved by a run on other data: the masks in --masks are not the ones it trained " \
           "on (8 mask files, other sizes or names)" in err and "\n" not in err, err
    assert (seg_out / "segmenter_best.pt").read_bytes() == best
    assert seg_main(_seg_args(sub, masks, seg_out, "--batch-size", "4")) == 2
    assert "the train split had 8 patches, now 4" in capsys.readouterr().err
    shutil.move(str(masks), str(tmp_path / "masks_moved"))
    assert seg_main(_seg_args(moved, tmp_path / "masks_moved", seg_out, "--batch-size", "4")) == 0


def test_a_diverged_run_leaves_no_result(tmp_path, capsys):
    """--lr 1e30: one step leaves finite weights (~1e29) whose outputs are NaN; only the loss
    before each step was checked, so the run ended with exit 0 and a finished classifier.pt.
    The weights and the outputs of a training patch are checked after every epoch: the run
    fails with the divergence message and writes nothing that looks like a result."""
    from wsss.cli.train_cls import main as cls_main
    from wsss.cli.train_seg import main as seg_main

    data = tmp_path / "data"
    _tiny_dataset(str(data), n=4)
    out = tmp_path / "c"
    assert cls_main([str(data), "-o", str(out), "--width", "0.0625", "--epochs", "1", "--batch-size", "4", "--lr",
                     "1e30", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "classifier training diverged at epoch 1, after step 0 (" in err and "lower --lr" in err, err
    assert not (out / "classifier.pt").exists() and not (out / "classifier_last.pt").exists()
    seg_out = tmp_path / "s"
    assert seg_main(_seg_args(data, data / "train_truth", seg_out, "--batch-size", "4", "--lr", "1e30")) == 2
    err = capsys.readouterr().err.strip()
    assert "segmenter training diverged at epoch 1, after step 0 (" in err and "lower --lr" in err, err
    assert not (seg_out / "segmenter_best.pt").exists() and not (seg_out / "segmenter_last.pt").exists()
    from wsss.train.common import nonfinite_state

    model = torch.nn.Linear(2, 2)
    assert nonfinite_state(model, torch.ones(1, 2)) is None
    with torch.no_grad():
        model.weight[0, 0] = 1e38
    assert nonfinite_state(model, None) is None
    assert nonfinite_state(model, torch.full((1, 2), 1e3)) == "its outputs on training patches are not finite"
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert nonfinite_state(model, None) == "weight bias is not finite"


def test_starting_over_removes_the_previous_runs_results(tmp_path, capsys, monkeypatch):
    """A run that starts over (--no-resume) and is interrupted left the previous run's final
    classifier.pt (finished, other options) beside its own classifier_last.pt, and the next
    stage took it; in stage 3 the previous run's finished segmenter_last.pt stayed beside the new
    run's first segmenter_best.pt (a resume then marked that one finished).  The previous run's
    files go, with one line, when the new run writes its first checkpoint; a new run that fails
    before that leaves them."""
    import wsss.train.common as common
    from wsss.cli.train_cls import main as cls_main
    from wsss.train.classifier import build_classifier
    from wsss.train.segmenter import SegmenterConfig, train_segmenter

    data = tmp_path / "data"
    _tiny_dataset(str(data), n=4)
    out = tmp_path / "c"
    base = [str(data), "-o", str(out), "--width", "0.0625", "--batch-size", "4", "--max-steps-per-epoch", "1"]
    assert cls_main(base + ["--epochs", "1", "--quiet"]) == 0
    final = out / "classifier.pt"
    old = final.read_bytes()
    wrong_init = tmp_path / "init.pt"
    torch.save(build_classifier(4, 1 / 8).state_dict(), wrong_init)  # (another --width: refused)
    assert cls_main(base + ["--epochs", "1", "--quiet", "--no-resume", "--init", str(wrong_init)]) == 2
    assert final.read_bytes() == old
    capsys.readouterr()
    assert cls_main(base + ["--epochs", "2", "--quiet", "--no-resume", "--stop-after-epochs", "1"]) == 0
    assert f"starting over: removed the previous run's classifier.pt, classifier_last.pt from {out}" in \
        capsys.readouterr().out
    assert not final.exists()
    last = torch.load(out / "classifier_last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["finished"] is False and last["config"]["epochs"] == 2

    kw = dict(data_root=str(data), mask_dir=str(data / "train_truth"), layers=("",), layer_weights=(1.0,),
              backbone="resnet50", width=1 / 16, epochs=1, batch_size=4, max_steps_per_epoch=1, progress=False,
              val_split=None, out_dir=str(tmp_path / "s"))
    train_segmenter(SegmenterConfig(**kw))

    class Killed(Exception):
        pass

    real_save = common.save_atomic

    def killed_at_last(obj, path):
        if path.endswith("segmenter_last.pt"):
            raise Killed
        real_save(obj, path)

    monkeypatch.setattr(common, "save_atomic", killed_at_last)
    with pytest.raises(Killed):
        train_segmenter(SegmenterConfig(**dict(kw, epochs=2)), resume=False)
    monkeypatch.setattr(common, "save_atomic", real_save)
    assert not (tmp_path / "s" / "segmenter_last.pt").exists()
    best = torch.load(tmp_path / "s" / "segmenter_best.pt", weights_only=True)
    assert best["finished"] is False and best["config"]["epochs"] == 2

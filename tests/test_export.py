"""wsss-export: checkpoints (reference and wsss formats) -> bundle (+ .pt2), self-check, clear errors."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from wsss.bundle import load_bundle
from wsss.cli.export import compare_outputs, main
from wsss.errors import BundleError
from wsss.models import DeepLabV3Plus, ResNet38Classifier, TissueSegmenter

warnings.filterwarnings("ignore", category=FutureWarning)

WIDTH = 0.0625


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    clf = ResNet38Classifier(4, width=WIDTH).eval()
    seg = DeepLabV3Plus(4, backbone="resnet50", width=WIDTH).eval()
    # reference formats: stage 1 plain state_dict, stage 2 {'state_dict', 'optimizer'}
    torch.save(clf.state_dict(), folder / "stage1.pth")
    torch.save({"state_dict": seg.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, folder / "stage2.pth")
    # wsss training format
    torch.save({"model": seg.state_dict(), "config": {"dataset": "bcss", "lr": 0.01}, "epoch": 3,
                "optimizer": {}, "kind": "segmenter"}, folder / "seg_wsss.pt")
    return folder, clf, seg


def test_help_is_fast_and_lists_flags():
    out = subprocess.run([sys.executable, "-c", "import sys; from wsss.cli.export import main; sys.exit(main(['--help']))"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--classifier" in out.stdout and "--pt2" in out.stdout


def test_export_reference_checkpoints_to_bundle(checkpoints, tmp_path, capsys):
    folder, clf, seg = checkpoints
    out = tmp_path / "model.pt"
    rc = main(["--classifier", str(folder / "stage1.pth"), "--segmenter", str(folder / "stage2.pth"),
               "--out", str(out), "--tile-size", "48", "--dataset", "luad", "--eps", "0.2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "self-check bundle: label agreement 1.00000" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp files left
    bundle = load_bundle(out)
    meta = bundle.metadata
    assert meta["class_names"] == ["TE", "NEC", "LYM", "TAS"] and meta["background_index"] == 4
    assert meta["tile_size"] == 48 and meta["gate_eps"] == 0.2 and meta["mpp"] == 1.0
    assert meta["config"]["segmenter"]["format"] == "reference-stage2"
    assert meta["config"]["classifier"]["format"] == "reference-stage1"
    tiles = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    expected = TissueSegmenter(clf, seg, eps=0.2).eval()(tiles, True)
    for a, b in zip(bundle.module(tiles, True), expected):
        assert torch.equal(a, b)


def test_export_wsss_checkpoint_takes_dataset_from_config(checkpoints, tmp_path):
    folder, _, _ = checkpoints
    assert main(["--classifier", str(folder / "stage1.pth"), "--segmenter", str(folder / "seg_wsss.pt"),
                 "--out", str(tmp_path / "m.pt"), "--tile-size", "32"]) == 0
    meta = load_bundle(tmp_path / "m.pt").metadata
    assert meta["class_names"] == ["TUM", "STR", "LYM", "NEC"] and meta["mpp"] == 0.25
    assert meta["config"]["segmenter"]["train_config"]["lr"] == 0.01


def test_export_takes_the_recorded_description_not_luad(checkpoints, tmp_path, capsys):
    """wsss checkpoints record dataset "auto" (as typed) and the resolved description: the bundle
    gets that description (it got LUAD's names, palette and mpp); a --dataset with other classes
    is refused."""
    from wsss.data.description import get_description

    folder, clf, seg = checkpoints
    d = get_description("luad").to_dict()
    d.update(name="my-cohort", class_names=["tumor", "stroma", "immune", "necrosis"], mpp=0.5)
    d["palette"] = [[10, 20, 30]] + d["palette"][1:]
    path = tmp_path / "seg_custom.pt"
    torch.save({"model": seg.state_dict(), "config": {"dataset": "auto", "description": d}, "epoch": 3,
                "optimizer": {}, "kind": "segmenter"}, path)
    s1 = str(folder / "stage1.pth")
    assert main(["--classifier", s1, "--segmenter", str(path), "--out", str(tmp_path / "m.pt"), "--tile-size", "32"]) == 0
    meta = load_bundle(tmp_path / "m.pt").metadata
    assert meta["class_names"] == ["tumor", "stroma", "immune", "necrosis"] and meta["mpp"] == 0.5
    assert meta["palette"][0] == [10, 20, 30] and meta["config"]["dataset"] == "my-cohort"
    capsys.readouterr()
    assert main(["--classifier", s1, "--segmenter", str(path), "--out", str(tmp_path / "n.pt"), "--tile-size", "32",
                 "--dataset", "luad"]) == 2
    assert "are not the ones the checkpoints were trained on" in capsys.readouterr().err
    assert not (tmp_path / "n.pt").exists()
    # reference checkpoints record nothing: luad, and the run says so
    assert main(["--classifier", s1, "--segmenter", str(folder / "stage2.pth"), "--out", str(tmp_path / "r.pt"),
                 "--tile-size", "32"]) == 0
    assert "the checkpoints record no dataset: using luad" in capsys.readouterr().err


def test_export_tile_size_defaults_to_the_recorded_patch_size(checkpoints, tmp_path, capsys):
    """wsss-train-seg records its patches' size; wsss-export runs the bundle at it (it used 224
    whatever the patches were, while wsss-train-seg --bundle used the patch size) and says so."""
    folder, _, seg = checkpoints
    path = tmp_path / "seg_96.pt"
    torch.save({"model": seg.state_dict(), "config": {"dataset": "bcss", "patch_size": 96}, "epoch": 0,
                "optimizer": {}, "kind": "segmenter"}, path)
    s1 = str(folder / "stage1.pth")
    assert main(["--classifier", s1, "--segmenter", str(path), "--out", str(tmp_path / "m.pt"), "--check-tiles", "1"]) == 0
    assert load_bundle(tmp_path / "m.pt").metadata["tile_size"] == 96
    assert "tile size 96 (the patches the segmenter was trained on" in capsys.readouterr().err
    # reference checkpoints record none: 224, said
    assert main(["--classifier", s1, "--segmenter", str(folder / "stage2.pth"), "--out", str(tmp_path / "r.pt"),
                 "--check-tiles", "1"]) == 0
    assert load_bundle(tmp_path / "r.pt").metadata["tile_size"] == 224
    assert "tile size 224 (the checkpoint records no patch size" in capsys.readouterr().err


def test_export_errors_are_one_line_and_write_nothing(checkpoints, tmp_path, capsys):
    folder, _, _ = checkpoints
    s1, s2 = str(folder / "stage1.pth"), str(folder / "stage2.pth")
    cases = [
        (["--classifier", str(tmp_path / "nope.pth"), "--segmenter", s2], "--classifier .*nope.pth: no such file"),
        (["--classifier", s2, "--segmenter", s1], "wrong network: expected a classifier checkpoint, got a segmenter"),
        (["--classifier", s1, "--segmenter", s2, "--dataset", "nosuch"], "dataset 'nosuch'"),
        (["--classifier", s1, "--segmenter", s2, "--eps", "1.5"], r"--eps must be in \[0, 1\)"),
        (["--classifier", s1, "--segmenter", s2, "--gate-eps", "1.5"], r"--eps must be in \[0, 1\)"),
        (["--classifier", s1, "--segmenter", s2, "--input-scale", "nan"], "--input-scale must be a positive number, got nan"),
        (["--classifier", s1, "--segmenter", s2, "--mpp", "inf"], "--mpp must be a positive number, got inf"),
    ]
    for extra, message in cases:
        rc = main(extra + ["--out", str(tmp_path / "m.pt")])
        err = capsys.readouterr().err.strip()
        assert rc == 2, err
        assert err.startswith("wsss-export: error:") and len(err.splitlines()) == 1, err
        assert __import__("re").search(message, err), err
    (tmp_path / "three.json").write_text('{"name": "three", "class_names": ["a", "b", "c"], '
                                         '"palette": [[0,0,0],[1,1,1],[2,2,2],[255,255,255]], "background_index": 3}')
    rc = main(["--classifier", s1, "--segmenter", s2, "--dataset", str(tmp_path / "three.json"),
               "--out", str(tmp_path / "m.pt")])
    assert rc == 2 and "wrong num_classes: the classifier has 4 classes, expected 3" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["three.json"]


def test_export_output_paths_are_checked_first(checkpoints, tmp_path, capsys):
    folder, _, _ = checkpoints
    s1, s2 = str(folder / "stage1.pth"), str(folder / "stage2.pth")
    (tmp_path / "afile").write_text("x")
    for out, message in [(tmp_path, "is a folder, not a file"),
                         (tmp_path / "afile" / "m.pt", f"{tmp_path / 'afile'} is a file, not a folder")]:
        assert main(["--classifier", s1, "--segmenter", s2, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_plain_segmenter_state_dict_is_named_so(checkpoints, tmp_path):
    from wsss.models.checkpoints import read_checkpoint

    folder, _, seg = checkpoints
    torch.save(seg.state_dict(), tmp_path / "plain.pth")
    assert read_checkpoint(tmp_path / "plain.pth").source_format == "state_dict"
    torch.save({"state_dict": seg.state_dict(), "optimizer": {}, "epoch": 7}, tmp_path / "ref.pth")
    c = read_checkpoint(tmp_path / "ref.pth")
    assert (c.source_format, c.epoch) == ("reference-stage2", 7)


def test_compare_outputs_refuses_a_mismatch():
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    prob = torch.full((1, 4), 0.5)
    other = labels.clone()
    other[0, :2] = 1
    with pytest.raises(BundleError, match="self-check of the thing failed: label agreement 0.75000"):
        compare_outputs((labels, None, prob), (other, None, prob), "thing")
    assert compare_outputs((labels, None, prob), (labels, None, prob + 1e-5), "x")["label_agreement"] == 1.0


@pytest.mark.slow
def test_export_pt2_keeps_custom_ops_and_matches_eager(checkpoints, tmp_path, capsys):
    """AOTInductor compiles C++ for this CPU: about 1-2 minutes on 2 cores even for a tiny network."""
    folder, clf, seg = checkpoints
    rc = main(["--classifier", str(folder / "stage1.pth"), "--segmenter", str(folder / "stage2.pth"),
               "--out", str(tmp_path / "m.pt"), "--pt2", str(tmp_path / "m.pt2"), "--tile-size", "32",
               "--pt2-max-batch", "4"])
    assert rc == 0, capsys.readouterr().err
    assert "self-check pt2: label agreement 1.00000" in capsys.readouterr().out
    runner = torch._inductor.aoti_load_package(str(tmp_path / "m.pt2"))
    tiles = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)  # another batch size than exported with
    labels, scores, prob = runner(tiles)
    expected = TissueSegmenter(clf, seg).eval()(tiles, True)
    assert torch.equal(labels, expected[0])
    torch.testing.assert_close(prob, expected[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, expected[1], rtol=1e-4, atol=1e-5)
    meta = runner.get_metadata()
    assert "wsss_bundle.json" in meta and '"class_names"' in meta["wsss_bundle.json"]


def test_train_seg_checks_its_classifier_before_training(checkpoints, tmp_path, capsys):
    """wsss-train-seg --classifier with another class count than the dataset's: refused before
    the first epoch (it failed when the bundle was written, after all of them)."""
    from wsss.cli.train_seg import main as train_seg

    folder, _, _ = checkpoints
    (tmp_path / "three.json").write_text('{"name": "three", "class_names": ["a", "b", "c"], '
                                         '"palette": [[0,0,0],[1,1,1],[2,2,2],[255,255,255]], "background_index": 3}')
    rc = train_seg([str(tmp_path / "data"), "--masks", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                    "--dataset", str(tmp_path / "three.json"), "--classifier", str(folder / "stage1.pth"),
                    "--bundle", str(tmp_path / "b.pt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "wrong num_classes: the classifier has 4 classes, expected 3" in err and "\n" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "b.pt").exists()


def test_export_refuses_to_write_over_an_input_checkpoint(checkpoints, tmp_path, capsys):
    """-o (or --pt2) naming the --classifier or --segmenter file overwrote that checkpoint."""
    import os
    import shutil

    folder, _, _ = checkpoints
    s1, s2 = tmp_path / "stage1.pth", tmp_path / "stage2.pth"
    shutil.copy(folder / "stage1.pth", s1)
    shutil.copy(folder / "stage2.pth", s2)
    os.symlink(s1, tmp_path / "link.pth")
    before = {p: p.read_bytes() for p in (s1, s2)}
    for extra, message in [(["--out", str(s1)], "--out .*stage1.pth is the --classifier checkpoint"),
                           (["--out", str(tmp_path / "." / "stage2.pth")], "--out .*stage2.pth is the --segmenter checkpoint"),
                           (["--out", str(tmp_path / "link.pth")], "--out .*link.pth is the --classifier checkpoint"),
                           (["--out", str(tmp_path / "m.pt"), "--pt2", str(s2)], "--pt2 .*stage2.pth is the --segmenter")]:
        rc = main(["--classifier", str(s1), "--segmenter", str(s2)] + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert {p: p.read_bytes() for p in (s1, s2)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pth", "stage1.pth", "stage2.pth"]


def test_malformed_checkpoints_are_one_line(checkpoints, tmp_path, capsys):
    """A wsss checkpoint whose config is no dict, a 0-d weight, a key that is no string, a
    damaged or cut-short zip: one line each (tracebacks before)."""
    folder, clf, seg = checkpoints
    s1, s2 = str(folder / "stage1.pth"), str(folder / "stage2.pth")
    clf_sd, seg_sd = clf.state_dict(), seg.state_dict()
    torch.save({"model": seg_sd, "config": "abc", "kind": "segmenter"}, tmp_path / "config_str.pth")
    torch.save({"model": seg_sd, "config": [1, 2]}, tmp_path / "config_list.pth")
    torch.save(dict(clf_sd, **{"fc8.weight": torch.tensor(0.0)}), tmp_path / "fc8_0d.pth")
    torch.save(dict(clf_sd, **{"conv1a.weight": torch.tensor(0.0)}), tmp_path / "conv1a_0d.pth")
    torch.save({**clf_sd, 0: torch.zeros(1)}, tmp_path / "int_key.pth")
    raw = bytearray((folder / "stage1.pth").read_bytes())
    (tmp_path / "cut.pth").write_bytes(bytes(raw[:len(raw) // 2]))
    eocd = raw.rfind(b"PK\x05\x06")
    raw[int.from_bytes(raw[eocd + 16:eocd + 20], "little")] = 0  # the central directory's first signature
    (tmp_path / "cd.pth").write_bytes(bytes(raw))
    cases = [("--segmenter", "config_str", "its 'config' must be a dict .*got str"),
             ("--segmenter", "config_list", "its 'config' must be a dict .*got list"),
             ("--classifier", "fc8_0d", r"fc8\.weight has shape \[\], expected \[out_channels"),
             ("--classifier", "conv1a_0d", r"conv1a\.weight has shape \[\], expected \[out_channels"),
             ("--classifier", "int_key", r"not a state_dict: keys \[0\] are not strings"),
             ("--classifier", "cd", r"is corrupted or truncated \(Bad magic number"),
             ("--classifier", "cut", r"is corrupted or truncated \(a zip file without its central directory")]
    for flag, name, message in cases:
        inputs = {"--classifier": s1, "--segmenter": s2, flag: str(tmp_path / f"{name}.pth")}
        rc = main(["--classifier", inputs["--classifier"], "--segmenter", inputs["--segmenter"],
                   "--out", str(tmp_path / "m.pt"), "--tile-size", "32", "--dataset", "luad"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("wsss-export: error:") and len(err.splitlines()) == 1, err
        assert __import__("re").search(rf"{name}\.pth: .*{message}", err), err
    assert not (tmp_path / "m.pt").exists()

"""The training-side commands (wsss-train-cls, -pseudo-masks, -train-seg, -eval, -export): outputs
never written over inputs, models of another cohort refused, one run per output folder, worker
errors and stop signals as one line, non-finite models refused by the export."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import pytest
import torch

from runner_kit import run_python

warnings.filterwarnings("ignore", category=FutureWarning)

WIDTH = 0.0625
TINY = ["--width", "0.0625", "--quiet", "--epochs", "1", "--batch-size", "2", "--max-steps-per-epoch", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-class synthetic dataset (32 px patches) and wsss-format checkpoints of tiny networks
    that record its description, as the training commands write them."""
    from wsss.data import get_description
    from wsss.models import DeepLabV3Plus, ResNet38Classifier
    from wsss.synthetic import write_patch_dataset

    root = tmp_path_factory.mktemp("tiny")
    data = root / "data"
    write_patch_dataset(str(data), n_train=4, n_val=2, n_test=2, patch=32, seed=3)
    description = get_description("auto", str(data))
    config = {"dataset": "auto", "num_classes": 4, "class_names": list(description.class_names),
              "description": description.to_dict(), "patch_size": 32}
    torch.manual_seed(0)
    clf = ResNet38Classifier(4, width=WIDTH).eval()
    seg = DeepLabV3Plus(4, backbone="resnet50", width=WIDTH).eval()
    torch.save({"model": clf.state_dict(), "config": config, "epoch": 0, "kind": "classifier", "finished": True},
               root / "classifier.pt")
    torch.save({"model": seg.state_dict(), "config": config, "epoch": 0, "kind": "segmenter", "finished": True},
               root / "segmenter.pt")
    torch.save(clf.state_dict(), root / "stage1.pth")  # the reference code's formats: nothing recorded
    torch.save({"state_dict": seg.state_dict(), "optimizer": {}}, root / "stage2.pth")
    from wsss.cli.pseudo_masks import main as pseudo_masks

    assert pseudo_masks([str(data), "--classifier", str(root / "classifier.pt"), "--out", str(root / "pm"),
                         "--quiet"]) == 0
    # another cohort: the same layout and class count, other classes
    other = root / "other"
    shutil.copytree(data, other)
    d = json.loads((other / "dataset.json").read_text())
    d.update(name="other-cohort", class_names=["tumour", "stroma", "lymph", "necrosis"])
    (other / "dataset.json").write_text(json.dumps(d))
    return root


def _one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error: ") and len(err.splitlines()) == 1, err
    return err


def _copy(tiny, tmp_path, *names):
    for name in names:
        shutil.copy(tiny / name, tmp_path / name)
    return [tmp_path / name for name in names]


# -- 1. outputs that would overwrite inputs ------------------------------------------------------

def test_no_output_is_written_over_an_input(tiny, tmp_path, capsys):
    """wsss-eval --json, wsss-pseudo-masks --json and wsss-train-seg --bundle naming an input
    checkpoint replaced it (the metrics or the bundle in place of the model); now one line
    before any work, every input as it was, nothing written."""
    from wsss.cli.eval import main as eval_main
    from wsss.cli.pseudo_masks import main as pm_main
    from wsss.cli.train_cls import main as cls_main
    from wsss.cli.train_seg import main as seg_main

    data = str(tiny / "data")
    clf, seg = _copy(tiny, tmp_path, "classifier.pt", "segmenter.pt")
    os.symlink(seg, tmp_path / "link.pt")
    (tmp_path / "out").mkdir()
    shutil.copy(clf, tmp_path / "out" / "classifier.pt")
    before = {p: p.read_bytes() for p in (clf, seg, tiny / "data" / "dataset.json", tmp_path / "out" / "classifier.pt")}
    cases = [
        (eval_main, "wsss-eval", [data, "--segmenter", str(seg), "--json", str(seg)],
         r"--json .*segmenter\.pt is the --segmenter checkpoint: writing it would overwrite that input"),
        (eval_main, "wsss-eval", [data, "--segmenter", str(seg), "--json", str(tmp_path / "link.pt")],
         r"--json .*link\.pt is the --segmenter checkpoint .*segmenter\.pt"),
        (eval_main, "wsss-eval", [data, "--segmenter", str(seg), "--json", str(tiny / "data" / "dataset.json")],
         r"--json .*dataset\.json is the dataset description"),
        (eval_main, "wsss-eval", [data, "--segmenter", str(seg), "--json", str(tiny / "data" / "test" / "m.json")],
         r"--json .*m\.json is inside the dataset's test split"),
        (pm_main, "wsss-pseudo-masks", [data, "--classifier", str(clf), "--out", str(tmp_path / "pm"),
                                        "--json", str(clf)], r"--json .*classifier\.pt is the --classifier checkpoint"),
        (pm_main, "wsss-pseudo-masks", [data, "--classifier", str(clf), "--out", str(tmp_path / "pm"),
                                        "--truth", str(tiny / "data" / "train_truth"), "--json",
                                        str(tiny / "data" / "train_truth" / "s.json")], r"inside the --truth folder"),
        (seg_main, "wsss-train-seg", [data, "--masks", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                                      "--classifier", str(clf), "--bundle", str(clf)] + TINY,
         r"--bundle .*classifier\.pt is the --classifier checkpoint"),
        (seg_main, "wsss-train-seg", [data, "--masks", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                                      "--classifier", str(clf), "--bundle", str(tmp_path / "o" / "segmenter_best.pt")]
         + TINY, r"--bundle .*segmenter_best\.pt is also --out file .*segmenter_best\.pt"),
        (cls_main, "wsss-train-cls", [data, "--out", str(tmp_path / "out"), "--init",
                                      str(tmp_path / "out" / "classifier.pt")] + TINY,
         r"--out file .*classifier\.pt is the --init checkpoint"),
    ]
    for main, prog, argv, message in cases:
        assert main(argv) == 2, argv
        err = _one_line_error(capsys, prog)
        assert re.search(message, err), err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["classifier.pt", "link.pt", "out", "segmenter.pt"]
    assert os.listdir(tmp_path / "out") == ["classifier.pt"]
    assert not (tiny / "data" / "test" / "m.json").exists()


def test_pseudo_masks_never_write_into_their_truth_folder(tiny, tmp_path, capsys):
    """--out OUT --truth OUT/b4_5: the masks would replace (and a rerun delete) the truth."""
    from wsss.cli.pseudo_masks import main

    truth = tmp_path / "pm" / "b4_5"
    shutil.copytree(tiny / "data" / "train_truth", truth)
    before = sorted(os.listdir(truth))
    assert main([str(tiny / "data"), "--classifier", str(tiny / "classifier.pt"), "--out", str(tmp_path / "pm"),
                 "--truth", str(truth), "--quiet"]) == 2
    assert "b4_5 is the --truth folder" in _one_line_error(capsys, "wsss-pseudo-masks")
    assert sorted(os.listdir(truth)) == before and sorted(os.listdir(tmp_path / "pm")) == ["b4_5"]


# -- 2. models of another cohort ----------------------------------------------------------------

def test_models_of_another_cohort_are_refused(tiny, tmp_path, capsys):
    """Checkpoints that record TE/NEC/LYM/TAS on a dataset whose 4 classes are others: one line
    naming both lists and the files (they ran, with the scores under the other names)."""
    from wsss.cli.eval import main as eval_main
    from wsss.cli.export import main as export_main
    from wsss.cli.pseudo_masks import main as pm_main
    from wsss.cli.train_seg import main as seg_main

    other = str(tiny / "other")
    clf, seg = str(tiny / "classifier.pt"), str(tiny / "segmenter.pt")
    both = r"\['TE', 'NEC', 'LYM', 'TAS'\].*\['tumour', 'stroma', 'lymph', 'necrosis'\]"
    cases = [
        (eval_main, "wsss-eval", [other, "--segmenter", seg, "--quiet"], rf"--segmenter {re.escape(seg)} .*{both}"),
        (eval_main, "wsss-eval", [other, "--segmenter", str(tiny / "stage2.pth"), "--classifier", clf, "--quiet"],
         rf"--classifier {re.escape(clf)} .*{both}"),
        (pm_main, "wsss-pseudo-masks", [other, "--classifier", clf, "--out", str(tmp_path / "pm"), "--quiet"],
         rf"--classifier {re.escape(clf)} .*{both}"),
        (seg_main, "wsss-train-seg", [other, "--masks", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                                      "--classifier", clf, "--bundle", str(tmp_path / "b.pt")] + TINY,
         rf"--classifier {re.escape(clf)} .*{both}"),
    ]
    for main, prog, argv, message in cases:
        assert main(argv) == 2, argv
        err = _one_line_error(capsys, prog)
        assert re.search(message, err) and "dataset.json" in err, err
    assert os.listdir(tmp_path) == []
    # export: a classifier and a segmenter that record different classes do not make one bundle
    other_clf = tmp_path / "other_classifier.pt"
    ckpt = torch.load(clf, weights_only=True)
    ckpt["config"]["description"]["class_names"] = ckpt["config"]["class_names"] = ["tumour", "stroma", "lymph",
                                                                                    "necrosis"]
    torch.save(ckpt, other_clf)
    assert export_main(["--classifier", str(other_clf), "--segmenter", seg, "-o", str(tmp_path / "b.pt")]) == 2
    err = _one_line_error(capsys, "wsss-export")
    assert re.search(rf"--classifier .*other_classifier\.pt .*'tumour'.* --segmenter {re.escape(seg)} .*'TE'", err), err
    assert sorted(os.listdir(tmp_path)) == ["other_classifier.pt"]


def test_reference_checkpoints_record_no_classes_and_are_still_taken(tiny, tmp_path, capsys):
    from wsss.cli.eval import main

    assert main([str(tiny / "other"), "--segmenter", str(tiny / "stage2.pth"), "--classifier",
                 str(tiny / "stage1.pth"), "--quiet", "--json", str(tmp_path / "m.json")]) == 0
    assert "IoU tumour" in capsys.readouterr().out and (tmp_path / "m.json").exists()


# -- 3. a --bundle in a folder that does not exist yet -------------------------------------------

def test_train_seg_makes_the_bundles_folder(tiny, tmp_path, capsys):
    """The up-front check let --bundle nodir/x/b.pt through (as --out's folders are made), and
    the export after the training failed with "FileNotFoundError: .../.tmp-wsss-XXXX.pt"."""
    from wsss.cli.train_seg import main as seg_main

    data, clf = str(tiny / "data"), str(tiny / "classifier.pt")
    bundle = tmp_path / "nodir" / "x" / "b.pt"
    rc = seg_main([data, "--masks", str(tiny / "pm"), "--out", str(tmp_path / "o"), "--backbone", "resnet50",
                   "--classifier", clf, "--bundle", str(bundle), "--val-split", "none"] + TINY)
    assert rc == 0, capsys.readouterr().err
    assert os.listdir(bundle.parent) == ["b.pt"]


def test_export_failures_never_name_a_temporary_file(tiny, unwritable_folder):
    from wsss.cli.export import export_bundle
    from wsss.errors import BundleError

    with pytest.raises(BundleError) as e:
        export_bundle(str(tiny / "classifier.pt"), str(tiny / "segmenter.pt"), str(unwritable_folder / "b.pt"),
                      check_tiles=1)
    assert ".tmp" not in str(e.value) and str(unwritable_folder / "b.pt") in str(e.value), str(e.value)


# -- 4. a model whose outputs are not finite -----------------------------------------------------

def test_export_refuses_a_model_with_non_finite_outputs(tiny, tmp_path, capsys):
    """A classifier whose weights overflowed exported with "class_prob max diff nan" (NaN > tol is
    False)."""
    from wsss.cli.export import compare_outputs, main
    from wsss.errors import BundleError

    ckpt = torch.load(tiny / "classifier.pt", weights_only=True)
    ckpt["model"] = {k: (v * 1e30 if v.is_floating_point() and k.endswith("weight") else v)
                     for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "huge.pt")
    assert main(["--classifier", str(tmp_path / "huge.pt"), "--segmenter", str(tiny / "segmenter.pt"),
                 "-o", str(tmp_path / "b.pt"), "--tile-size", "32"]) == 2
    err = _one_line_error(capsys, "wsss-export")
    assert "huge.pt: its class probabilities on the self-check tiles are not finite" in err, err
    assert os.listdir(tmp_path) == ["huge.pt"]
    labels = torch.zeros(1, 4, 4, dtype=torch.uint8)
    with pytest.raises(BundleError, match="class_prob max diff nan"):
        compare_outputs((labels, None, torch.zeros(1, 4)), (labels, None, torch.full((1, 4), float("nan"))), "x")


# -- 5. DataLoader workers: errors and stop signals ----------------------------------------------

def test_an_error_in_a_loader_worker_is_its_one_line(tiny, tmp_path, capsys):
    """torch re-raises a worker's DataError with the whole formatted traceback as its message
    (~50 lines); the command prints the original message."""
    from torch._utils import ExceptionWrapper

    from wsss.cli import run, worker_error_message
    from wsss.cli.train_cls import main
    from wsss.errors import DataError

    try:
        raise DataError("x.png: cannot read the image: image file is truncated")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")

    def body(argv):
        wrapped.reraise()

    assert run("probe", body) == 2
    assert capsys.readouterr().err == "probe: error: x.png: cannot read the image: image file is truncated\n"
    assert worker_error_message(OSError("plain")) == "plain"
    # the real thing: a cut-short PNG read by a worker process
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    first = sorted((data / "train").glob("*.png"))[0]
    first.write_bytes(first.read_bytes()[:200])
    assert main([str(data), "--out", str(tmp_path / "o"), "--workers", "1"] + TINY) == 2
    err = _one_line_error(capsys, "wsss-train-cls")
    assert re.search(r"\.png: cannot read the image", err) and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


_STOP_PROBE = r"""
import os, signal, sys, time
from wsss.cli import run

def torch_like_sigchld(signum, frame):  # what torch's DataLoader installs
    raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Terminated. ")
torch_like_sigchld.__module__ = "torch.utils.data._utils.signal_handling"

class Iterator:  # a DataLoader iterator whose __del__ meets a worker killed by the same signal
    def __del__(self):
        raise RuntimeError("DataLoader worker (pid 12346) is killed by signal: Terminated. ")

def body(argv):
    child = os.fork()
    if child == 0:  # a worker: the signal ends it as it would without wsss's handler
        try:
            time.sleep(30)
        finally:
            os._exit(7)
    time.sleep(0.5)
    os.kill(child, signal.SIGTERM)
    _, status = os.waitpid(child, 0)
    print("child", os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exit %d" % os.WEXITSTATUS(status), flush=True)
    signal.signal(signal.SIGCHLD, torch_like_sigchld)
    it = Iterator()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    finally:
        os.kill(os.getpid(), signal.SIGCHLD)  # (a worker ending while the interrupt unwinds)
        time.sleep(0.2)
    return 0

print("rc", run("probe", body), flush=True)
"""


def test_a_stop_signal_with_loader_workers_is_one_line():
    """SIGTERM to the process group of a run with --workers: the workers' deaths came out as
    "Exception ignored ... DataLoader worker (pid N) is killed by signal" tracebacks (torch's
    SIGCHLD handler, the iterator's __del__), sometimes as the command's own RuntimeError (exit
    1); a worker forked while the signal came raised KeyboardInterrupt in its at-fork hooks."""
    result = run_python(_STOP_PROBE, timeout=60)
    assert result.stdout.split() == ["child", str(int(__import__("signal").SIGTERM)), "rc", "143"], \
        (result.stdout, result.stderr)
    assert result.stderr.strip() == "probe: stopped by SIGTERM", result.stderr


# -- 6. one run per output folder ----------------------------------------------------------------

def test_a_second_run_into_the_same_folder_is_refused(tiny, tmp_path, capsys):
    """Two wsss-train-cls runs into one folder both ran (exit 0); two wsss-pseudo-masks runs
    left a mix of masks.  A folder another run holds (wsss.files.lock_folder) is one line."""
    from wsss.cli.pseudo_masks import main as pm_main
    from wsss.cli.train_cls import main as cls_main
    from wsss.cli.train_seg import main as seg_main
    from wsss.files import lock_folder

    data, clf = str(tiny / "data"), str(tiny / "classifier.pt")
    out = tmp_path / "out"
    out.mkdir()
    fd = lock_folder(out)
    if fd is None:
        pytest.skip("this file system cannot lock")
    try:
        cases = [(cls_main, "wsss-train-cls", [data, "--out", str(out)] + TINY),
                 (pm_main, "wsss-pseudo-masks", [data, "--classifier", clf, "--out", str(out), "--quiet"]),
                 (seg_main, "wsss-train-seg", [data, "--masks", str(tiny / "pm"), "--out", str(out), "--backbone",
                                               "resnet50", "--val-split", "none"] + TINY)]
        for main, prog, argv in cases:
            assert main(argv) == 2
            err = _one_line_error(capsys, prog)
            assert f"--out {out}: another run is writing this output folder now" in err, err
    finally:
        os.close(fd)
    assert os.listdir(out) == []
    assert cls_main([data, "--out", str(out)] + TINY) == 0  # (and the lock goes with the run)
    assert (out / "classifier.pt").exists()


# -- 7. smaller ones ------------------------------------------------------------------------------

def test_a_folder_where_a_checkpoint_goes_is_refused_first(tiny, tmp_path, capsys):
    """OUT/classifier.pt or OUT/segmenter_best.pt existing as a folder failed after the whole
    training, naming a hidden .tmp file."""
    from wsss.cli.train_cls import main as cls_main
    from wsss.cli.train_seg import main as seg_main

    (tmp_path / "c" / "classifier.pt").mkdir(parents=True)
    (tmp_path / "s" / "segmenter_best.pt").mkdir(parents=True)
    assert cls_main([str(tiny / "data"), "--out", str(tmp_path / "c")] + TINY) == 2
    assert re.search(r"c/classifier\.pt: is a folder, not a file", _one_line_error(capsys, "wsss-train-cls"))
    assert seg_main([str(tiny / "data"), "--masks", str(tiny / "pm"), "--out", str(tmp_path / "s"),
                     "--backbone", "resnet50"] + TINY) == 2
    err = _one_line_error(capsys, "wsss-train-seg")
    assert re.search(r"s/segmenter_best\.pt: is a folder, not a file", err) and ".tmp" not in err, err
    assert os.listdir(tmp_path / "c") == ["classifier.pt"] and os.listdir(tmp_path / "s") == ["segmenter_best.pt"]


def test_a_missing_val_split_suggests_val_split_none(tiny, tmp_path, capsys):
    from wsss.cli.train_seg import main

    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    shutil.rmtree(data / "val")
    assert main([str(data), "--masks", str(tiny / "pm"), "--out", str(tmp_path / "o"), "--backbone",
                 "resnet50"] + TINY) == 2
    err = _one_line_error(capsys, "wsss-train-seg")
    assert "no 'val' split" in err and "--val-split none" in err, err
    assert not (tmp_path / "o").exists()


def test_export_help_names_the_segmenter_stage_unambiguously():
    from wsss.cli.export import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "the paper's and wsss's stage 3" in text and "the reference code's stage-2 file" in text

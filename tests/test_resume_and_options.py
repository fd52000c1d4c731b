"""--resume's notion of "the same model and options", run.json's content, wsss-infer's option
plumbing into RunOptions, bundle metadata checks and the export self-check: small, fast tests
that each guard against one plausible defect (found by hand mutation testing)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from torch import Tensor

from wsss.runner import run_slide
from wsss.runner import pipeline

from runner_kit import (RED_BUNDLE_META, RedClassModule, colour_slide, model, no_user_bundle, opts,
                        save_red_bundle, write_pyramid)

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices


def _slide(tmp_path: Path, name: str = "s.tif", seed: int = 0, h: int = 60, w: int = 70) -> Path:
    path = tmp_path / name
    write_pyramid(path, [colour_slide(h, w, seed=seed)])
    return path


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


# --------------------------------------------------------------------------------------
# --resume: what makes "the same run"
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    dict(min_tissue=0.5),
    dict(write_probs=True),
    dict(tissue="auto"),
    dict(mpp_tolerance=0.2),
    dict(output_tile=16),
    dict(min_polygon_um2=0.0),
    dict(tile_size=48, overlap=4),  # (overlap as the base run's: only the tile size differs)
    dict(mpp=0.25),
], ids=lambda c: next(iter(c)))
def test_resume_redoes_a_slide_when_an_option_that_shapes_the_result_changes(tmp_path, change):
    """Defect: an option that shapes the outputs left out of the resume fingerprint (or, for
    tile_size/mpp, the resolved value taken from the model/slide instead of the option), so
    --resume skipped a slide whose outputs were made with other options."""
    path = _slide(tmp_path)
    out = tmp_path / "out"
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    assert run_slide(path, model(tile=32), out, opts(resume=True, **change)).status == "done"
    assert run_slide(path, model(tile=32), out, opts(resume=True, **change)).status == "skipped"


def test_resume_redoes_a_slide_when_the_tissue_mask_file_changes(tmp_path):
    """Defect: the tissue mask's content (tissue_sha256) left out of the fingerprint: a mask
    edited in place (same path) was taken for the same run and the slide skipped."""
    from PIL import Image

    path = _slide(tmp_path)
    mask = tmp_path / "m.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    out = tmp_path / "out"
    o = opts(resume=True, tissue=str(mask))
    assert run_slide(path, model(tile=32), out, o).status == "done"
    assert run_slide(path, model(tile=32), out, o).status == "skipped"
    half = np.full((8, 8), 255, np.uint8)
    half[:, :4] = 0
    Image.fromarray(half).save(mask)
    assert run_slide(path, model(tile=32), out, o).status == "done"


def test_resume_redoes_a_slide_whose_file_was_replaced(tmp_path):
    """Defect: the slide identity reduced to its path (size and mtime dropped): a slide file
    rescanned or replaced under the same name kept its old outputs."""
    path = _slide(tmp_path, seed=0)
    out = tmp_path / "out"
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    before = (out / "labels.tiff").read_bytes()
    _slide(tmp_path, seed=1, w=90)  # another scan under the same name
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    assert (out / "labels.tiff").read_bytes() != before


def test_resume_redoes_a_run_of_another_run_format(tmp_path, monkeypatch):
    """Defect: RUN_FORMAT_VERSION left out of the fingerprint: outputs of an older run format
    were skipped by a wsss that writes them differently."""
    path = _slide(tmp_path)
    out = tmp_path / "out"
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    monkeypatch.setattr(pipeline, "RUN_FORMAT_VERSION", pipeline.RUN_FORMAT_VERSION + 1)
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"


@pytest.mark.parametrize("status", ["running", "failed", None])
def test_resume_redoes_a_run_json_that_does_not_say_complete(tmp_path, status):
    """Defect: run.json's status not checked: a run.json that says the run did not finish (or
    says nothing) was taken for a finished run when its fingerprint and sizes matched."""
    path = _slide(tmp_path)
    out = tmp_path / "out"
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    info = _run_json(out)
    if status is None:
        del info["status"]
    else:
        info["status"] = status
    (out / "run.json").write_text(json.dumps(info))
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    assert _run_json(out)["status"] == "complete"


@pytest.mark.parametrize("edit", ["grown", "shrunk"])
def test_resume_redoes_a_slide_whose_output_changed_size(tmp_path, edit):
    """Defect: output sizes compared loosely (>=, or not at all): an output cut short or
    appended to since the run was taken for complete."""
    path = _slide(tmp_path)
    out = tmp_path / "out"
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    labels = out / "labels.tiff"
    data = labels.read_bytes()
    labels.write_bytes(data + b"\0" if edit == "grown" else data[:-1])
    assert run_slide(path, model(tile=32), out, opts(resume=True)).status == "done"
    assert labels.read_bytes() == data


@pytest.mark.parametrize("name", pipeline.OUTPUT_FILES + ("probs.tiff",))
def test_resume_redoes_a_slide_missing_any_one_output(tmp_path, name):
    """Defect: run.json's output_sizes not listing every output (or missing files ignored), so
    a slide with one output deleted was skipped."""
    path = _slide(tmp_path)
    out = tmp_path / "out"
    o = opts(resume=True, write_probs=True)
    assert run_slide(path, model(tile=32), out, o).status == "done"
    assert set(_run_json(out)["output_sizes"]) == set(pipeline.OUTPUT_FILES) | {"probs.tiff"}
    (out / name).unlink()
    assert run_slide(path, model(tile=32), out, o).status == "done"
    assert (out / name).is_file()


# --------------------------------------------------------------------------------------
# run.json
# --------------------------------------------------------------------------------------
def test_run_json_records_versions_resolved_options_and_timings(tmp_path):
    """Defect: run.json without the versions that made it, or with options as given (tile_size
    and overlap None) instead of the values the run used, or without the total time."""
    import importlib.metadata as md

    import wsss

    path = _slide(tmp_path)
    out = tmp_path / "out"
    run_slide(path, model(tile=32), out, opts())
    info = _run_json(out)
    assert info["format_version"] == pipeline.RUN_FORMAT_VERSION and len(info["fingerprint"]) == 64
    versions = info["versions"]
    assert versions["wsss"] == wsss.__version__ == md.version("wsss") and versions["python"]
    assert versions["torch"] == md.version("torch") and versions["numpy"] == md.version("numpy")
    assert info["options"]["tile_size"] == 32 and info["options"]["overlap"] == 4  # (tile // 8)
    assert info["options"]["batch_size"] == 3 and info["options"]["workers"] == 2
    assert info["timings_s"]["total"] > 0
    assert info["model"]["identity"] == "test-red_class"


# --------------------------------------------------------------------------------------
# wsss-infer: options reach the run
# --------------------------------------------------------------------------------------
class ShiftedClassModule(torch.nn.Module):
    """Another trivial bundle module: class = (red // 64 + 1) % 4."""

    def forward(self, tiles: Tensor, with_scores: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        c = (torch.clamp(tiles[:, 0].to(torch.int64) // 64, 0, 3) + 1) % 4
        scores = torch.nn.functional.one_hot(c, 4).permute(0, 3, 1, 2).to(torch.float32)
        class_prob = torch.ones(tiles.shape[0], 4)
        if not with_scores:
            scores = torch.empty(0)
        return c.to(torch.uint8), scores, class_prob


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return save_red_bundle(tmp_path_factory.mktemp("b") / "red.pt")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    no_user_bundle(monkeypatch, tmp_path)


def _infer(tmp_path, bundle, *args) -> dict:
    from wsss.cli.infer import main

    s = tmp_path / "a.tif"
    if not s.exists():
        _slide(tmp_path, "a.tif", h=70, w=90)
    assert main([str(s), "--model", str(bundle), "-o", str(tmp_path / "o"), "--no-progress", *args]) == 0
    return _run_json(tmp_path / "o" / "a")


def _mask(tmp_path) -> str:
    from PIL import Image

    m = np.zeros((8, 8), np.uint8)
    m[:, :5] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    return str(tmp_path / "m.png")


@pytest.mark.parametrize("args, check", [
    (["--overlap", "8"], lambda r, t: r["options"]["overlap"] == 8),
    (["--tile-size", "48"], lambda r, t: r["options"]["tile_size"] == 48),
    (["--batch-size", "5"], lambda r, t: r["options"]["batch_size"] == 5),
    (["--workers", "1"], lambda r, t: r["options"]["workers"] == 1),
    (["--min-tissue", "0.25", "--no-tissue-detection"], lambda r, t: r["options"]["min_tissue"] == 0.25),
    (["--no-tissue-detection"], lambda r, t: r["options"]["min_tissue"] == 0.0),  # (the default)
    (["--mpp", "0.25"], lambda r, t: r["options"]["mpp"] == 0.25 and r["slide"]["mpp_source"] == "--mpp"
     and r["scale"]["width"] == 45),
    (["--reader", "openslide"], lambda r, t: r["options"]["reader"] == "openslide" and r["slide"]["reader"] == "openslide"),
    (["--reader", "tifffile"], lambda r, t: r["slide"]["reader"] == "tifffile"),
    (["--tissue-mask", "MASK"], lambda r, t: r["options"]["tissue"] == str(t / "m.png")
     and r["tissue"]["source"] == f"file:{t / 'm.png'}"),
    (["--no-tissue-detection", "--probs"], lambda r, t: r["options"]["write_probs"] is True
     and "probs.tiff" in r["output_sizes"]),
    (["--precision", "fp32"], lambda r, t: r["model"]["precision"] == "float32"),
    (["--precision", "bf16"], lambda r, t: r["model"]["precision"] == "bfloat16"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_infer_options_reach_the_run(tmp_path, bundle, args, check):
    """Defect: a wsss-infer option parsed but not passed on to RunOptions or the model (or its
    default changed): the run silently used another value than the one asked for."""
    args = [_mask(tmp_path) if a == "MASK" else a for a in args]
    run = _infer(tmp_path, bundle, *args)
    assert check(run, tmp_path), json.dumps({k: run[k] for k in ("options", "slide", "scale", "tissue")}, indent=1)


@pytest.mark.filterwarnings("ignore:wsss. float16 inference on this CPU")
def test_infer_resume_tells_precisions_apart(tmp_path, bundle, capsys):
    """Defect: the model identity without the precision (only how reduced precision is applied):
    a bfloat16 run's outputs were skipped by --resume --precision float16 (and float32's by
    bfloat16), though the labels can differ."""
    _infer(tmp_path, bundle, "--no-tissue-detection", "--precision", "bf16", "--precision-mode", "cast")
    capsys.readouterr()
    run = _infer(tmp_path, bundle, "--no-tissue-detection", "--precision", "fp16", "--precision-mode", "cast",
                 "--resume")
    assert "1 done" in capsys.readouterr().err and run["model"]["precision"] == "float16"
    run = _infer(tmp_path, bundle, "--no-tissue-detection", "--precision", "fp32", "--resume")
    assert "1 done" in capsys.readouterr().err and run["model"]["precision"] == "float32"
    _infer(tmp_path, bundle, "--no-tissue-detection", "--precision", "fp32", "--resume")
    assert "1 skipped" in capsys.readouterr().err


def test_infer_resume_redoes_a_slide_run_with_another_bundle(tmp_path, bundle, capsys):
    """Defect: the bundle's hash left out of the resume decision at the command line: outputs of
    another model (same class names, tile size and resolution) were skipped."""
    other = save_red_bundle(tmp_path / "other.pt", ShiftedClassModule())
    _infer(tmp_path, bundle, "--no-tissue-detection")
    capsys.readouterr()
    before = (tmp_path / "o" / "a" / "labels.tiff").read_bytes()
    _infer(tmp_path, other, "--no-tissue-detection", "--resume")
    assert "1 done" in capsys.readouterr().err
    assert (tmp_path / "o" / "a" / "labels.tiff").read_bytes() != before


# --------------------------------------------------------------------------------------
# bundle metadata
# --------------------------------------------------------------------------------------
META = RED_BUNDLE_META


@pytest.mark.parametrize("edits, message", [
    ({"palette": [[0, 0, 0]] * 257}, "palette must be"),
    ({"class_names": ["A", "B", 3, "D"]}, "class_names must be a non-empty list"),
    ({"class_names": []}, "class_names must be a non-empty list"),
    ({"tile_size": True}, "tile_size must be a positive int"),
    ({"background_index": 3}, r"background_index must be an int in 4\.\.255"),
    ({"mpp": 0.0}, "mpp must be a positive number or None"),
    ({"gate_eps": float("inf")}, "gate_eps must be a finite number"),
    ({"config": [1]}, "config must be a dict"),
])
def test_bundle_metadata_checks(tmp_path, edits, message):
    """Defect: one of the metadata checks save_bundle (and every reader) applies removed or
    loosened: a bundle with more than 256 colours, non-text class names, a background label
    among the classes, a zero resolution... was written."""
    from wsss.bundle import save_bundle
    from wsss.errors import BundleError

    with pytest.raises(BundleError, match=message):
        save_bundle(str(tmp_path / "x.pt"), RedClassModule(), dict(META, **edits))
    assert not list(tmp_path.iterdir())


class Scaled(torch.nn.Module):
    """A module with one parameter and one buffer (of the same shapes in every instance)."""

    def __init__(self, w: float, b: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), w))
        self.register_buffer("b", torch.full((4,), b))

    def forward(self, tiles: Tensor, with_scores: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        c = torch.clamp(tiles[:, 0].to(torch.int64) // 64, 0, 3)
        prob = (self.w + self.b).expand(tiles.shape[0], 4)
        return c.to(torch.uint8), torch.empty(0), prob


def test_content_hash_covers_parameters_buffers_and_metadata():
    """Defect: the content hash leaving out the weights' values, the buffers, or the metadata:
    two different models (or one with other metadata) got the same hash."""
    from wsss.bundle import content_hash

    base = content_hash(Scaled(1.0, 2.0), META)
    assert base == content_hash(Scaled(1.0, 2.0), dict(META))
    assert content_hash(Scaled(1.5, 2.0), META) != base  # parameter values
    assert content_hash(Scaled(1.0, 2.5), META) != base  # buffer values
    assert content_hash(Scaled(1.0, 2.0), dict(META, mpp=1.0)) != base  # metadata
    # the automatic keys are not the model
    assert content_hash(Scaled(1.0, 2.0), dict(META, wsss_version="0", content_hash="x")) == base


# --------------------------------------------------------------------------------------
# export self-check
# --------------------------------------------------------------------------------------
def test_export_self_check_tolerances():
    """Defect: the export self-check's default tolerances loosened (label agreement below 0.999,
    class probabilities off by more than 1e-3 accepted) or NaN/inf passing the comparison."""
    from wsss.cli.export import compare_outputs
    from wsss.errors import BundleError

    labels = torch.zeros(1, 40, 40, dtype=torch.uint8)
    prob = torch.full((1, 4), 0.25)
    close = labels.clone()
    close[0, 0, :2] = 1  # 2 of 1600 pixels: agreement 0.99875
    with pytest.raises(BundleError, match="label agreement 0.99875"):
        compare_outputs((labels, None, prob), (close, None, prob), "x")
    with pytest.raises(BundleError, match="class_prob max diff"):
        compare_outputs((labels, None, prob), (labels, None, prob + 2e-3), "x")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(BundleError, match="class_prob max diff"):
            compare_outputs((labels, None, prob), (labels, None, torch.full((1, 4), bad)), "x")
    ok = compare_outputs((labels, None, prob), (labels, None, prob + 5e-4), "x")
    assert ok["label_agreement"] == 1.0 and ok["class_prob_max_diff"] == pytest.approx(5e-4, rel=1e-3)


@pytest.mark.parametrize("which", ["class_prob", "scores"])
def test_export_refuses_non_finite_eager_outputs(which):
    """Defect: the export's non-finite check dropped for the classifier's class probabilities
    or the segmenter's scores: a diverged model's bundle was written."""
    from wsss.cli.export import check_finite_outputs
    from wsss.errors import BundleError

    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    scores, prob = torch.zeros(1, 4, 8, 8), torch.full((1, 4), 0.25)
    check_finite_outputs((labels, scores, prob), "c.pt", "s.pt")  # finite: fine
    if which == "class_prob":
        prob = prob.clone()
        prob[0, 1] = float("nan")
        match = "--classifier c.pt: its class probabilities"
    else:
        scores = scores.clone()
        scores[0, 2, 3, 3] = float("inf")
        match = "--segmenter s.pt: its scores"
    with pytest.raises(BundleError, match=match):
        check_finite_outputs((labels, scores, prob), "c.pt", "s.pt")

"""The failure rules, checked where the other tests left gaps (found by hand mutation testing):
every bad input gets one clear line naming what was wrong and a non-zero exit; nothing lost or
left half-written that looks like a result; outputs are written atomically."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import tifffile

from runner_kit import colour_slide, model, no_user_bundle, opts, save_red_bundle, write_pyramid


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return save_red_bundle(tmp_path_factory.mktemp("b") / "red.pt")


@pytest.fixture(autouse=True)
def _no_user_bundle(monkeypatch, tmp_path):
    no_user_bundle(monkeypatch, tmp_path)


def _slide(path: Path, h=64, w=64) -> Path:
    write_pyramid(path, [colour_slide(h, w)])
    return path


def _infer(*args) -> int:
    from wsss.cli.infer import main

    return main([str(a) for a in args])


# --------------------------------------------------------------------------------------
# wsss.files
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["labels.tiff", "run.json", "overlay.png"])
def test_a_temporary_is_hidden_and_never_has_the_results_suffix(tmp_path, name):
    """Defect: atomic_path's temporary named with the result's suffix (``.labels.tiff.X.tiff``) or
    without the leading dot: a killed process then leaves a file that a glob for results picks up."""
    from wsss.files import atomic_path

    final = tmp_path / name
    with atomic_path(final, tag="host.1.") as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and not final.exists()
        assert tmp.name.startswith(f".{name}.host.1.") and tmp.name.endswith(".tmp")
        assert not tmp.name.endswith(final.suffix)
        tmp.write_text("whole")
    assert final.read_text() == "whole" and sorted(os.listdir(tmp_path)) == [name]


def test_probe_writable_refuses_a_folder_it_cannot_write(unwritable_folder):
    """Defect: probe_writable that trusts the folder (no real file made): an unwritable existing
    -o folder was only found after the bundle loaded and every slide had run its tiles."""
    from wsss.errors import WsssError
    from wsss.files import probe_writable
    from wsss.runner.pipeline import check_output_dir

    with pytest.raises(OSError):
        probe_writable(unwritable_folder)
    with pytest.raises(WsssError, match=f"output directory {unwritable_folder} cannot be written"):
        check_output_dir(unwritable_folder)
    assert not [p for p in os.listdir(unwritable_folder) if p.startswith(".write-test.")]


# --------------------------------------------------------------------------------------
# wsss.cli.run
# --------------------------------------------------------------------------------------
def test_an_os_error_is_one_line_naming_the_path(capsys):
    """Defect: ``run`` printing an OSError without its file name ("error: No space left on
    device": which file?), or letting it out as a traceback."""
    from wsss.cli import run

    def body(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/labels.tiff")

    assert run("wsss-x", body, []) == 2
    err = capsys.readouterr().err
    assert err == "wsss-x: error: /data/out/labels.tiff: No space left on device\n"


# --------------------------------------------------------------------------------------
# wsss.runner.pipeline: a failed slide publishes nothing and leaves nothing
# --------------------------------------------------------------------------------------
def test_outputs_are_published_by_rename_from_the_work_folder(tmp_path, monkeypatch):
    """Defect: publishing by copying (or writing in place): a process killed mid-copy leaves a
    half-written labels.tiff under its final name.  Every output must arrive by one rename from
    the run's hidden work folder, run.json last."""
    import wsss.runner.pipeline as pipeline
    from wsss.runner import run_slide

    moves = []
    real_replace = os.replace

    def spy(src, dst):
        moves.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", spy)
    out = tmp_path / "out"
    res = run_slide(_slide(tmp_path / "s.tif", 90, 120), model(), out, opts())
    assert res.status == "done", res.message
    placed = {dst.name: src for src, dst in moves if dst.parent == out}
    assert set(placed) >= set(res.outputs) - {"run.json"}
    for name in set(res.outputs) - {"run.json"}:
        assert placed[name].parent.parent.name.startswith(".work."), (name, placed[name])
    assert moves[-1][1] == out / "run.json"
    assert not [p for p in os.listdir(out) if p.startswith(".")]


def test_a_publish_cut_short_leaves_no_run_json(tmp_path, monkeypatch):
    """Defect: publishing a rerun's files with the earlier run.json still in place: a failure
    half-way (a full disk, a kill) leaves new and old files under a run.json that says
    "complete", and --resume skips a slide whose outputs are a mix."""
    import wsss.runner.pipeline as pipeline
    from wsss.runner import run_slide, run_slides

    path = _slide(tmp_path / "s.tif", 90, 120)
    out = tmp_path / "out"
    assert run_slide(path, model(), out, opts()).status == "done"
    real_replace = os.replace

    def fails_on_overlay(src, dst):
        if Path(dst) == out / "overlay.png":  # (publishing it; not its write into the work folder)
            raise OSError(errno.EIO, "Input/output error (test)", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", fails_on_overlay)
    res = run_slides([path], model(), [out], opts(), log=lambda s: None)
    assert res[0].status == "failed" and "overlay.png" in res[0].message
    assert not (out / "run.json").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # (the work folder went)


# --------------------------------------------------------------------------------------
# wsss.slide.reader: the message names the file (and the tile)
# --------------------------------------------------------------------------------------
def test_a_missing_slide_is_named(tmp_path):
    """Defect: open_slide's "no such file" without the path: a library caller (or a run of many
    slides) cannot tell which one is missing."""
    from wsss.errors import SlideError
    from wsss.slide import open_slide

    p = tmp_path / "cases" / "nope.svs"
    with pytest.raises(SlideError) as e:
        open_slide(p)
    assert str(e.value) == f"{p}: no such file"


def test_a_truncated_slide_names_the_tile_cut_off(tmp_path):
    """Defect: a file that ends inside a tile's bytes read as a short buffer and reported as a
    vague decoder error ("corrupt tile?") instead of "truncated" (a copy that did not finish)."""
    from wsss.errors import SlideError
    from wsss.slide import open_slide

    path = _slide(tmp_path / "t.tif")
    with tifffile.TiffFile(path) as t:
        off, count = t.pages[0].dataoffsets[3], t.pages[0].databytecounts[3]
    path.write_bytes(path.read_bytes()[:off + count // 2])
    with open_slide(path, reader="tifffile") as r:
        r.read_region(0, 0, 0, 32, 32)  # (a whole tile still reads)
        with pytest.raises(SlideError) as e:
            r.read_region(0, 32, 32, 32, 32)
    assert str(e.value).startswith(f"{path}: level 0 tile 3 is truncated")


# --------------------------------------------------------------------------------------
# wsss-infer
# --------------------------------------------------------------------------------------
def test_an_existing_unwritable_output_folder_is_refused_up_front(tmp_path, bundle, capsys, unwritable_folder):
    """Defect: an -o folder that exists but cannot be written is not caught by the up-front
    check (only a folder that cannot be made was): every slide then failed one by one, exit 1,
    instead of one line and exit 2 before any work."""
    s = _slide(tmp_path / "a.tif")
    assert _infer(s, "--model", bundle, "-o", unwritable_folder, "--no-tissue-detection", "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"wsss-infer: error: output directory {unwritable_folder} cannot be written: ")
    assert not any("FAILED" in line for line in err)

"""wsss-infer: arguments, bundle lookup, errors before work, many slides, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsss.bundle import script_module
from wsss.cli.infer import demo_bundle_path, main
from wsss.runner.model import resolve_precision

from runner_kit import RedClassModule, no_user_bundle, run_python, save_red_bundle

K = 4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return save_red_bundle(tmp_path_factory.mktemp("b") / "red.pt")


def slide(path: Path, h=70, w=90, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(32, 32), photometric="rgb", compression="zlib", resolution=(2e4, 2e4),
                  resolutionunit="CENTIMETER")
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    no_user_bundle(monkeypatch, tmp_path)


def test_help_is_fast_and_lists_options():
    r = subprocess.run([sys.executable, "-c", "import sys, wsss.cli.infer as m; sys.exit(m.main(['--help']))"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--model", "--device", "--batch-size", "--workers", "--precision", "--mpp", "--reader",
                "--precision-mode", "--tile-size", "--overlap", "--resume", "--demo"):
        assert opt in r.stdout


def test_run_one_slide(tmp_path, bundle, capsys):
    s = slide(tmp_path / "a.tif")
    rc = main([str(s), "--model", str(bundle), "-o", str(tmp_path / "out"), "--no-tissue-detection",
               "--overlap", "8", "--probs"])
    assert rc == 0
    out = tmp_path / "out" / "a"
    labels = tifffile.imread(out / "labels.tiff", key=0)
    img = tifffile.imread(s)
    np.testing.assert_array_equal(labels, (img[..., 0] // 64).clip(0, 3))
    assert (out / "probs.tiff").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["sha256"] and run["model"]["precision"] in ("float32", "bfloat16")
    assert "1 done" in capsys.readouterr().err
    # --resume skips it
    rc = main([str(s), "--model", str(bundle), "-o", str(tmp_path / "out"), "--no-tissue-detection",
               "--overlap", "8", "--probs", "--resume"])
    assert rc == 0 and "1 skipped" in capsys.readouterr().err


def test_precision_mode_reaches_the_run(tmp_path, bundle, capsys):
    """--precision bfloat16 --precision-mode autocast: run.json records both; identity differs from cast."""
    s = slide(tmp_path / "a.tif")
    runs = {}
    for mode in ("autocast", "cast"):
        rc = main([str(s), "--model", str(bundle), "-o", str(tmp_path / mode), "--no-tissue-detection",
                   "--precision", "bf16", "--precision-mode", mode, "--no-progress"])
        assert rc == 0
        runs[mode] = json.loads((tmp_path / mode / "a" / "run.json").read_text())
        assert runs[mode]["model"]["precision"] == "bfloat16"
        assert runs[mode]["model"]["precision_mode"] == mode
    assert runs["autocast"]["model"]["identity"] != runs["cast"]["model"]["identity"]
    with pytest.raises(SystemExit) as e:  # argparse's own choices check
        main([str(s), "--model", str(bundle), "--precision-mode", "fast"])
    assert e.value.code == 2 and "--precision-mode" in capsys.readouterr().err


def test_stitch_device_reaches_the_run_and_resume_ignores_it(tmp_path, bundle, capsys):
    """--stitch-device model blends on the model's device (the CPU here); same outputs as the
    host stitcher, and --resume treats the two as the same result."""
    s = slide(tmp_path / "a.tif")
    args = [str(s), "--model", str(bundle), "-o", str(tmp_path / "o"), "--no-tissue-detection", "--no-progress"]
    assert main(args + ["--stitch-device", "model"]) == 0
    run = json.loads((tmp_path / "o" / "a" / "run.json").read_text())
    assert run["tiles"]["stitch_device"] == "model" and run["options"]["stitch_device"] == "model"
    assert main(args + ["--stitch-device", "cpu", "--resume"]) == 0
    assert "1 skipped" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(args + ["--stitch-device", "gpu"])
    assert e.value.code == 2 and "--stitch-device" in capsys.readouterr().err


def test_bundle_from_env_and_config(tmp_path, bundle, monkeypatch):
    s = slide(tmp_path / "a.tif")
    monkeypatch.setenv("WSSS_BUNDLE", str(bundle))
    assert main([str(s), "--no-tissue-detection"]) == 0
    assert (tmp_path / "a.wsss" / "labels.tiff").is_file()  # default: next to the slide
    monkeypatch.delenv("WSSS_BUNDLE")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"bundle": str(bundle)}))
    monkeypatch.setenv("WSSS_CONFIG", str(cfg))
    assert main([str(s), "-o", str(tmp_path / "o2"), "--no-tissue-detection"]) == 0


@pytest.mark.parametrize("content,match", [
    ('{"bundle": 5}', '"bundle" must be a path (a string), got 5'),
    ("[1, 2]", "is not a JSON object"),
    (None, "$WSSS_CONFIG names"),  # (no such file)
])
def test_bad_user_config_is_one_line(tmp_path, capsys, monkeypatch, content, match):
    s = slide(tmp_path / "a.tif")
    cfg = tmp_path / "cfg.json"
    if content is not None:
        cfg.write_text(content)
    monkeypatch.setenv("WSSS_CONFIG", str(cfg))
    assert main([str(s)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and str(cfg) in err
    assert not (tmp_path / "a.wsss").exists()


def test_no_bundle_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WSSS_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    s = slide(tmp_path / "a.tif")
    assert main([str(s)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--demo" in err and "wsss-export" in err and "WSSS_BUNDLE" in err
    assert str(tmp_path / "xdg" / "wsss" / "config.json") in err  # (the file that would be read)
    assert not (tmp_path / "a.wsss").exists()


def test_unreadable_user_config_says_so(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{}")
    monkeypatch.setenv("WSSS_CONFIG", str(cfg))
    real = Path.read_text

    def denied(self, *a, **kw):
        if self == cfg:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", denied)
    assert main([str(slide(tmp_path / "a.tif"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"user config {cfg} cannot be read: Permission denied" in err


def test_bad_bundle(tmp_path, capsys):
    s = slide(tmp_path / "a.tif")
    fake = tmp_path / "fake.pt"
    fake.write_text("not a bundle")
    assert main([str(s), "--model", str(fake), "-o", str(tmp_path / "o")]) == 2
    assert "bundle" in capsys.readouterr().err
    assert not (tmp_path / "o" / "a").exists()


def test_missing_and_bad_slides_reported_others_finish(tmp_path, bundle, capsys):
    good = slide(tmp_path / "good.tif")
    notslide = tmp_path / "bad.svs"
    notslide.write_text("text")
    rc = main([str(tmp_path / "missing.svs"), str(notslide), str(good), "--model", str(bundle),
               "-o", str(tmp_path / "o"), "--no-tissue-detection"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "missing.svs: no such file" in err and "bad.svs" in err and "1 done" in err and "2 failed" in err
    assert (tmp_path / "o" / "good" / "run.json").is_file()
    assert not (tmp_path / "o" / "bad").exists()


def test_unexpected_error_opening_one_slide_is_that_slides_alone(tmp_path, bundle, capsys, monkeypatch):
    """Whatever goes wrong opening a slide (here a reader bug: ZeroDivisionError) is reported
    for that slide; the others run."""
    import wsss.slide

    real_open = wsss.slide.open_slide

    def open_slide(path, **kw):
        if Path(path).name == "odd.tif":
            raise ZeroDivisionError("division by zero")
        return real_open(path, **kw)

    monkeypatch.setattr(wsss.slide, "open_slide", open_slide)
    odd, good = slide(tmp_path / "odd.tif"), slide(tmp_path / "good.tif")
    rc = main([str(odd), str(good), "--model", str(bundle), "-o", str(tmp_path / "o"), "--no-tissue-detection"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"{odd}: cannot be opened as a slide: ZeroDivisionError: division by zero" in err
    assert "1 done" in err and "1 failed" in err and (tmp_path / "o" / "good" / "run.json").is_file()


@pytest.mark.parametrize("flag", ["--background-outputs", "--no-background-outputs"])
def test_background_outputs_flag(tmp_path, bundle, capsys, flag):
    a, b = slide(tmp_path / "a.tif"), slide(tmp_path / "b.tif")
    notslide = tmp_path / "c.svs"
    notslide.write_text("text")
    rc = main([str(a), str(notslide), str(b), "--model", str(bundle), "-o", str(tmp_path / "o"),
               "--no-tissue-detection", "--no-progress", flag])
    err = capsys.readouterr().err
    assert rc == 1 and "2 done" in err and "1 failed" in err
    ends = [line.split(":")[0] for line in err.splitlines() if ": done in" in line]
    assert ends == ["a.tif", "b.tif"] and "c.svs" in err  # the bad one up front, then in order
    for name in ("a", "b"):
        run = json.loads((tmp_path / "o" / name / "run.json").read_text())
        assert run["options"]["background_outputs"] is (flag == "--background-outputs")


@pytest.mark.parametrize("flag,early", [([], False), (["--early-pyramid"], True), (["--no-early-pyramid"], False)])
def test_early_pyramid_flag(tmp_path, bundle, flag, early):
    a = slide(tmp_path / "a.tif")
    assert main([str(a), "--model", str(bundle), "-o", str(tmp_path / "o"), "--no-tissue-detection",
                 "--no-progress", *flag]) == 0
    run = json.loads((tmp_path / "o" / "a" / "run.json").read_text())
    assert run["tiles"]["pyramid_during_tiles"] is early  # default: only when the model runs on CUDA


def test_all_slides_bad_is_a_slide_failure(tmp_path, bundle, capsys):
    """A slide that cannot be read fails like a slide that fails while it runs (exit 1), found
    up front or not; and a run with nothing to do creates no output folder."""
    assert main([str(tmp_path / "missing.svs"), "--model", str(bundle), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "missing.svs: FAILED: " in err and "no such file" in err and "0 done, 0 skipped (resume), 1 failed" in err
    assert not (tmp_path / "o").exists()
    assert "wsss-infer: model" not in err  # (missing files fail before the bundle loads)


@pytest.mark.parametrize("output", [None, "new/o"])
def test_slide_failing_midway_leaves_no_empty_folders(tmp_path, bundle, capsys, output):
    """A slide that opens but fails while its tiles run (a corrupt tile) leaves neither its
    default <stem>.wsss/ folder nor an -o folder the run made."""
    p = slide(tmp_path / "c.tif", h=64, w=64)
    with tifffile.TiffFile(p) as t:
        off = t.pages[0].dataoffsets[3]
    data = bytearray(p.read_bytes())
    data[off:off + 16] = b"\x00garbage-bytes!!"
    p.write_bytes(bytes(data))
    before = sorted(tmp_path.iterdir())
    args = ["-o", str(tmp_path / output)] if output else []
    assert main([str(p), "--model", str(bundle), "--no-tissue-detection", "--no-progress", *args]) == 1
    assert "tile 3" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before


def test_a_folder_stands_for_its_slides(tmp_path, bundle, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("b.tif", "a.svs.tiff"):
        slide(folder / name)
    (folder / "notes.txt").write_text("not a slide")
    (folder / "a.wsss").mkdir()  # an earlier run's outputs: not a slide
    (tmp_path / "empty").mkdir()
    assert main([str(folder), "--model", str(bundle), "-o", str(tmp_path / "o"), "--no-tissue-detection",
                 "--no-progress"]) == 0
    assert "2 done" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.svs", "b"]
    assert main([str(tmp_path / "empty"), "--model", str(bundle), "-o", str(tmp_path / "o2")]) == 2
    assert "empty: a folder without slide files (.svs" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_slide_without_mpp_needs_flag(tmp_path, bundle, capsys):
    p = tmp_path / "nompp.tif"
    tifffile.imwrite(p, np.zeros((40, 40, 3), np.uint8), tile=(32, 32), photometric="rgb")
    assert main([str(p), "--model", str(bundle), "-o", str(tmp_path / "o")]) == 1  # (that slide failed)
    assert "--mpp" in capsys.readouterr().err
    assert main([str(p), "--model", str(bundle), "-o", str(tmp_path / "o"), "--mpp", "0.5",
                 "--no-tissue-detection"]) == 0


def test_unwritable_output(tmp_path, bundle, capsys, unwritable_folder):
    s = slide(tmp_path / "a.tif")
    out = unwritable_folder / "x"
    assert main([str(s), "--model", str(bundle), "-o", str(out)]) == 2
    assert f"output directory {out} cannot be written" in capsys.readouterr().err
    assert not out.exists()


def test_a_slide_whose_own_folder_is_read_only_says_to_pass_o(tmp_path, bundle, capsys, monkeypatch):
    """Without -o results go beside the slide; slides on a read-only share fail there with a hint."""
    import wsss.runner.pipeline as pipeline
    from wsss.errors import WsssError

    s = slide(tmp_path / "a.tif")

    def read_only(folder):
        raise WsssError(f"output directory {folder} cannot be written: Read-only file system")

    monkeypatch.setattr(pipeline, "check_output_dir", read_only)
    assert main([str(s), "--model", str(bundle)]) == 1
    assert "cannot be written: Read-only file system; pass -o OUTDIR to write the results elsewhere" in \
        capsys.readouterr().err


def test_output_is_a_file(tmp_path, bundle, capsys):
    s = slide(tmp_path / "a.tif")
    f = tmp_path / "file"
    f.write_text("x")
    assert main([str(s), "--model", str(bundle), "-o", str(f)]) == 2
    assert f"output directory {f} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--overlap", "40"], "--overlap (40) must be smaller than the tile size (32)"),
    (["--precision", "int8"], "--precision must be one of"),
    (["--mpp", "-2"], "--mpp must be a positive"),
    (["--tissue-mask", "/nonexistent.png"], "--tissue-mask /nonexistent.png: no such file"),
    (["--device", "foo"], "--device: 'foo' is not a device (expected cpu, cuda, cuda:N or auto)"),
    (["--device", "mps"], "--device: 'mps' is not a device (expected cpu, cuda, cuda:N or auto)"),
    # (no GPU: CUDA is missing; with one: cuda:99 is)
    (["--device", "cuda:99"], "CUDA is not available on this machine" if not torch.cuda.is_available()
     else "CUDA device(s), cuda:0 to"),
])
def test_bad_options_rejected_before_work(tmp_path, bundle, capsys, args, match):
    s = slide(tmp_path / "a.tif")
    assert main([str(s), "--model", str(bundle), "-o", str(tmp_path / "o")] + args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o" / "a").exists()


def test_ome_tiff_outputs_go_to_the_plain_stem():
    from wsss.cli.infer import out_dir_for

    assert out_dir_for(Path("/d/x.ome.tif"), "/o") == Path("/o/x")
    assert out_dir_for(Path("/d/x.OME.TIFF"), None) == Path("/d/x.wsss")
    assert out_dir_for(Path("/d/x.svs"), None) == Path("/d/x.wsss")


def test_same_stem_twice_rejected(tmp_path, bundle, capsys):
    (tmp_path / "x").mkdir()
    a = slide(tmp_path / "a.tif")
    b = slide(tmp_path / "x" / "a.tif")
    assert main([str(a), str(b), "--model", str(bundle), "-o", str(tmp_path / "o")]) == 2
    assert "same folder" in capsys.readouterr().err


def test_a_slide_named_twice_runs_once(tmp_path, bundle, capsys):
    (tmp_path / "slides").mkdir()
    a = slide(tmp_path / "slides" / "a.tif")
    assert main([str(tmp_path / "slides"), str(a), "--model", str(bundle), "-o", str(tmp_path / "o"),
                 "--no-tissue-detection"]) == 0
    err = capsys.readouterr().err
    assert f"{a} is named more than once: it runs once" in err and "1 done, 0 skipped (resume), 0 failed" in err


SOURCE_DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "wsss" / "assets" / "demo_bundle.pt"


def test_demo_without_bundle_says_so(tmp_path, capsys, monkeypatch):
    import wsss.cli.infer as infer

    monkeypatch.setattr(infer, "demo_bundle_path", lambda: tmp_path / "assets" / "demo_bundle.pt")
    assert main(["--demo", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "demo bundle" in err and "never substitutes a fake model" in err
    assert not (tmp_path / "d" / "synthetic_slide").exists()


@pytest.mark.parametrize("args,match", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--mpp", "0.25"], "--demo generates its own slide (its resolution and truth known); --mpp does not apply"),
    (["--tissue-mask", "m.png"], "--tissue-mask does not apply"),
    ([], "$WSSS_DEMO_SIZE must be a whole number of pixels, 1 or more; got 'abc'"),
    ([], "$WSSS_DEMO_SIZE must be a whole number of pixels, 1 or more; got '0'"),
    (["--overlap", "96"], "--overlap (96) must be smaller than the tile size (96)"),  # (the bundle's tile)
])
def test_demo_checks_its_options_before_writing_the_slide(tmp_path, capsys, monkeypatch, args, match):
    if "WSSS_DEMO_SIZE" in match:
        monkeypatch.setenv("WSSS_DEMO_SIZE", match.split("got ")[1].strip("'"))
    assert main(["--demo", str(tmp_path / "d")] + args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_what_the_run_says(tmp_path, bundle, capsys, monkeypatch):
    """The model in use is named; a bad bundle from $WSSS_BUNDLE says where it came from; --mpp
    overriding a slide's own resolution is said; a run without tissue says so; bad --mpp,
    --tile-size and --tissue-mask values get one message each, before any work."""
    s = tmp_path / "a.tif"  # 0.5 um/px, blank glass
    tifffile.imwrite(s, np.full((70, 90, 3), 240, np.uint8), tile=(32, 32), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    assert main([str(s), "--model", str(bundle), "-o", str(tmp_path / "o"), "--mpp", "0.25",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    auto = resolve_precision("auto", "cpu")  # bfloat16 on a CPU with bf16 matrix units
    assert f"wsss-infer: model {bundle} (4 classes: A, B, C, D; 0.5 um/px, tile 32; cpu, {auto}" in err
    assert "wsss-infer: warning: a.tif: --mpp 0.25 overrides the slide's own 0.5 um/px" in err
    assert "downsampled x2" in err
    assert "a.tif: warning: no tissue found (the slide has no colour: detection looks for stained tissue)" in err
    aniso = tmp_path / "aniso.tif"  # 0.5 x 0.25 um/px: refused without --mpp, said with it
    tifffile.imwrite(aniso, np.full((70, 90, 3), 240, np.uint8), tile=(32, 32), photometric="rgb",
                     resolution=(2e4, 4e4), resolutionunit="CENTIMETER")
    assert main([str(aniso), "--model", str(bundle), "-o", str(tmp_path / "o4"), "--mpp", "0.5", "--no-progress"]) == 0
    assert "--mpp 0.5 reads as square pixels a slide whose metadata says 0.5 x 0.25 um/px" in capsys.readouterr().err
    monkeypatch.setenv("WSSS_BUNDLE", str(tmp_path / "gone.pt"))
    assert main([str(s), "-o", str(tmp_path / "o2")]) == 2
    assert "(the bundle named by $WSSS_BUNDLE)" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    (tmp_path / "notes.png").write_text("not an image")
    for args, match in [(["--mpp", "inf"], "--mpp must be a positive number"),
                        (["--tile-size", "100000"], "--tile-size must be between 16 and 8192 pixels"),
                        (["--tissue-mask", str(tmp_path / "notes.png")], "not an image PIL can read"),
                        (["--tissue-mask", str(tmp_path)], "is a directory, not an image file")]:
        assert main([str(s), "--model", str(bundle), "-o", str(tmp_path / "o3")] + args) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("error:") == 1, err
    assert not (tmp_path / "o3").exists()


def test_synthetic_only_bundle_on_a_slide_is_flagged(tmp_path, capsys):
    s = slide(tmp_path / "a.tif", h=100, w=100)
    assert main([str(s), "--model", str(demo_bundle_path()), "-o", str(tmp_path / "o"), "--mpp", "1.0",
                 "--no-progress"]) == 0
    assert "is the synthetic-only demo model, trained on generated tissue: its maps of real slides are " \
           "meaningless" in capsys.readouterr().err


def test_any_bundle_trained_on_synthetic_data_is_flagged(tmp_path, capsys):
    from wsss.bundle import save_bundle

    path = tmp_path / "syn.pt"
    save_bundle(str(path), script_module(RedClassModule()), {
        "class_names": ["A", "B", "C", "D"], "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]],
        "background_index": 4, "tile_size": 32, "mpp": 0.5, "synthetic_only": True,
        "config": {"dataset": "synthetic-4"}})
    assert main([str(slide(tmp_path / "a.tif")), "--model", str(path), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert f"{path} is a model trained on generated tissue only (dataset synthetic-4): its maps of real slides " \
           "are meaningless" in capsys.readouterr().err


@pytest.mark.parametrize("signame,rc,said", [("SIGINT", 130, "wsss-infer: interrupted"),
                                             ("SIGTERM", 143, "wsss-infer: stopped by SIGTERM")])
def test_ctrl_c_mid_run_leaves_finished_slides_and_nothing_half_written(tmp_path, bundle, signame, rc, said):
    """SIGINT (or a batch system's SIGTERM) while the second of three slides runs (the first
    one's outputs being written behind it): one line and exit 128 + the signal; the first slide
    complete, the others absent or complete, no temporaries and no work folders anywhere.
    (SIGTERM killed the process at once: the work folder stayed, the slide behind was lost.)"""
    import signal
    import textwrap
    import time

    slides = [slide(tmp_path / f"{n}.tif", h=160, w=160, seed=i) for i, n in enumerate("abc")]
    script = tmp_path / "slow_infer.py"
    script.write_text(textwrap.dedent("""
        import dataclasses, sys, time
        from wsss.runner import pipeline
        real = pipeline.SlideModel.from_bundle
        def slow(*a, **k):  # 40 ms per batch: time to be interrupted
            m = real(*a, **k)
            def predict(x, inner=m.predict):
                time.sleep(0.04)
                return inner(x)
            return dataclasses.replace(m, predict=predict, submit=None)
        pipeline.SlideModel.from_bundle = staticmethod(slow)
        from wsss.cli.infer import main
        sys.exit(main(sys.argv[1:]))
    """))
    out = tmp_path / "o"
    # NB: the script imports wsss as the tests do (the installed package, with its op library)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, slides), "--model", str(bundle), "-o", str(out),
                             "--no-tissue-detection", "--no-progress", "--batch-size", "1"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "a" / "run.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()
    proc.send_signal(getattr(signal, signame))
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == rc and said in err and "Traceback" not in err, err
    assert json.loads((out / "a" / "run.json").read_text())["status"] == "complete"
    assert "slides finished before the interrupt (a.tif" in err and "run again with --resume to skip them" in err
    for name in "bc":
        if (out / name).exists():
            assert json.loads((out / name / "run.json").read_text())["status"] == "complete", name
    left = [p.relative_to(out) for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")
            or (p.is_dir() and p.parent != out)]
    assert not left, left


@pytest.mark.slow
def test_demo_runs(tmp_path, capsys, monkeypatch):
    """The README's first command: shipped demo bundle on a generated slide, accuracy printed."""
    import re

    # NB: the bundle ships in the package (tracked, package-data): missing is a broken build, not a skip
    assert demo_bundle_path().is_file(), f"{demo_bundle_path()} is not installed (source: {SOURCE_DEMO_BUNDLE})"
    monkeypatch.setenv("WSSS_DEMO_SIZE", "1024")
    assert main(["--demo", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    m = re.search(r"pixel accuracy ([0-9.]+) over (\d+) tissue pixels", out)
    assert m, out
    # 4 classes: chance is ~0.25 (the shipped model: 0.92 on the default 3072^2 slide, measured)
    assert float(m.group(1)) > 0.5 and int(m.group(2)) > 0.5 * 1024 * 1024
    res = tmp_path / "d" / "synthetic_slide"
    for name in ("labels.tiff", "overlay.png", "tissue_qc.png", "areas.json", "areas.csv", "polygons.geojson",
                 "run.json"):
        assert (res / name).is_file(), name
    run = json.loads((res / "run.json").read_text())
    assert run["status"] == "complete" and Path(run["model"]["path"]).name == "demo_bundle.pt"
    assert json.loads((res / "polygons.geojson").read_text())["features"]


def test_demo_without_tissue_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WSSS_DEMO_SIZE", "10")  # (the generator's 10^2 px at 1 um/px are glass)
    assert main(["--demo", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "no accuracy: the synthetic slide has no tissue pixels" in out and "nan" not in out


def test_device_auto_picks_cuda_where_visible(tmp_path, bundle, capsys):
    s = slide(tmp_path / "a.tif")
    assert main([str(s), "--model", str(bundle), "-o", str(tmp_path / "o"), "--device", "auto",
                 "--no-tissue-detection"]) == 0
    run = json.loads((tmp_path / "o" / "a" / "run.json").read_text())
    assert run["model"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("visible", [True, False])
def test_default_device_names_a_visible_gpu(tmp_path, bundle, capsys, monkeypatch, visible):
    """The CPU default stays (a run's outputs must not depend on the machine), but a user with a
    GPU is told it is there and how to use it; --device given silences the note."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    s = slide(tmp_path / "a.tif")
    assert main([str(s), "--model", str(bundle), "-o", str(tmp_path / "o"), "--no-tissue-detection"]) == 0
    err = capsys.readouterr().err
    assert ("a CUDA GPU is visible" in err) == visible
    assert json.loads((tmp_path / "o" / "a" / "run.json").read_text())["model"]["device"] == "cpu"
    if visible:
        assert "--device auto" in err
        assert main([str(s), "--model", str(bundle), "-o", str(tmp_path / "p"), "--no-tissue-detection",
                     "--device", "cpu"]) == 0
        assert "a CUDA GPU is visible" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["infer", "export", "train_cls", "train_seg", "pseudo_masks", "eval"])
def test_help_imports_no_torch(command):
    """Every command's --help answers without importing torch or numpy (it took ~1.7 s, all of it
    loading torch and the op library at ``import wsss``)."""
    code = (f"import sys\nfrom wsss.cli.{command} import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("args,message", [
    (["--min-tissue", "1.5", "x.tif"], "--min-tissue must be in [0, 1), got 1.5"),
    (["--overlap", "-1", "x.tif"], "--overlap must be 0 or more, got -1"),
    ([], "no slide given: wsss-infer SLIDE... --model BUNDLE -o OUTDIR (or --demo OUTDIR)"),
    (["--demo", "d", "x.tif"], "--demo runs on a generated synthetic slide; give no SLIDE with it"),
    (["--demo", "d", "--model", "m.pt"], "--demo uses the shipped demo bundle; do not combine it with --model"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"wsss-infer: error: {message}\n"
    assert list(tmp_path.iterdir()) == []

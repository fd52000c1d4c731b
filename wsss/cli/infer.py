"""wsss-infer: tissue maps of whole slides.

    wsss-infer SLIDE... --model BUNDLE -o OUTDIR [options]     (SLIDE: a file, or a folder of slides)
    wsss-infer --demo OUTDIR

Per slide, OUTDIR/<slide stem>/ gets labels.tiff (pyramidal palette TIFF, opens in OpenSlide
and QuPath), overlay.png, tissue_qc.png, areas.json/.csv, polygons.geojson and run.json
(plus probs.tiff with --probs).  Without -o a slide's outputs go next to it, into
<slide folder>/<slide stem>.wsss/.  Without --model the bundle named by $WSSS_BUNDLE or by
"bundle" in the user config ($WSSS_CONFIG, else $XDG_CONFIG_HOME/wsss/config.json, by default
~/.config/wsss/config.json) is used.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from wsss.cli import run

PROG = "wsss-infer"


def how_to_get_a_bundle() -> str:
    return ("no model bundle: pass --model BUNDLE.pt, or set WSSS_BUNDLE=/path/to/bundle.pt, or write "
            f'{{"bundle": "/path/to/bundle.pt"}} to {user_config_path()}. No real-tissue model comes with wsss; to '
            "get a bundle, train one on your patches (wsss-train-cls, wsss-pseudo-masks, wsss-train-seg --bundle: "
            "docs/training.md), or export checkpoints of the reference code (wsss-export --help); to see the runner work on a synthetic slide, run "
            "wsss-infer --demo OUTDIR (synthetic-only demo model)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Segment whole slides into tissue classes with a wsss model bundle.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  wsss-infer --demo demo_out                            synthetic slide + shipped demo model, prints accuracy\n"
               "  wsss-infer slide.svs --model bundle.pt                outputs in slide.wsss/ beside the slide\n"
               "  wsss-infer slides/ -m bundle.pt -o results/           every slide of a folder, results/<name>/ each\n"
               "  wsss-infer slides/ -m bundle.pt -o results/ --resume  skip the slides already done\n"
               "  wsss-infer scan.tif -m bundle.pt --mpp 0.25           a TIFF without resolution metadata\n"
               "\n"
               "Outputs per slide: labels.tiff, overlay.png, tissue_qc.png, areas.json, areas.csv,\n"
               "polygons.geojson, run.json (probs.tiff with --probs); labels.tiff and the areas' pixel\n"
               "counts are at the model's resolution (run.json: scale), polygons in level-0 pixels of the\n"
               "slide.  Exit status: 0 all slides done or skipped, 1 some slide failed, 2 bad\n"
               "arguments/bundle (nothing run), 130 Ctrl-C, 143 SIGTERM (finished slides stay complete).\n"
               "More: docs/runner.md.")
    p.add_argument("slides", nargs="*", metavar="SLIDE",
                   help="slide files (.svs, .ndpi, .mrxs, .tif, OME-TIFF, ...) or folders of them")
    p.add_argument("-m", "--model", metavar="BUNDLE",
                   help="model bundle (.pt); default $WSSS_BUNDLE, else \"bundle\" in the user config "
                        "($WSSS_CONFIG, else $XDG_CONFIG_HOME/wsss/config.json, by default ~/.config/wsss/config.json)")
    p.add_argument("-o", "--output", "--out", dest="output", metavar="OUTDIR",
                   help="output folder; each slide gets OUTDIR/<stem>/ (default: <slide folder>/<stem>.wsss/)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N, or auto (CUDA where a GPU is visible) (default cpu; a note says "
                        "when a GPU is visible)")
    p.add_argument("--precision", default="auto",
                   help="auto (default: bfloat16 on CPUs with bf16 matrix units, else float32; on CUDA bfloat16 where "
                        "the GPU supports it, else float16), "
                        "float32 (fp32), bfloat16 (bf16) or float16 (fp16, half)")
    p.add_argument("--precision-mode", choices=["cast", "autocast"],
                   help="how reduced precision is applied: cast (a bf16/fp16 copy of the weights; default on CPU) "
                        "or autocast (float32 weights under torch.autocast; default on CUDA)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per model call (default: 32 when the model runs on CUDA, else 8; a batch the GPU "
                        "has no memory for runs in halves, and the rest of the slide in batches that fit)")
    p.add_argument("--workers", type=int, default=None,
                   help="tile reader threads, each with its own slide handle (default: 4 when the model runs on "
                        "CUDA, else 2; 0: read in the main thread)")
    p.add_argument("--stitch-threads", type=int, default=0, choices=[0, 1, 2],
                   help="1: blend and finalise output on one thread; 2: finalise on a second thread; "
                        "0 (default): 2 on CUDA, 1 on the CPU (blending on the CPU only)")
    p.add_argument("--stitch-device", default="auto", choices=["auto", "cpu", "model"],
                   help="where overlapping predictions are blended: on the model's device (model) or in CPU "
                        "threads (cpu); auto (default): the device on CUDA when its band fits, else the CPU")
    p.add_argument("--background-outputs", action=argparse.BooleanOptionalAction, default=True,
                   help="with several slides, write one slide's outputs while the next slide's tiles run "
                        "(default: on)")
    p.add_argument("--early-pyramid", action=argparse.BooleanOptionalAction, default=None,
                   help="build the label pyramid while the tiles run, on cores the model leaves idle "
                        "(default: on when the model runs on CUDA)")
    p.add_argument("--mpp", type=float,
                   help="microns per pixel of the slides' level 0: needed for slides without (or with implausible) "
                        "resolution metadata; overrides the metadata of slides that have it")
    p.add_argument("--reader", default="auto", choices=["auto", "openslide", "tifffile"], help="slide reader (default auto)")
    p.add_argument("--tile-size", type=int, help="tile edge in pixels at the model's resolution (default: the bundle's)")
    p.add_argument("--overlap", type=int,
                   help="overlap between neighbouring tiles in pixels at the model's resolution (default tile/8)")
    tissue = p.add_mutually_exclusive_group()
    tissue.add_argument("--tissue-mask", metavar="IMAGE", help="tissue mask image (non-zero = tissue) instead of detection")
    tissue.add_argument("--no-tissue-detection", action="store_true", help="treat the whole slide as tissue")
    p.add_argument("--min-tissue", type=float, default=0.0,
                   help="run a tile only when its tissue fraction is above this, in [0, 1) (default 0: any tissue)")
    p.add_argument("--probs", action="store_true", help="also write probs.tiff (float16 class probabilities)")
    p.add_argument("--resume", action="store_true", help="skip slides whose outputs match the same model and options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--demo", metavar="OUTDIR",
                   help="run the shipped synthetic-only demo model on a generated synthetic slide (3072^2 px, "
                        "$WSSS_DEMO_SIZE to change; ~6 MB with its truth mask, written into OUTDIR) and report its "
                        "accuracy against the truth; 15-40 s on 2 CPU cores")
    return p


def user_config_path() -> Path:
    env = os.environ.get("WSSS_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "wsss" / "config.json"


def find_bundle_and_source(model_arg: Optional[str]) -> Tuple[str, str]:
    """(bundle path, where it was named: "--model", "$WSSS_BUNDLE" or "user config PATH"): --model,
    else $WSSS_BUNDLE, else "bundle" in the user config; else BundleError saying how to get one."""
    from wsss.errors import BundleError

    if model_arg:
        return model_arg, "--model"
    env = os.environ.get("WSSS_BUNDLE")
    if env:
        return env, "$WSSS_BUNDLE"
    cfg = user_config_path()
    if os.environ.get("WSSS_CONFIG") and not cfg.is_file():
        raise BundleError(f"$WSSS_CONFIG names {cfg}, which is not a file")
    if cfg.is_file():
        try:
            text = cfg.read_text(encoding="utf-8")
        except OSError as e:
            raise BundleError(f"user config {cfg} cannot be read: {e.strerror or e}") from None
        try:
            bundle = json.loads(text).get("bundle")
        except (ValueError, AttributeError) as e:
            raise BundleError(f"user config {cfg} is not a JSON object: {e}") from None
        if bundle is not None and not isinstance(bundle, str):
            raise BundleError(f'user config {cfg}: "bundle" must be a path (a string), got {json.dumps(bundle)}')
        if bundle:
            return str(Path(bundle).expanduser()), f"user config {cfg}"
    raise BundleError(how_to_get_a_bundle())


def demo_bundle_path() -> Path:
    import wsss

    return Path(wsss.__file__).resolve().parent / "assets" / "demo_bundle.pt"


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    # NB: tifffile logs what it finds wrong in a damaged file as it parses it; the reader turns
    # what matters into one message naming the slide, so its log lines would only be noise
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    from wsss.errors import WsssError
    from wsss.runner.pipeline import preload_slide_libraries

    preload_slide_libraries()  # (while the bundle loads)

    if args.demo:
        if args.slides:
            raise WsssError("--demo runs on a generated synthetic slide; give no SLIDE with it")
        return run_demo(args)
    if not args.slides:
        raise WsssError("no slide given: wsss-infer SLIDE... --model BUNDLE -o OUTDIR (or --demo OUTDIR)")
    return run_many(args, slides_of(args.slides))


# what a folder argument expands to (OpenSlide's vendor formats, TIFF/OME-TIFF, QPTIFF); NB: not
# .dcm, where a folder of files is one slide, and not the .mrxs companion folders (no suffix)
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff", ".qptiff")


def slides_of(arguments: Sequence[str]) -> List[Path]:
    """SLIDE arguments -> slide paths: a folder stands for the slide files directly inside it
    (by suffix, sorted by name); anything else is taken as given (a missing file fails as that
    slide).  A slide named twice (``slides/ slides/a.svs``) runs once, said on stderr.  A folder
    without slide files is a WsssError naming it."""
    from wsss.errors import WsssError

    out: List[Path] = []
    for a in arguments:
        p = Path(a)
        if p.is_dir() and p.suffix.lower() != ".mrxs":
            found = sorted(c for c in p.iterdir() if c.is_file() and c.name.lower().endswith(SLIDE_SUFFIXES))
            if not found:
                raise WsssError(f"{p}: a folder without slide files ({', '.join(SLIDE_SUFFIXES)})")
            out += found
        else:
            out.append(p)
    seen: set = set()
    unique: List[Path] = []
    for p in out:
        key = p.resolve()
        if key in seen:
            print(f"{PROG}: {p} is named more than once: it runs once", file=sys.stderr)
            continue
        seen.add(key)
        unique.append(p)
    return unique


def _options(args):
    from wsss.errors import WsssError
    from wsss.runner import RunOptions

    from wsss.cli._train_args import check_args

    check_args(args, out_folders=(), out_files=())  # --batch-size, --workers, --tile-size (as the other commands)
    from wsss.train.common import resolve_device

    args.device_given = args.device is not None
    args.device = str(resolve_device(args.device or "cpu"))  # (auto -> cuda or cpu; one line for a bad one)
    if args.overlap is not None and args.overlap < 0:
        raise WsssError(f"--overlap must be 0 or more, got {args.overlap}")
    if args.mpp is not None and not (args.mpp > 0 and math.isfinite(args.mpp)):
        raise WsssError(f"--mpp must be a positive number of microns per pixel, got {args.mpp}")
    if not 0.0 <= args.min_tissue < 1.0:
        raise WsssError(f"--min-tissue must be in [0, 1), got {args.min_tissue}")
    tissue = "none" if args.no_tissue_detection else (args.tissue_mask or "auto")
    if args.tissue_mask:  # (checked once, before any slide runs, not once per slide)
        from wsss.slide.tissue import read_mask_image

        read_mask_image(args.tissue_mask)
    opts = RunOptions(tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size, workers=args.workers,
                      stitch_threads=args.stitch_threads, stitch_device=args.stitch_device,
                      background_outputs=args.background_outputs, early_pyramid=args.early_pyramid,
                      mpp=args.mpp, reader=args.reader, tissue=tissue, min_tissue=args.min_tissue,
                      write_probs=args.probs, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty())
    tile = opts.tile_size
    if tile is not None and opts.overlap is not None and opts.overlap >= tile:
        raise WsssError(f"--overlap ({opts.overlap}) must be smaller than the tile size ({tile})")
    return opts


def _check_overlap(options, model) -> None:
    """--overlap against the model's tile size, once the bundle is loaded (``_options`` checks it
    against --tile-size)."""
    from wsss.errors import WsssError

    if options.tile_size is None and options.overlap is not None and options.overlap >= model.tile_size:
        raise WsssError(f"--overlap ({options.overlap}) must be smaller than the tile size ({model.tile_size})")


def _load_model(path: str, args):
    import torch

    from wsss.bundle import load_bundle
    from wsss.runner import SlideModel

    import warnings

    with warnings.catch_warnings():
        # NB: torch 2.14 marks torch.jit.load deprecated on every call; a user can do nothing about it
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        bundle = load_bundle(path, device="cpu")
        model = SlideModel.from_bundle(bundle, device=args.device, precision=args.precision,
                                       precision_mode=args.precision_mode)
    d = model.description
    print(f"{PROG}: model {path} ({len(model.class_names)} classes: {', '.join(map(str, model.class_names))}; "
          f"{'%g um/px' % model.mpp if model.mpp else 'any resolution'}, tile {model.tile_size}; "
          f"{d.get('device', args.device)}, "
          f"{d.get('precision', args.precision)}; sha256 {str(d.get('sha256', '?'))[:12]})", file=sys.stderr)
    if not args.device_given and torch.cuda.is_available():
        print(f"{PROG}: note: a CUDA GPU is visible, but the model runs on the CPU by default: "
              f"--device auto (or cuda) runs it on the GPU", file=sys.stderr)
    if bundle.metadata.get("synthetic_only") and not args.demo:
        what = "the synthetic-only demo model, trained on generated tissue" \
            if Path(path).resolve() == demo_bundle_path().resolve() else \
            f"a model trained on generated tissue only (dataset {bundle.metadata['config'].get('dataset', '?')})"
        print(f"{PROG}: warning: {path} is {what}: its maps of real slides are meaningless (train or export a "
              f"real bundle: wsss-infer --help)", file=sys.stderr)
    return model


def out_dir_for(slide: Path, output: Optional[str]) -> Path:
    stem = slide.stem[:-4] if slide.stem.lower().endswith(".ome") else slide.stem  # x.ome.tif -> x
    return Path(output) / stem if output else slide.parent / f"{stem}.wsss"


def run_many(args, slides: List[Path]) -> int:
    """Check everything that can be checked, then run the good slides; exit 1 if any slide failed.

    NB: nothing is created on disk before the bundle has loaded and some slide can be read: a
    refused run leaves no empty output folders behind."""
    from wsss.errors import BundleError, WsssError
    from wsss.runner import run_slides
    from wsss.runner.pipeline import check_distinct_out_dirs
    from wsss.runner.tile_stage import default_workers, reader_processes
    from wsss.slide import open_slide

    options = _options(args)
    bundle_path, source = find_bundle_and_source(args.model)
    # Output folders: distinct per slide (checked here, created once the run can go ahead).
    out_dirs = [out_dir_for(s, args.output) for s in slides]
    check_distinct_out_dirs(slides, out_dirs)
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise WsssError(f"output directory {args.output} is a file, not a folder")
    # A missing file fails before the bundle loads (seconds, with CUDA's start): if no slide is
    # left, it never loads.
    bad: List[Tuple[Path, str]] = []
    present = []
    for s, o in zip(slides, out_dirs):
        if s.exists():
            present.append((s, o))
        else:
            bad.append((s, f"{s}: no such file"))
            print(f"{s.name}: FAILED: {s}: no such file", file=sys.stderr)
    if not present:
        print(f"{PROG}: 0 done, 0 skipped (resume), {len(bad)} failed", file=sys.stderr)
        return 1
    if reader_processes(args.device) and args.workers != 0:
        from wsss.runner import reading

        reading.reserve(default_workers(args.device) if args.workers is None else args.workers)  # (while the bundle loads)
    try:
        model = _load_model(bundle_path, args)
    except BundleError as e:
        if source == "--model":
            raise
        raise BundleError(f"{e} (the bundle named by {source})") from None
    _check_overlap(options, model)
    # Slides: open each once before any work, so bad ones are reported up front.
    good = []
    for s, o in present:
        try:
            with open_slide(s, reader=args.reader, mpp=args.mpp) as r:
                r.mpp  # noqa: B018  (raises for a slide without mpp metadata)
                _warn_if_mpp_overrides(r, args.mpp)
            good.append((s, o))
        except Exception as e:  # a bad slide is reported and skipped; the others run
            message = str(e) if isinstance(e, WsssError) else f"{s}: cannot be opened as a slide: {type(e).__name__}: {e}"
            bad.append((s, message))
            print(f"{Path(s).name}: FAILED: {message}", file=sys.stderr)  # (as the runner logs a slide)
    made: List[Path] = []  # folders the checks below created: removed again if left empty
    if good:
        if args.output:
            made += _check_output_dir(Path(args.output))
        for s, o in list(good):
            if not args.output:
                try:
                    made += _check_output_dir(o)
                except WsssError as e:  # (slides on a read-only share: the default folder is beside them)
                    message = f"{e}; pass -o OUTDIR to write the results elsewhere"
                    good.remove((s, o))
                    bad.append((s, message))
                    print(f"{Path(s).name}: FAILED: {message}", file=sys.stderr)
    started = time.time()
    try:
        results = run_slides([s for s, _ in good], model, [o for _, o in good], options) if good else []
    except KeyboardInterrupt:
        _say_what_finished(good, started)
        raise
    finally:
        for folder in reversed(made):  # NB: a slide that failed leaves no empty <stem>.wsss/ (or -o folder)
            with contextlib.suppress(OSError):
                folder.rmdir()
    failed = [r for r in results if r.status == "failed"] + bad
    done = sum(r.status == "done" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    print(f"{PROG}: {done} done, {skipped} skipped (resume), {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


def _say_what_finished(slides: Sequence[Tuple[Path, Path]], started: float) -> None:
    """After Ctrl-C: how many slides this run finished (their run.json written since it started;
    their outputs are complete) and that --resume skips them."""
    done = []
    for s, o in slides:
        with contextlib.suppress(OSError):
            if (o / "run.json").stat().st_mtime >= started:
                done.append(Path(s).name)
    if done:
        print(f"{PROG}: {len(done)} of {len(slides)} slides finished before the interrupt ({', '.join(done)}: their "
              f"outputs are complete); run again with --resume to skip them", file=sys.stderr)


def _check_output_dir(folder: Path) -> List[Path]:
    """check_output_dir (create, prove writable); returns the folders it had to create."""
    from wsss.runner.pipeline import check_output_dir

    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    check_output_dir(folder)
    return missing[::-1]  # outermost first


def _warn_if_mpp_overrides(reader, mpp: Optional[float]) -> None:
    """--mpp overrides a slide's own resolution metadata: say so where the two disagree."""
    own, xy = reader.metadata_mpp, reader.metadata_mpp_xy
    if mpp is not None and own is not None and abs(own / mpp - 1.0) > 0.05:
        print(f"{PROG}: warning: {reader.path.name}: --mpp {mpp:g} overrides the slide's own {own:.4g} um/px",
              file=sys.stderr)
    elif mpp is not None and own is None and xy is not None and xy[0] != xy[1]:  # (non-square: refused without --mpp)
        print(f"{PROG}: warning: {reader.path.name}: --mpp {mpp:g} reads as square pixels a slide whose metadata "
              f"says {xy[0]:.4g} x {xy[1]:.4g} um/px", file=sys.stderr)


def run_demo(args) -> int:
    """Synthetic slide with known truth + the shipped demo bundle; prints accuracy."""
    import tifffile

    from wsss.errors import BundleError, WsssError
    from wsss.runner import run_slides

    bundle = demo_bundle_path()
    if not bundle.is_file():
        raise BundleError(f"the demo bundle {bundle} is not in this installation (it is built by "
                          f"tools/make_demo_bundle.py); no demo without it - wsss never substitutes a fake model")
    if args.model:
        raise WsssError("--demo uses the shipped demo bundle; do not combine it with --model")
    for given, flag in ((args.mpp is not None, "--mpp"), (args.tissue_mask, "--tissue-mask")):
        if given:
            raise WsssError(f"--demo generates its own slide (its resolution and truth known); {flag} does not apply")
    # NB: every option is checked before the synthetic slide is written (~20 s)
    options = _options(args)
    size_text = os.environ.get("WSSS_DEMO_SIZE", "3072")
    try:
        size = int(size_text)
    except ValueError:
        size = 0
    if size < 1:
        raise WsssError(f"$WSSS_DEMO_SIZE must be a whole number of pixels, 1 or more; got {size_text!r}")
    model = _load_model(str(bundle), args)
    _check_overlap(options, model)
    from wsss.runner.pipeline import check_output_dir

    out = Path(args.demo)
    check_output_dir(out)  # (after the last check: a refused demo leaves no empty folder)
    from wsss.synthetic import write_synthetic_slide

    slide = out / "synthetic_slide.tif"
    num_classes = sum(1 for i, _ in enumerate(model.class_names) if i != model.background_index)
    print(f"{PROG}: demo: writing a {size}x{size} synthetic slide (seed 0) to {slide}", file=sys.stderr)
    truth_path = write_synthetic_slide(str(slide), size, size, seed=0, mpp=model.mpp or 0.5,
                                       tile_size=256, num_classes=num_classes)
    results = run_slides([slide], model, [out / slide.stem], options)
    if results[0].status == "failed":
        return 1
    labels = tifffile.imread(out / slide.stem / "labels.tiff", key=0)
    truth = tifffile.imread(truth_path, key=0)
    if labels.shape != truth.shape:
        raise WsssError(f"demo: labels {labels.shape} and truth {truth.shape} differ in size")
    valid = truth < num_classes  # truth background excluded, as in the metrics
    if valid.any():
        acc = float((labels[valid] == truth[valid]).mean())
        score = f"pixel accuracy {acc:.4f} over {int(valid.sum())} tissue pixels"
    else:
        score = "no accuracy: the synthetic slide has no tissue pixels (a larger $WSSS_DEMO_SIZE has)"
    print(f"{PROG}: demo (synthetic-only model, synthetic slide): {score}; outputs in {out / slide.stem}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

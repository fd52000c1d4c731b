"""wsss-infer: tissue maps of whole slides.

    wsss-infer SLIDE... --model BUNDLE -o OUTDIR [options]
    wsss-infer --demo OUTDIR

Per slide, OUTDIR/<slide stem>/ gets labels.tiff (pyramidal palette TIFF, opens in OpenSlide
and QuPath), overlay.png, tissue_qc.png, areas.json/.csv, polygons.geojson and run.json
(plus probs.tiff with --probs).  Without -o a slide's outputs go next to it, into
<slide folder>/<slide stem>.wsss/.  Without --model the bundle named by $WSSS_BUNDLE or by
"bundle" in the user config ($WSSS_CONFIG, else ~/.config/wsss/config.json) is used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from wsss.cli import run

PROG = "wsss-infer"

HOW_TO_GET_A_BUNDLE = (
    "no model bundle: pass --model BUNDLE.pt, or set WSSS_BUNDLE=/path/to/bundle.pt, or write "
    '{"bundle": "/path/to/bundle.pt"} to ~/.config/wsss/config.json. To get a bundle: train one '
    "(wsss-train-cls, wsss-pseudo-masks, wsss-train-seg, then wsss-export), or export checkpoints of the "
    "reference code (wsss-export --help); to see the runner work on a synthetic slide, run "
    "wsss-infer --demo OUTDIR (synthetic-only demo model)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Segment whole slides into tissue classes with a wsss model bundle.",
        epilog="Outputs per slide: labels.tiff, overlay.png, tissue_qc.png, areas.json, areas.csv, "
               "polygons.geojson, run.json (probs.tiff with --probs). Exit status: 0 all slides done or "
               "skipped, 1 some slide failed, 2 bad arguments/bundle (nothing run).")
    p.add_argument("slides", nargs="*", metavar="SLIDE", help="slide files (.svs, .ndpi, .tif, OME-TIFF, ...)")
    p.add_argument("-m", "--model", metavar="BUNDLE", help="model bundle (.pt); default $WSSS_BUNDLE or user config")
    p.add_argument("-o", "--output", metavar="OUTDIR",
                   help="output folder; each slide gets OUTDIR/<stem>/ (default: <slide folder>/<stem>.wsss/)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16 on CPUs with bf16 units / CUDA, else float32), float32, bfloat16, float16")
    p.add_argument("--precision-mode", choices=["cast", "autocast"],
                   help="how reduced precision is applied: cast (a bf16/fp16 copy of the weights; default on CPU) "
                        "or autocast (float32 weights under torch.autocast; default on CUDA)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per model call (default 8)")
    p.add_argument("--workers", type=int, default=2, help="tile reader threads, each with its own slide handle (default 2)")
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
    p.add_argument("--mpp", type=float, help="microns per pixel of the slide's level 0 (for slides without it)")
    p.add_argument("--reader", default="auto", choices=["auto", "openslide", "tifffile"], help="slide reader (default auto)")
    p.add_argument("--tile-size", type=int, help="tile edge in pixels at the model's resolution (default: the bundle's)")
    p.add_argument("--overlap", type=int, help="overlap between neighbouring tiles in pixels (default tile/8)")
    tissue = p.add_mutually_exclusive_group()
    tissue.add_argument("--tissue-mask", metavar="IMAGE", help="tissue mask image (non-zero = tissue) instead of detection")
    tissue.add_argument("--no-tissue-detection", action="store_true", help="treat the whole slide as tissue")
    p.add_argument("--min-tissue", type=float, default=0.0,
                   help="run a tile only when its tissue fraction is above this (default 0: any tissue)")
    p.add_argument("--probs", action="store_true", help="also write probs.tiff (float16 class probabilities)")
    p.add_argument("--resume", action="store_true", help="skip slides whose outputs match the same model and options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--demo", metavar="OUTDIR",
                   help="run the shipped synthetic-only demo model on a generated synthetic slide and report accuracy")
    return p


def user_config_path() -> Path:
    env = os.environ.get("WSSS_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "wsss" / "config.json"


def find_bundle(model_arg: Optional[str]) -> str:
    """--model, else $WSSS_BUNDLE, else "bundle" in the user config; else BundleError saying how to get one."""
    from wsss.errors import BundleError

    if model_arg:
        return model_arg
    env = os.environ.get("WSSS_BUNDLE")
    if env:
        return env
    cfg = user_config_path()
    if cfg.is_file():
        try:
            bundle = json.loads(cfg.read_text()).get("bundle")
        except (OSError, ValueError, AttributeError) as e:
            raise BundleError(f"user config {cfg} is not a JSON object: {e}") from None
        if bundle:
            return str(Path(bundle).expanduser())
    raise BundleError(HOW_TO_GET_A_BUNDLE)


def demo_bundle_path() -> Path:
    import wsss

    return Path(wsss.__file__).resolve().parent / "assets" / "demo_bundle.pt"


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from wsss.errors import WsssError

    if args.demo:
        if args.slides:
            raise WsssError("--demo runs on a generated synthetic slide; give no SLIDE with it")
        return run_demo(args)
    if not args.slides:
        raise WsssError("no slide given: wsss-infer SLIDE... --model BUNDLE -o OUTDIR (or --demo OUTDIR)")
    return run_many(args, [Path(s) for s in args.slides])


def _options(args, **overrides):
    from wsss.errors import WsssError
    from wsss.runner import RunOptions

    if args.batch_size < 1:
        raise WsssError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise WsssError(f"--workers must be 0 or more, got {args.workers}")
    if args.tile_size is not None and args.tile_size < 16:
        raise WsssError(f"--tile-size must be at least 16, got {args.tile_size}")
    if args.overlap is not None and args.overlap < 0:
        raise WsssError(f"--overlap must be 0 or more, got {args.overlap}")
    if args.mpp is not None and not args.mpp > 0:
        raise WsssError(f"--mpp must be a positive number of microns per pixel, got {args.mpp}")
    if not 0.0 <= args.min_tissue < 1.0:
        raise WsssError(f"--min-tissue must be in [0, 1), got {args.min_tissue}")
    tissue = "none" if args.no_tissue_detection else (args.tissue_mask or "auto")
    if args.tissue_mask and not Path(args.tissue_mask).is_file():
        raise WsssError(f"--tissue-mask {args.tissue_mask}: no such file")
    opts = RunOptions(tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size, workers=args.workers,
                      stitch_threads=args.stitch_threads, stitch_device=args.stitch_device,
                      background_outputs=args.background_outputs, early_pyramid=args.early_pyramid,
                      mpp=args.mpp, reader=args.reader, tissue=tissue, min_tissue=args.min_tissue,
                      write_probs=args.probs, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty())
    for k, v in overrides.items():
        setattr(opts, k, v)
    tile = opts.tile_size
    if tile is not None and opts.overlap is not None and opts.overlap >= tile:
        raise WsssError(f"--overlap ({opts.overlap}) must be smaller than the tile size ({tile})")
    return opts


def _load_model(path: str, args):
    from wsss.bundle import load_bundle
    from wsss.runner import SlideModel

    import warnings

    with warnings.catch_warnings():
        # NB: torch 2.14 marks torch.jit.load deprecated on every call; a user can do nothing about it
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        bundle = load_bundle(path, device="cpu")
        return SlideModel.from_bundle(bundle, device=args.device, precision=args.precision,
                                      precision_mode=args.precision_mode)


def out_dir_for(slide: Path, output: Optional[str]) -> Path:
    return Path(output) / slide.stem if output else slide.parent / f"{slide.stem}.wsss"


def run_many(args, slides: List[Path]) -> int:
    """Check everything that can be checked, then run the good slides; exit 1 if any slide failed."""
    from wsss.errors import WsssError
    from wsss.runner import run_slides
    from wsss.runner.pipeline import check_distinct_out_dirs, check_output_dir
    from wsss.slide import open_slide

    options = _options(args)
    bundle_path = find_bundle(args.model)
    # Output folders: distinct per slide, writable.
    out_dirs = [out_dir_for(s, args.output) for s in slides]
    check_distinct_out_dirs(slides, out_dirs)
    if args.output:
        check_output_dir(Path(args.output))
    model = _load_model(bundle_path, args)
    if options.tile_size is None and options.overlap is not None and options.overlap >= model.tile_size:
        raise WsssError(f"--overlap ({options.overlap}) must be smaller than the tile size ({model.tile_size})")
    # Slides: open each once before any work, so bad ones are reported up front.
    good, bad = [], []
    for s, o in zip(slides, out_dirs):
        try:
            with open_slide(s, reader=args.reader, mpp=args.mpp) as r:
                r.mpp  # noqa: B018  (raises for a slide without mpp metadata)
            if not args.output:
                check_output_dir(o)
            good.append((s, o))
        except Exception as e:  # a bad slide is reported and skipped; the others run
            message = str(e) if isinstance(e, WsssError) else f"{s}: cannot be opened as a slide: {type(e).__name__}: {e}"
            bad.append((s, message))
            print(f"{PROG}: error: {message}", file=sys.stderr)
    if not good:
        raise WsssError(f"none of the {len(slides)} slide(s) can be read; nothing was run")
    results = run_slides([s for s, _ in good], model, [o for _, o in good], options)
    failed = [r for r in results if r.status == "failed"] + bad
    done = sum(r.status == "done" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    print(f"{PROG}: {done} done, {skipped} skipped (resume), {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


def run_demo(args) -> int:
    """Synthetic slide with known truth + the shipped demo bundle; prints accuracy."""
    import numpy as np
    import tifffile

    from wsss.errors import BundleError, WsssError
    from wsss.runner import run_slides

    bundle = demo_bundle_path()
    if not bundle.is_file():
        raise BundleError(f"the demo bundle {bundle} is not in this installation (it is built by "
                          f"tools/make_demo_bundle.py); no demo without it - wsss never substitutes a fake model")
    if args.model:
        raise WsssError("--demo uses the shipped demo bundle; do not combine it with --model")
    out = Path(args.demo)
    from wsss.runner.pipeline import check_distinct_out_dirs, check_output_dir
    check_output_dir(out)
    model = _load_model(str(bundle), args)
    from wsss.synthetic import write_synthetic_slide

    slide = out / "synthetic_slide.tif"
    size = int(os.environ.get("WSSS_DEMO_SIZE", "3072"))
    num_classes = sum(1 for i, _ in enumerate(model.class_names) if i != model.background_index)
    print(f"{PROG}: demo: writing a {size}x{size} synthetic slide (seed 0) to {slide}", file=sys.stderr)
    truth_path = write_synthetic_slide(str(slide), size, size, seed=0, mpp=model.mpp or 0.5,
                                       tile_size=256, num_classes=num_classes)
    options = _options(args, tissue="none" if args.no_tissue_detection else "auto")
    results = run_slides([slide], model, [out / slide.stem], options)
    if results[0].status == "failed":
        return 1
    labels = tifffile.imread(out / slide.stem / "labels.tiff", key=0)
    truth = tifffile.imread(truth_path, key=0)
    if labels.shape != truth.shape:
        raise WsssError(f"demo: labels {labels.shape} and truth {truth.shape} differ in size")
    valid = truth < num_classes  # truth background excluded, as in the metrics
    acc = float((labels[valid] == truth[valid]).mean()) if valid.any() else float("nan")
    print(f"{PROG}: demo (synthetic-only model, synthetic slide): pixel accuracy {acc:.4f} over "
          f"{int(valid.sum())} tissue pixels; outputs in {out / slide.stem}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

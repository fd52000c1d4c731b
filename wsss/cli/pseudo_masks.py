"""wsss-pseudo-masks: stage 2, multi-layer Grad-CAM pseudo masks (one palette PNG per layer and patch)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from wsss.cli import run
from wsss.cli._train_args import (add_common, check_args, check_outputs_spare_inputs, dataset_file,
                                   locked_output_folder, names, split_folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss-pseudo-masks", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("data", help="dataset root (with train/)")
    p.add_argument("--classifier", required=True, help="stage-1 checkpoint (wsss or reference format)")
    p.add_argument("-o", "--out", "--output", dest="out", required=True, help="output folder; masks go to OUT/<layer>/<stem>.png")
    p.add_argument("--layers", type=names, default=("b4_5", "b5_2", "bn7"), help="[b4_5,b5_2,bn7]")
    p.add_argument("--batch-size", type=int, default=16, help="[16]")
    p.add_argument("--truth", help="folder of true train masks (same names) to score the pseudo masks")
    p.add_argument("--json", help="write timing (and scores) as JSON here")
    add_common(p, seed=False)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import os

    from wsss.train.pseudo_masks import LAYERS, PseudoMaskConfig, generate_pseudo_masks

    check_outputs_spare_inputs(
        reads=[("--classifier checkpoint", args.classifier),
               ("dataset description", dataset_file(args.dataset, args.data))],
        read_folders=[("dataset's train split", split_folder(args.data, "train")), ("--truth folder", args.truth)],
        writes=[("--json", args.json)],
        write_folders=[(f"--out {args.out}'s layer folder", os.path.join(args.out, layer)) for layer in LAYERS])
    # (the --classifier checkpoint is read once, its classes checked against the dataset's, in
    # generate_pseudo_masks, before the output folder's files are touched)

    cfg = PseudoMaskConfig(data_root=args.data, checkpoint=args.classifier, out_dir=args.out, dataset=args.dataset,
                           batch_size=args.batch_size, layers=tuple(args.layers), device=args.device,
                           precision=args.precision, workers=args.workers, truth_dir=args.truth,
                           progress=not args.quiet)
    with locked_output_folder(args.out):
        result = generate_pseudo_masks(cfg)
    print(f"wsss-pseudo-masks: {result['patches']} patches x {len(result['layers'])} layers in "
          f"{result['seconds']:.1f} s ({result['patches_per_second']:.1f} patches/s) -> {args.out}")
    for layer, s in result.get("scores", {}).items():
        print(f"  {layer}: mIoU {100 * s['miou']:.2f}  FwIoU {100 * s['fwiou']:.2f}  ACC {100 * s['acc']:.2f}")
    if args.json:
        from wsss.cli.eval import write_json

        write_json(args.json, result)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run("wsss-pseudo-masks", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

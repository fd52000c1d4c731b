"""wsss-train-seg: stage 3, DeepLabV3+ on the multi-layer pseudo masks (0.2/0.2/0.6 loss), best-val checkpoint."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from wsss.cli import run
from wsss.cli._train_args import (add_common, check_args, check_outputs_spare_inputs, dataset_file, describe_dataset,
                                   floats, load_network, locked_output_folder, names, split_folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss-train-seg", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("data", help="dataset root (train/ patches, val/ for model selection)")
    p.add_argument("--masks", required=True, help="stage-2 output folder (one sub-folder per layer)")
    p.add_argument("-o", "--out", "--output", dest="out", required=True, help="output folder (segmenter_best.pt, segmenter_last.pt)")
    p.add_argument("--layers", type=names, default=("b4_5", "b5_2", "bn7"),
                   help="mask sub-folders; '.' for masks directly in --masks [b4_5,b5_2,bn7]")
    p.add_argument("--layer-weights", type=floats, default=(0.2, 0.2, 0.6), help="[0.2,0.2,0.6]")
    p.add_argument("--backbone", default="resnet101", choices=("resnet50", "resnet101", "resnet152"),
                   help="[resnet101]")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier [1.0]")
    p.add_argument("--init", metavar="FILE",
                   help="initial backbone weights, as the reference starts from ImageNet: a ResNet state_dict in "
                        "torchvision's names and of --backbone's depth (e.g. torchvision's resnet101 ImageNet file; "
                        "fc.* ignored), or a segmenter checkpoint's backbone [random init]")
    p.add_argument("--epochs", type=int, default=30, help="[30]")
    p.add_argument("--batch-size", type=int, default=20, help="[20]; at least 2 (BatchNorm)")
    p.add_argument("--lr", type=float, default=0.01, help="base learning rate; ASPP+decoder 10x [0.01]")
    p.add_argument("--val-split", default="val", help="split for best-checkpoint selection; 'none' to skip [val]")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap on batches per epoch (quick runs)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/segmenter_last.pt exists; the previous run's segmenter_best.pt and segmenter_last.pt "
                        "are removed when this run saves its first epoch (a run that fails before that leaves them)")
    p.add_argument("--classifier", help="stage-1 checkpoint: with --bundle, write the inference bundle")
    p.add_argument("--bundle", help="write the inference bundle (TissueSegmenter + metadata) here")
    p.add_argument("--tile-size", type=int, help="tile size recorded in the bundle [patch size]")
    p.add_argument("--gate-eps", type=float, default=0.1, help="classification gate threshold [0.1]")
    add_common(p)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import os

    from wsss.errors import DataError, WsssError

    if args.bundle and not args.classifier:
        raise WsssError("--bundle needs --classifier (the stage-1 checkpoint for the gate)")
    val_split = None if args.val_split == "none" else args.val_split
    layers = tuple("" if l == "." else l for l in args.layers)
    out_files = ("segmenter_best.pt", "segmenter_last.pt")
    check_outputs_spare_inputs(
        reads=[("--classifier checkpoint", args.classifier), ("--init checkpoint", args.init),
               ("dataset description", dataset_file(args.dataset, args.data))],
        read_folders=[("dataset's train split", split_folder(args.data, "train")),
                      (f"dataset's {val_split} split", split_folder(args.data, val_split)),
                      ("--masks folder", args.masks)],
        writes=[("--out file", os.path.join(args.out, name)) for name in out_files]
               + [("--bundle", args.bundle)])
    if val_split and os.path.isdir(args.data):
        from wsss.data.datasets import resolve_split_dir

        try:
            resolve_split_dir(args.data, val_split)
        except DataError as e:  # (before the training, which would end without one)
            raise DataError(f"{e}; --val-split names another split, --val-split none trains without one "
                            f"(segmenter_best.pt is then the last epoch's weights)") from None
    if args.classifier:
        # NB: checked whole (kind, shapes, the classes it records and its class count against the
        # dataset's) before training, not when the bundle is written after it
        from wsss.data import get_description

        load_network("classifier", "--classifier", args.classifier, get_description(args.dataset, args.data),
                     describe_dataset(args.dataset, args.data))
    from wsss.train.segmenter import SegmenterConfig, train_segmenter

    cfg = SegmenterConfig(data_root=args.data, mask_dir=args.masks, out_dir=args.out, dataset=args.dataset,
                          layers=layers, layer_weights=tuple(args.layer_weights), backbone=args.backbone,
                          width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          val_split=val_split, seed=args.seed,
                          device=args.device, precision=args.precision, workers=args.workers,
                          max_steps_per_epoch=args.max_steps_per_epoch, progress=not args.quiet, init=args.init)
    with locked_output_folder(args.out):
        result = train_segmenter(cfg, resume=not args.no_resume)
        print(f"wsss-train-seg: best checkpoint {result['best']} (val mIoU {100 * result['best_miou']:.2f})"
              if result["best_miou"] >= 0 else f"wsss-train-seg: wrote {result['best']}")
        if args.bundle:
            from wsss.cli.export import export_bundle

            # NB: wsss-export's path (its metadata and self-check); the dataset and the patch size
            # are the ones the segmenter checkpoint recorded; the bundle's folder is made if missing
            # (as --out is)
            export_bundle(args.classifier, result["best"], args.bundle, tile_size=args.tile_size,
                          eps=args.gate_eps)
            print(f"wsss-train-seg: wrote bundle {args.bundle}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run("wsss-train-seg", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

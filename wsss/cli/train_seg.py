"""wsss-train-seg: stage 3, DeepLabV3+ on the multi-layer pseudo masks (0.2/0.2/0.6 loss), best-val checkpoint."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from wsss.cli import run
from wsss.cli._train_args import add_common, floats, names, check_args


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
    p.add_argument("--epochs", type=int, default=30, help="[30]")
    p.add_argument("--batch-size", type=int, default=20, help="[20]")
    p.add_argument("--lr", type=float, default=0.01, help="base learning rate; ASPP+decoder 10x [0.01]")
    p.add_argument("--val-split", default="val", help="split for best-checkpoint selection; 'none' to skip [val]")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap on batches per epoch (quick runs)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/segmenter_last.pt exists")
    p.add_argument("--classifier", help="stage-1 checkpoint: with --bundle, write the inference bundle")
    p.add_argument("--bundle", help="write the inference bundle (TissueSegmenter + metadata) here")
    p.add_argument("--tile-size", type=int, help="tile size recorded in the bundle [patch size]")
    p.add_argument("--gate-eps", type=float, default=0.1, help="classification gate threshold [0.1]")
    add_common(p)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from wsss.errors import WsssError

    if args.bundle and not args.classifier:
        raise WsssError("--bundle needs --classifier (the stage-1 checkpoint for the gate)")
    if args.classifier:
        # NB: checked whole (kind, shapes, its class count against the dataset's) before training,
        # not when the bundle is written after it
        from wsss.data import get_description
        from wsss.models.checkpoints import load_classifier_checkpoint

        load_classifier_checkpoint(args.classifier, num_classes=get_description(args.dataset, args.data).num_classes)
    from wsss.train.segmenter import SegmenterConfig, train_segmenter

    layers = tuple("" if l == "." else l for l in args.layers)
    cfg = SegmenterConfig(data_root=args.data, mask_dir=args.masks, out_dir=args.out, dataset=args.dataset,
                          layers=layers, layer_weights=tuple(args.layer_weights), backbone=args.backbone,
                          width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          val_split=None if args.val_split == "none" else args.val_split, seed=args.seed,
                          device=args.device, precision=args.precision, workers=args.workers,
                          max_steps_per_epoch=args.max_steps_per_epoch, progress=not args.quiet)
    result = train_segmenter(cfg, resume=not args.no_resume)
    print(f"wsss-train-seg: best checkpoint {result['best']} (val mIoU {100 * result['best_miou']:.2f})"
          if result["best_miou"] >= 0 else f"wsss-train-seg: wrote {result['best']}")
    if args.bundle:
        write_bundle_from_checkpoints(args.bundle, args.classifier, result["best"], args.data, args.dataset,
                                      tile_size=args.tile_size, eps=args.gate_eps)
        print(f"wsss-train-seg: wrote bundle {args.bundle}")
    return 0


def write_bundle_from_checkpoints(bundle: str, classifier_ckpt: str, segmenter_ckpt: str, data_root: str,
                                  dataset: str, *, tile_size: Optional[int] = None, eps: float = 0.1) -> str:
    """Load both checkpoints and write the inference bundle (tile size: the patch size by default)."""
    from wsss.data import LabelledPatches, get_description
    from wsss.models.checkpoints import classifier_from_state_dict, read_checkpoint, segmenter_from_state_dict
    from wsss.train.segmenter import write_bundle

    description = get_description(dataset, data_root)
    # NB: each file read once (read_checkpoint takes reference-format files too, and warns once
    # about an unfinished run)
    c = read_checkpoint(classifier_ckpt, expected_kind="classifier")
    s = read_checkpoint(segmenter_ckpt, expected_kind="segmenter")
    classifier = classifier_from_state_dict(c.state_dict, num_classes=description.num_classes, where=f"checkpoint {c.path}")
    segmenter = segmenter_from_state_dict(s.state_dict, num_classes=description.num_classes, where=f"checkpoint {s.path}")
    if tile_size is None:
        tile_size = int(LabelledPatches(data_root, description)[0]["image"].shape[-1])
    config = {"classifier": c.config, "segmenter": s.config}
    return write_bundle(bundle, classifier, segmenter, description, tile_size=tile_size, eps=eps, config=config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run("wsss-train-seg", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""wsss-train-cls: stage 1, the ResNet-38 patch classifier with Progressive Dropout Attention."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from wsss.cli import run
from wsss.cli._train_args import (add_common, check_args, check_outputs_spare_inputs, dataset_file,
                                   locked_output_folder, split_folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss-train-cls", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("data", help="dataset root (with train/, file names carry the patch labels)")
    p.add_argument("-o", "--out", "--output", dest="out", required=True, help="output folder (classifier.pt, classifier_last.pt)")
    p.add_argument("--epochs", type=int, default=20, help="[20]")
    p.add_argument("--batch-size", type=int, default=20, help="[20]; at least 2 (BatchNorm), unless --freeze reference")
    p.add_argument("--lr", type=float, default=0.01, help="base learning rate, fc8 gets 10x [0.01]")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (reference: none) [0]")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="[5e-4]")
    p.add_argument("--mu-schedule", default="paper", choices=("paper", "reference", "constant", "warmup-constant", "none"),
                   help="paper: mu=1 for 3 epochs then x0.985 floored at 0.65; reference: x0.98 every "
                        "epoch, PDA from epoch 3; constant: --mu; warmup-constant: plain GAP for 3 epochs, "
                        "then --mu; none: no attention [paper]")
    p.add_argument("--mu", type=float, default=1.0,
                   help="mu for --mu-schedule constant / warmup-constant (1 = attention without dropping) [1.0]")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (1 = reference) [1.0]")
    p.add_argument("--init", help="initial weights (classifier state_dict; fc8 may differ)")
    p.add_argument("--freeze", default="auto", choices=("auto", "reference", "none"),
                   help="reference: conv1a..b2_2 and all BN frozen; auto: reference only with --init [auto]")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap on batches per epoch (quick runs)")
    p.add_argument("--stop-after-epochs", type=int,
                   help="end this run after N more epochs (resume later with the same command)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/classifier_last.pt exists; the previous run's classifier.pt and classifier_last.pt "
                        "are removed when this run saves its first epoch (a run that fails before that leaves them)")
    add_common(p)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import os

    from wsss.train.classifier import ClassifierConfig, train_classifier

    check_outputs_spare_inputs(
        reads=[("--init checkpoint", args.init), ("dataset description", dataset_file(args.dataset, args.data))],
        read_folders=[("dataset's train split", split_folder(args.data, "train"))],
        writes=[("--out file", os.path.join(args.out, name)) for name in ("classifier.pt", "classifier_last.pt")])

    cfg = ClassifierConfig(data_root=args.data, out_dir=args.out, dataset=args.dataset, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, mu_schedule=args.mu_schedule, mu=args.mu,
                           width=args.width, freeze=args.freeze, init=args.init, seed=args.seed, device=args.device,
                           precision=args.precision, workers=args.workers,
                           max_steps_per_epoch=args.max_steps_per_epoch,
                           stop_after_epochs=args.stop_after_epochs, progress=not args.quiet)
    with locked_output_folder(args.out):
        result = train_classifier(cfg, resume=not args.no_resume)
    history = result["history"]
    last = history[-1] if history else {}
    print(f"wsss-train-cls: wrote {result['checkpoint']} (final loss {last.get('loss', float('nan')):.4f})")
    if result.get("finished") and len(history) >= 3 and history[-1]["loss"] > STALL_RATIO * history[0]["loss"]:
        # NB: from a random init on small data the attention can switch every CAM off and the
        # loss sits near ln 2 per class (a user's run of docs/experiments.md's commands: 0.668)
        print(f"wsss-train-cls: warning: the loss barely moved ({history[0]['loss']:.4f} in the first epoch, "
              f"{history[-1]['loss']:.4f} in the last): the classifier may not have learned; check its CAMs with "
              f"wsss-pseudo-masks --truth, or train from --init weights or with another --seed", file=sys.stderr)
    return 0


STALL_RATIO = 0.9  # a last epoch's loss above this share of the first's: "barely moved"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run("wsss-train-cls", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Train a small demo model on synthetic tissue and write wsss/assets/demo_bundle.pt.

The bundle is SYNTHETIC-ONLY (its metadata says so): it segments wsss.synthetic tissue for
`wsss-infer --demo` and the tests; it knows nothing about real H&E.  Deterministic (seeded);
about 6 minutes on 2 CPU cores; a few MB.

    python tools/make_demo_bundle.py [--out wsss/assets/demo_bundle.pt] [--work /tmp/wsss-demo]
"""
import argparse
import os
import shutil
import sys
import tempfile

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "wsss", "assets",
                           "demo_bundle.pt")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--work", help="working folder (kept); default: a temporary folder (removed)")
    p.add_argument("--patch", type=int, default=96)
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--cls-epochs", type=int, default=16)
    p.add_argument("--seg-epochs", type=int, default=12)
    # NB: seed 1, not 0: from a random init (no ImageNet weights offline) PDA can switch every CAM
    # off and stage 1 collapses (loss ln 2); with 2026-11-27's training code seed 0 did (classifier
    # macro F1 0.18, gated test mIoU 60.8), seed 1 did not (docs/experiments.md)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    from wsss.synthetic import write_patch_dataset
    from wsss.train.pipeline import PipelineSettings, run_pipeline

    work = args.work or tempfile.mkdtemp(prefix="wsss-demo-")
    try:
        data = os.path.join(work, "data")
        if not os.path.isfile(os.path.join(data, "dataset.json")):  # (written last: a killed run's data is redone)
            write_patch_dataset(data, n_train=args.n_train, n_val=24, n_test=32, patch=args.patch, seed=args.seed)
        settings = PipelineSettings(
            classifier=dict(epochs=args.cls_epochs, batch_size=16, width=1 / 16, lr=0.02, momentum=0.9,
                            mu_schedule="reference", seed=args.seed),
            pseudo_masks=dict(batch_size=32),
            segmenter=dict(epochs=args.seg_epochs, batch_size=16, width=1 / 8, backbone="resnet50", seed=args.seed),
            bundle=args.out,
            bundle_extra={
                "synthetic_only": True,
                "description": ("DEMO ONLY: trained on wsss.synthetic H&E-like tissue (tools/make_demo_bundle.py); "
                                "meaningless on real slides"),
            },
        )
        result = run_pipeline(data, os.path.join(work, "run"), settings,
                              truth_dir=os.path.join(data, "train_truth"))
        t = result["test"]
        print(f"demo bundle {args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB; synthetic test mIoU "
              f"{100 * t['ungated']['miou']:.1f} (gated {100 * t['gated']['miou']:.1f})")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

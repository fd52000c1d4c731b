#!/usr/bin/env python
"""The weakly-supervised method on synthetic tissue with known truth, with ablations, as one table.

Rows: the method (PDA + 0.2/0.2/0.6 multi-layer loss); PDA off; bn7-only loss; and the same
segmentation network trained fully supervised on the true masks.  Columns: classifier F1
(macro, test split), pseudo-mask mIoU per layer (train split vs. its truth), segmentation
mIoU / FwIoU / ACC on the test split without and with the classification gate.

    python tools/run_synthetic_experiment.py --work /tmp/wsss-exp [--markdown docs/experiments_table.md]

NB: training starts from a random init (no ImageNet weights exist offline), so the classifier
uses --mu-schedule reference (3 plain epochs, then PDA with mu = 0.98^epoch): PDA from the
first step (the paper schedule) can switch every CAM off from a random init (A = 0, the loss
sticks at ln 2).  "PDA off" is plain GAP (--mu-schedule none).
"""
import argparse
import json
import math
import os
import sys
import time


def _pct(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="working folder (data, checkpoints, results.json)")
    p.add_argument("--patch", type=int, default=96)
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-val", type=int, default=40)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--cls-epochs", type=int, default=15)
    p.add_argument("--seg-epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="also write the table (markdown) here")
    args = p.parse_args(argv)

    from wsss.synthetic import write_patch_dataset
    from wsss.train.pipeline import PipelineSettings, run_pipeline

    t0 = time.time()
    data = os.path.join(args.work, "data")
    truth = os.path.join(data, "train_truth")
    if not os.path.isdir(data):
        write_patch_dataset(data, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, patch=args.patch,
                            seed=args.seed)
    cls = dict(epochs=args.cls_epochs, batch_size=16, width=1 / 16, lr=0.02, momentum=0.9, seed=args.seed,
               progress=False)
    seg = dict(epochs=args.seg_epochs, batch_size=16, width=1 / 8, backbone="resnet50", seed=args.seed, progress=False)
    runs = {}

    def run(name, cls_over=None, seg_over=None, **kw):
        settings = PipelineSettings(classifier={**cls, **(cls_over or {})}, pseudo_masks=dict(batch_size=32, progress=False),
                                    segmenter={**seg, **(seg_over or {})})
        t = time.time()
        runs[name] = run_pipeline(data, os.path.join(args.work, name), settings, truth_dir=truth, **kw)
        runs[name]["seconds"] = time.time() - t
        print(f"{name}: {runs[name]['seconds']:.0f} s, test mIoU {_pct(runs[name]['test']['ungated']['miou'])}",
              flush=True)
        return runs[name]

    main_run = run("wsss (PDA, 3-layer loss)", {"mu_schedule": "reference"})
    run("PDA off", {"mu_schedule": "none"})
    run("bn7-only loss", seg_over={"layers": ("bn7",), "layer_weights": (1.0,)},
        classifier_checkpoint=main_run["classifier"], pseudo_dir=main_run["pseudo_dir"])
    run("fully supervised", seg_over={"layers": ("",), "layer_weights": (1.0,)},
        classifier_checkpoint=main_run["classifier"], pseudo_dir=truth)

    header = ("| run | cls F1 | PM b4_5 | PM b5_2 | PM bn7 | mIoU | FwIoU | ACC | mIoU gated | FwIoU gated | ACC gated |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for name, r in runs.items():
        pm = r.get("pseudo_masks", {}).get("scores", {})
        if name == "bn7-only loss":
            pm = {}
        u, g = r["test"]["ungated"], r["test"]["gated"]
        lines.append(f"| {name} | {_pct(r['test']['classifier_f1']['macro'])} | "
                     + " | ".join(_pct(pm[l]['miou']) if l in pm else "(same)" if name == "bn7-only loss" else "-"
                                  for l in ("b4_5", "b5_2", "bn7"))
                     + f" | {_pct(u['miou'])} | {_pct(u['fwiou'])} | {_pct(u['acc'])} | {_pct(g['miou'])} | "
                       f"{_pct(g['fwiou'])} | {_pct(g['acc'])} |")
    table = "\n".join(lines)
    gap = runs["fully supervised"]["test"]["ungated"]["miou"] - main_run["test"]["ungated"]["miou"]
    summary = (f"\nweakly supervised vs fully supervised mIoU gap: {100 * gap:.1f} points "
               f"(target: within 5); total {time.time() - t0:.0f} s; command: python tools/run_synthetic_experiment.py "
               + " ".join(argv if argv is not None else sys.argv[1:]))
    print(table + summary)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "pseudo_masks" or True} for k, v in runs.items()}, f,
                  indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n" + summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

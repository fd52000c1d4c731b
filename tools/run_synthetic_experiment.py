#!/usr/bin/env python
"""The weakly-supervised method on synthetic tissue with known truth, with ablations, as one table.

Rows:
- "WSSS": the method (PDA with the reference mu schedule, 0.2/0.2/0.6 multi-layer loss);
- "PDA off (mu = 1)": same warm-up (3 plain-GAP epochs), then attention with mu fixed at 1
  (nothing dropped), the issue's "PDA off" (``--mu-schedule warmup-constant --mu 1``);
- "WSSS, gate from a plain-GAP classifier" (with ``--with-plain-gap``): the WSSS segmenter
  gated by a classifier trained without attention (``--mu-schedule none``), i.e. trained
  exactly as the gate uses it at inference; it tells whether a gate that hurts comes from the
  attention's train/inference mismatch (only the classifier is trained for this row);
- "bn7-only loss": the WSSS pseudo masks, segmentation trained on the bn7 masks only;
- "fully supervised": the same segmentation network trained on the true train masks (gated
  with the WSSS classifier).
Columns: classifier F1 (macro, test split, threshold 0.5), share of test tissue pixels whose
true class the gate removes (eps 0.1), pseudo-mask mIoU per layer (train split vs. its
truth), segmentation mIoU / FwIoU / ACC on the test split without and with the gate.

    python tools/run_synthetic_experiment.py --work /tmp/wsss-exp --seeds 0,1,2 [--markdown table.md]

(the defaults are the configuration of docs/experiments.md's main table: about 6 minutes per
seed on 2 cores)

Independent runs go to ``--jobs`` worker processes (default 2, one torch thread each on 2
cores): the tiny networks use one core far better than two threads share it.

NB: training starts from a random init (no ImageNet weights exist offline), so the classifier
uses --mu-schedule reference (3 plain epochs, then PDA with mu = 0.98^epoch): PDA from the
first step (the paper schedule) can switch every CAM off from a random init (A = 0, the loss
sticks at ln 2).
"""
import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

WSSS = "WSSS (PDA, 3-layer loss)"
PDA_OFF = "PDA off (mu = 1)"
PLAIN = "WSSS, gate from plain-GAP classifier"
BN7 = "bn7-only loss"
FULL = "fully supervised"


def _pct(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _job(name, data, out, settings_kw, truth, kw, threads):
    """One run_pipeline call in a worker process; returns (name, result)."""
    import torch

    torch.set_num_threads(threads)
    from wsss.train.pipeline import PipelineSettings, run_pipeline

    t = time.time()
    result = run_pipeline(data, out, PipelineSettings(**settings_kw), truth_dir=truth, **kw)
    result["seconds"] = time.time() - t
    return name, result


def _classifier_job(name, data, out, cls_kw, threads):
    """Stage 1 only, in a worker process; returns (name, {"classifier": checkpoint, "seconds"})."""
    import torch

    torch.set_num_threads(threads)
    from wsss.train.classifier import ClassifierConfig, train_classifier

    t = time.time()
    checkpoint = train_classifier(ClassifierConfig(data_root=data, out_dir=out, **cls_kw), resume=False)["checkpoint"]
    return name, {"classifier": checkpoint, "seconds": time.time() - t}


def _gate_with(classifier_path, segmenter_path, data):
    """Test metrics of a segmenter gated by a given classifier (main process)."""
    from wsss.data import MaskedPatches, get_description
    from wsss.models.checkpoints import load_classifier_checkpoint, load_segmenter_checkpoint
    from wsss.train.segmenter import evaluate_segmenter

    description = get_description("auto", data)
    classifier = load_classifier_checkpoint(classifier_path, num_classes=description.num_classes)
    segmenter = load_segmenter_checkpoint(segmenter_path, num_classes=description.num_classes)
    return evaluate_segmenter(segmenter, classifier, MaskedPatches(data, description, "test"), description)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="working folder (data, checkpoints, results.json)")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--n-train", type=int, default=480)
    p.add_argument("--n-val", type=int, default=48)
    p.add_argument("--n-test", type=int, default=96)
    p.add_argument("--cls-epochs", type=int, default=30)
    p.add_argument("--seg-epochs", type=int, default=16)
    p.add_argument("--cls-width", type=float, default=1 / 16)
    p.add_argument("--seg-width", type=float, default=1 / 8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2): one run per seed in WORK/seed<N>, "
                                   "each seed's table, then mean +- sd over the seeds")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for independent runs [2]")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker [cores // jobs]")
    p.add_argument("--with-plain-gap", action="store_true", help="add the no-attention classifier row")
    p.add_argument("--markdown", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    command = "python tools/run_synthetic_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    if not args.seeds:
        runs, threads = _run_seed(args, args.seed, args.work)
        text = _table(runs) + "\n\n" + "\n".join(f"- {n}" for n in _notes(args, runs, threads, t0, command))
    else:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        per_seed = {}
        parts = []
        for seed in seeds:
            runs, threads = _run_seed(args, seed, os.path.join(args.work, f"seed{seed}"))
            per_seed[seed] = runs
            parts.append(f"### seed {seed}\n\n" + _table(runs) + "\n\n"
                         + "\n".join(f"- {n}" for n in _notes(args, runs, threads, t0, None)))
            print(parts[-1], flush=True)
        text = (f"### mean +- sd over seeds {', '.join(map(str, seeds))}\n\n" + _summary(per_seed)
                + f"\n\n- command: {command}; total {time.time() - t0:.0f} s\n\n" + "\n\n".join(parts))
        with open(os.path.join(args.work, "results.json"), "w") as f:
            json.dump({str(k): v for k, v in per_seed.items()}, f, indent=1, default=str)
    print(text, flush=True)
    if args.markdown:
        tmp = f"{args.markdown}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.markdown)
    return 0


def _run_seed(args, seed, work):
    """All runs of one seed (data, classifier, pseudo masks, segmenters) in ``work``."""
    from wsss.synthetic import write_patch_dataset

    t0 = time.time()
    data = os.path.join(work, "data")
    truth = os.path.join(data, "train_truth")
    if not os.path.isfile(os.path.join(data, "dataset.json")):
        write_patch_dataset(data, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, patch=args.patch,
                            seed=seed)
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    cls = dict(epochs=args.cls_epochs, batch_size=16, width=args.cls_width, lr=0.02, momentum=0.9, seed=seed,
               progress=False)
    seg = dict(epochs=args.seg_epochs, batch_size=16, width=args.seg_width, backbone="resnet50", seed=seed,
               progress=False)
    pm = dict(batch_size=32, progress=False)

    def spec(name, cls_over=None, seg_over=None, **kw):
        settings = dict(classifier={**cls, **(cls_over or {})}, pseudo_masks=pm, segmenter={**seg, **(seg_over or {})})
        return (name, data, os.path.join(work, name.split(" (")[0].replace(" ", "_")), settings, truth, kw,
                threads)

    runs = {}
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        first = [spec(WSSS, {"mu_schedule": "reference"}),
                 spec(PDA_OFF, {"mu_schedule": "warmup-constant", "mu": 1.0})]
        pending = {pool.submit(_job, *s): s[0] for s in first}
        from concurrent.futures import FIRST_COMPLETED, wait

        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                pending.pop(fut)
                name, result = fut.result()
                runs[name] = result
                if name == PLAIN:
                    print(f"{name}: classifier {result['seconds']:.0f} s, at {time.time() - t0:.0f} s", flush=True)
                    continue
                print(f"{name}: {result['seconds']:.0f} s, test mIoU {_pct(result['test']['ungated']['miou'])}, "
                      f"gated {_pct(result['test']['gated']['miou'])}, at {time.time() - t0:.0f} s", flush=True)
                if name == WSSS:
                    shared = dict(classifier_checkpoint=result["classifier"])
                    pending[pool.submit(_job, *spec(BN7, seg_over={"layers": ("bn7",), "layer_weights": (1.0,)},
                                                    pseudo_dir=result["pseudo_dir"], **shared))] = BN7
                    pending[pool.submit(_job, *spec(FULL, seg_over={"layers": ("",), "layer_weights": (1.0,)},
                                                    pseudo_dir=truth, **shared))] = FULL
                    if args.with_plain_gap:
                        pending[pool.submit(_classifier_job, PLAIN, data, os.path.join(work, "plain_gap"),
                                            {**cls, "mu_schedule": "none"}, threads)] = PLAIN
    finally:
        pool.shutdown(cancel_futures=True)

    if PLAIN in runs:  # the WSSS segmenter, gated by the plain-GAP classifier
        runs[PLAIN]["test"] = _gate_with(runs[PLAIN]["classifier"], runs[WSSS]["segmenter"], data)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(runs, f, indent=1, default=str)
    return runs, threads


def _table(runs) -> str:
    order = [n for n in (WSSS, PLAIN, PDA_OFF, BN7, FULL) if n in runs]
    header = ("| run | cls F1 | true class gated | PM b4_5 | PM b5_2 | PM bn7 | mIoU | FwIoU | ACC | "
              "mIoU gated | FwIoU gated | ACC gated |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for name in order:
        r = runs[name]
        scores = r.get("pseudo_masks", {}).get("scores", {})
        pm_cells = [_pct(scores[l]["miou"]) if l in scores else ("(as WSSS)" if name in (BN7, PLAIN) else "-")
                    for l in ("b4_5", "b5_2", "bn7")]
        u, g = r["test"]["ungated"], r["test"]["gated"]
        lines.append(f"| {name} | {_pct(r['test']['classifier_f1']['macro'])} | "
                     f"{_pct(r['test']['gate']['pixels_true_class_gated'])} | " + " | ".join(pm_cells)
                     + f" | {_pct(u['miou'])} | {_pct(u['fwiou'])} | {_pct(u['acc'])} | {_pct(g['miou'])} | "
                       f"{_pct(g['fwiou'])} | {_pct(g['acc'])} |")
    return "\n".join(lines)


def _miou(runs, name, key="ungated"):
    return runs[name]["test"][key]["miou"]


def _notes(args, runs, threads, t0, command):
    def miou(name, key="ungated"):
        return _miou(runs, name, key)

    notes = [f"weakly vs fully supervised mIoU gap (ungated): {100 * (miou(FULL) - miou(WSSS)):.1f} points "
             f"(target: within 5); gated: {100 * (miou(FULL, 'gated') - miou(WSSS, 'gated')):.1f} points",
             f"PDA (reference schedule) minus PDA off (mu = 1): {100 * (miou(WSSS) - miou(PDA_OFF)):+.1f} mIoU points",
             f"3-layer loss minus bn7-only loss: {100 * (miou(WSSS) - miou(BN7)):+.1f} mIoU points",
             f"gate effect (gated minus ungated mIoU): WSSS {100 * (miou(WSSS, 'gated') - miou(WSSS)):+.1f}"
             + (f", with the plain-GAP classifier {100 * (miou(PLAIN, 'gated') - miou(WSSS)):+.1f}"
                if PLAIN in runs else "") + " points",
             f"data: {args.n_train} train / {args.n_val} val / {args.n_test} test patches of {args.patch} px; "
             f"classifier ResNet-38 width {args.cls_width:g}, {args.cls_epochs} epochs; segmenter DeepLabV3+-ResNet-50 "
             f"width {args.seg_width:g}, {args.seg_epochs} epochs; {args.jobs} workers x {threads} threads; "
             f"{time.time() - t0:.0f} s since the start"] + ([f"command: {command}"] if command else [])
    return notes


def _summary(per_seed) -> str:
    """Mean +- sample sd over seeds of the headline numbers, and the per-seed gap."""
    import statistics

    def cell(values):
        values = [100 * v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not values:
            return "n/a"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} +- {sd:.1f}"

    seeds = list(per_seed)
    lines = ["| run | cls F1 | PM bn7 | mIoU | mIoU gated |", "|---|---|---|---|---|"]
    for name in (WSSS, PLAIN, PDA_OFF, BN7, FULL):
        if not all(name in per_seed[s] for s in seeds):
            continue
        rs = [per_seed[s][name] for s in seeds]
        pm = [r.get("pseudo_masks", {}).get("scores", {}).get("bn7", {}).get("miou") for r in rs]
        lines.append(f"| {name} | {cell([r['test']['classifier_f1']['macro'] for r in rs])} | "
                     f"{cell(pm) if any(v is not None for v in pm) else '-'} | "
                     f"{cell([r['test']['ungated']['miou'] for r in rs])} | {cell([r['test']['gated']['miou'] for r in rs])} |")
    gaps = [100 * (_miou(per_seed[s], FULL) - _miou(per_seed[s], WSSS)) for s in seeds]
    gaps_g = [100 * (_miou(per_seed[s], FULL, "gated") - _miou(per_seed[s], WSSS, "gated")) for s in seeds]
    pda = [100 * (_miou(per_seed[s], WSSS) - _miou(per_seed[s], PDA_OFF)) for s in seeds]
    ml = [100 * (_miou(per_seed[s], WSSS) - _miou(per_seed[s], BN7)) for s in seeds]
    fmt = lambda xs: ", ".join(f"{x:+.1f}" for x in xs)  # noqa: E731
    lines += ["", f"- weak vs full gap per seed (ungated): {fmt(gaps)} (mean {statistics.mean(gaps):.1f}; target "
                  f"within 5: met in {sum(g <= 5 for g in gaps)} of {len(gaps)}); gated: {fmt(gaps_g)}",
              f"- PDA minus PDA off per seed: {fmt(pda)}; 3-layer minus bn7-only loss per seed: {fmt(ml)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

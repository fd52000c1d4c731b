"""wsss-eval: confusion-matrix metrics (IoU per class, mIoU, FwIoU, ACC) with and without the classification gate."""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, Optional, Sequence

from wsss.cli import run
from wsss.cli._train_args import (add_common, check_args, check_outputs_spare_inputs, dataset_file, describe_dataset,
                                   load_network, split_folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss-eval", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("data", help="dataset root (with SPLIT/img and SPLIT/mask)")
    p.add_argument("--segmenter", required=True,
                   help="segmenter checkpoint (stage 3: wsss-train-seg's segmenter_best.pt, or the reference "
                        "code's stage-2 DeepLabV3+ file)")
    p.add_argument("--classifier", help="stage-1 checkpoint (for the gated metrics and classifier F1)")
    p.add_argument("--split", default="test", help="[test]")
    p.add_argument("--gate-eps", type=float, default=0.1, help="[0.1]")
    p.add_argument("--batch-size", type=int, default=16, help="[16]")
    p.add_argument("--json", help="write the metrics here as JSON")
    add_common(p, seed=False)
    return p


def _json_safe(obj):
    """NaN and infinities as null (an absent class's IoU is NaN): bare NaN is not JSON, and
    strict parsers (JavaScript, Go, serde) refuse the file."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, obj) -> None:
    from wsss.files import write_atomic

    from pathlib import Path

    text = json.dumps(_json_safe(obj), indent=2, default=float, allow_nan=False)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def format_table(results: Dict) -> str:
    """Rows: IoU per class, mIoU, FwIoU, ACC (percent); columns: ungated, gated."""
    cols = [c for c in ("ungated", "gated") if c in results]
    names = list(results[cols[0]]["iou"])
    rows = [(f"IoU {n}", [results[c]["iou"][n] for c in cols]) for n in names]
    rows += [(m, [results[c][m.lower()] for c in cols]) for m in ("mIoU", "FwIoU", "ACC")]
    width = max(len(r[0]) for r in rows) + 2
    lines = ["".ljust(width) + "".join(c.rjust(10) for c in cols)]
    for label, values in rows:
        lines.append(label.ljust(width) + "".join(("n/a" if math.isnan(v) else f"{100 * v:.2f}").rjust(10)
                                                  for v in values))
    if "classifier_f1" in results:
        lines.append(f"classifier F1 (macro) {100 * results['classifier_f1']['macro']:.2f}")
    return "\n".join(lines)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from wsss.data import MaskedPatches, get_description
    from wsss.train.common import resolve_device
    from wsss.train.segmenter import evaluate_segmenter

    from wsss.errors import WsssError

    for flag, path in (("--segmenter", args.segmenter), ("--classifier", args.classifier)):
        if path and not os.path.isfile(path):
            raise WsssError(f"{flag} {path}: no such file")
    check_outputs_spare_inputs(
        reads=[("--segmenter checkpoint", args.segmenter), ("--classifier checkpoint", args.classifier),
               ("dataset description", dataset_file(args.dataset, args.data))],
        read_folders=[(f"dataset's {args.split} split", split_folder(args.data, args.split))],
        writes=[("--json", args.json)])
    device = resolve_device(args.device)
    description = get_description(args.dataset, args.data)
    source = describe_dataset(args.dataset, args.data)
    dataset = MaskedPatches(args.data, description, args.split)
    segmenter = load_network("segmenter", "--segmenter", args.segmenter, description, source).to(device)
    classifier = None
    if args.classifier:
        classifier = load_network("classifier", "--classifier", args.classifier, description, source).to(device)
    results = evaluate_segmenter(segmenter, classifier, dataset, description, device=args.device,
                                 precision=args.precision, batch_size=args.batch_size, eps=args.gate_eps,
                                 workers=args.workers)
    results.update(split=args.split, images=len(dataset), gate_eps=args.gate_eps, dataset=description.name)
    print(f"wsss-eval: {description.name} {args.split} ({len(dataset)} images)")
    print(format_table(results))
    if args.json:
        write_json(args.json, results)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run("wsss-eval", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

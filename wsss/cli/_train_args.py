"""Options shared by the training CLIs (device, precision, seed, dataset), and the checks of
option values every command shares (``check_args``)."""
from __future__ import annotations

import argparse


def add_common(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    parser.add_argument("--dataset", default="auto",
                        help="dataset description: luad-histoseg, bcss-wsss, a JSON file, or auto "
                             "(DATA/dataset.json if present, else luad-histoseg) [auto]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [cpu]")
    parser.add_argument("--precision", default="fp32", type=_precision, metavar="{fp32,bf16}",
                        help="fp32 (float32), or bf16 (bfloat16) autocast [fp32]")
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes [0]")
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress bars (--no-progress as in wsss-infer)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed [0]")


def _precision(text: str) -> str:
    """fp32 / bf16, also by wsss-infer's names (float32, bfloat16)."""
    value = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"choose fp32 (float32) or bf16 (bfloat16), got {text!r}")
    return value


def floats(text: str):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str):
    return tuple(v.strip() for v in text.split(",") if v.strip())


# (name, test, what it must be) for the numeric options the training commands share; a value a
# command does not have is skipped.  NB: each of these failed deep inside torch with a traceback
# (ValueError: Invalid learning rate, batch_size should be a positive integer, ...), or worse ran
# and wrote an untrained "result" (--max-steps-per-epoch -1).
_NUMBER_RULES = (
    ("epochs", lambda v: v >= 1, "at least 1"),
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("lr", lambda v: v > 0, "positive"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("workers", lambda v: v >= 0, "0 or more"),
    ("width", lambda v: 1 / 64 <= v <= 4, "in [1/64, 4] (the networks' channel multiplier)"),
    ("mu", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("max_steps_per_epoch", lambda v: v >= 1, "at least 1"),
    ("stop_after_epochs", lambda v: v >= 1, "at least 1"),
    ("gate_eps", lambda v: 0 <= v < 1, "in [0, 1)"),
    # (a batch of 8 tiles of 8192^2 is already 1.6 GB of RGB and 8.6 GB of K=4 scores)
    ("tile_size", lambda v: 16 <= v <= 8192, "between 16 and 8192 pixels"),
)


def check_args(args: argparse.Namespace, *, out_folders=("out",), out_files=("json", "bundle")) -> None:
    """WsssError naming the first option whose value cannot work, before any work is done: the
    numbers above, --layers (not empty), output folders and files that cannot be made (a path
    under a regular file, an existing file where a folder goes and vice versa)."""
    import math
    import os

    from wsss.files import probe_writable

    from wsss.errors import WsssError

    for name, ok, what in _NUMBER_RULES:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise WsssError(f"--{name.replace('_', '-')} must be {what}, got {value}")
    if getattr(args, "layers", None) is not None and not args.layers:
        raise WsssError("--layers names no layer (choose from b4_5, b5_2, bn7)")
    if getattr(args, "truth", None) and not os.path.isdir(args.truth):
        raise WsssError(f"--truth {args.truth}: no such folder")
    for name in out_folders + out_files:
        path = getattr(args, name, None)
        if not path:
            continue
        flag = f"--{name}"
        if name in out_folders and os.path.exists(path) and not os.path.isdir(path):
            raise WsssError(f"{flag} {path}: is a file, not a folder")
        if name in out_files and os.path.isdir(path):
            raise WsssError(f"{flag} {path}: is a folder, not a file")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise WsssError(f"{flag} {path}: {parent} is a file, not a folder")
        try:
            probe_writable(parent)
        except OSError as e:
            raise WsssError(f"{flag} {path}: {parent} cannot be written ({e.strerror or e})") from None

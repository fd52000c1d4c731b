"""Options shared by the training CLIs (device, precision, seed, dataset)."""
from __future__ import annotations

import argparse


def add_common(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    parser.add_argument("--dataset", default="auto",
                        help="dataset description: luad-histoseg, bcss-wsss, a JSON file, or auto "
                             "(DATA/dataset.json if present, else luad-histoseg) [auto]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [cpu]")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="fp32, or bf16 autocast [fp32]")
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes [0]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed [0]")


def floats(text: str):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str):
    return tuple(v.strip() for v in text.split(",") if v.strip())

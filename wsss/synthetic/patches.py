"""Synthetic patch datasets in the LUAD-HistoSeg layout.

root/
  dataset.json                      the dataset description (wsss.data.DatasetDescription)
  train/<stem>-[1 0 0 1].png        RGB patches; the patch-level label is in the file name
  train_truth/<same name>.png       (extra, not in LUAD) exact palette masks of the train
                                    patches: only for measuring pseudo masks and for the
                                    fully supervised baseline, never for weak training
  val/img/<stem>.png, val/mask/<stem>.png     RGB + palette mask (index K = background)
  test/img/..., test/mask/...
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

from wsss.data.description import LUAD_HISTOSEG, DatasetDescription, format_label
from wsss.files import save_png
from wsss.synthetic.tissue import class_names_for, render_tissue

__all__ = ["write_patch_dataset", "synthetic_description", "patch_label"]


def synthetic_description(num_classes: int = 4, mpp: float = 1.0) -> DatasetDescription:
    """The description of a synthetic dataset: LUAD-HistoSeg classes/palette (first K), background K."""
    names = class_names_for(num_classes)
    palette = tuple(LUAD_HISTOSEG.palette[:num_classes]) + ((255, 255, 255),)
    return DatasetDescription(name=f"synthetic-{num_classes}", class_names=names, palette=palette,
                              background_index=num_classes, label_parser="bracket_spaced",
                              background_is_tissue=False, mpp=mpp)


def patch_label(labels: np.ndarray, num_classes: int, min_fraction: float) -> np.ndarray:
    """Patch-level label [K] (0/1): classes covering at least ``min_fraction`` of the patch."""
    counts = np.bincount(labels.ravel(), minlength=num_classes + 1)[:num_classes]
    return (counts >= min_fraction * labels.size).astype(np.int64)


def _patch_seed(seed: int, split: str, index: int, attempt: int) -> int:
    split_id = {"train": 1, "val": 2, "test": 3}[split]
    return (seed * 1_000_003 + split_id * 100_000_007 + index * 7919 + attempt * 104_729) % (2 ** 62)


def write_patch_dataset(root: str, *, n_train: int, n_val: int, n_test: int, patch: int = 224,
                        seed: int = 0, num_classes: int = 4, mpp: float = 1.0,
                        min_fraction: float = 0.02, min_tissue: float = 0.5,
                        write_train_truth: bool = True) -> Dict[str, int]:
    """Write a synthetic patch dataset under ``root``; returns the number of patches per split.

    Each patch is rendered from its own seed; a patch whose tissue covers less than
    ``min_tissue`` of its area is re-drawn (LUAD-HistoSeg patches are mostly tissue).  The
    train label of a class is 1 when it covers at least ``min_fraction`` of the patch.
    Deterministic in all arguments.
    """
    desc = synthetic_description(num_classes, mpp)
    palette = desc.palette_flat()
    os.makedirs(root, exist_ok=True)
    dirs = {"train": [os.path.join(root, "train")], "val": [os.path.join(root, "val", "img"), os.path.join(root, "val", "mask")],
            "test": [os.path.join(root, "test", "img"), os.path.join(root, "test", "mask")]}
    if write_train_truth:
        dirs["train"].append(os.path.join(root, "train_truth"))
    for ds in dirs.values():
        for d in ds:
            os.makedirs(d, exist_ok=True)
    counts = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            for attempt in range(1000):
                rgb, labels = render_tissue(patch, patch, seed=_patch_seed(seed, split, i, attempt),
                                            num_classes=num_classes, mpp=mpp)
                tissue = float(np.mean(labels != num_classes))
                label = patch_label(labels, num_classes, min_fraction)
                if tissue >= min_tissue and label.any():
                    break
            else:  # (it kept the last try, which had too little tissue or no class at all)
                raise ValueError(f"no {patch}-px patch of {split} {i} in 1000 tries has {min_tissue:.0%} tissue and a "
                                 f"class over {min_fraction:.0%} of it: lower min_tissue or min_fraction")
            stem = f"syn{seed}_{split}{i:05d}-{patch}-{attempt}"
            if split == "train":
                name = f"{stem}-{format_label(label, desc)}.png"
                save_png(os.path.join(dirs["train"][0], name), rgb)
                if write_train_truth:
                    save_png(os.path.join(dirs["train"][1], name), labels, palette)
            else:
                save_png(os.path.join(dirs[split][0], f"{stem}.png"), rgb)
                save_png(os.path.join(dirs[split][1], f"{stem}.png"), labels, palette)
        counts[split] = n
    desc.save_json(os.path.join(root, "dataset.json"))
    return counts

"""Shared training plumbing: seeding, devices, precision, poly schedule, atomic checkpoints, flips."""
from __future__ import annotations

import contextlib
import math
import random
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from wsss.errors import WsssError

__all__ = ["seed_everything", "resolve_device", "autocast", "poly_lr", "save_atomic", "load_checkpoint",
           "random_flips", "make_loader", "WorkerSeed", "check_resume_config", "check_batchnorm_batches",
           "nonfinite_state", "remove_previous_run", "patches_fingerprint", "files_fingerprint"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and make cuDNN deterministic (a resumed run trains as an
    uninterrupted one)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA where a GPU is visible, else the CPU): the
    --device of every command.  WsssError naming --device for anything else, and for a CUDA
    device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise WsssError(f"--device: {name!r} is not a device (expected cpu, cuda, cuda:N or auto)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise WsssError(f"--device {name}: CUDA is not available on this machine ({why}; torch "
                            f"{torch.__version__}); --device cpu runs on the CPU")
        if device.index is not None and device.index >= count:
            raise WsssError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def autocast(device: torch.device, precision: str):
    """A context: bf16 autocast for precision 'bf16', nothing for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        if device.type == "cpu":
            from wsss.bundle import cpu_reduced_precision_supported

            if not cpu_reduced_precision_supported(torch.bfloat16):  # NB: warned once per run (same text)
                warnings.warn(f"bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}) has no fast bfloat16 "
                              "kernels: training will be slower than with fp32, not faster", RuntimeWarning,
                              stacklevel=2)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise WsssError(f"--precision must be fp32 or bf16, got {precision!r}")


def poly_lr(base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    """Poly decay as the reference: base * (1 - step/max_steps) ** power."""
    return base_lr * (1.0 - min(step, max_steps) / max(max_steps, 1)) ** power


def drops_last(n_samples: int, batch_size: int) -> bool:
    """Whether a training epoch drops its last, short batch (as the reference's loaders do): yes
    unless the data make only one batch."""
    return n_samples > batch_size


def step_plan(n_samples: int, batch_size: int, epochs: int, max_steps_per_epoch: Optional[int]) -> Tuple[int, int]:
    """(optimiser steps per epoch, total steps): the batches of one pass over the data per epoch
    (``drops_last``: the reference's len(dataset) // batch_size), capped at
    ``max_steps_per_epoch`` when set (quick runs).  The poly schedule reaches 0 at the last step."""
    per_epoch = n_samples // batch_size if drops_last(n_samples, batch_size) else math.ceil(n_samples / batch_size)
    if max_steps_per_epoch:
        per_epoch = min(per_epoch, max_steps_per_epoch)
    return per_epoch, per_epoch * epochs


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary name in the same folder, then os.replace (never half-written)."""
    from wsss.files import write_atomic

    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str, expected_kind: Optional[str] = None) -> Dict[str, Any]:
    """A wsss training checkpoint (dict with 'model', 'kind', ...), read with weights_only."""
    from wsss.errors import BundleError

    from wsss.models.checkpoints import load_checkpoint_file

    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise BundleError(f"checkpoint {path}: not a wsss training checkpoint (no 'model' entry)")
    if expected_kind is not None and ckpt.get("kind") not in (None, expected_kind):
        raise BundleError(f"checkpoint {path}: holds a {ckpt.get('kind')}, expected a {expected_kind}")
    return ckpt


# Options a resumed run may change: where and how it runs, not what it computes.
# (--dataset as spelled: the resolved description is compared)
RESUMABLE_CHANGES = frozenset({"out_dir", "data_root", "mask_dir", "init", "dataset", "device", "workers", "progress",
                               "stop_after_epochs"})


# The config entry fingerprinting the data a run trains on (``patches_fingerprint``,
# ``files_fingerprint``): compared by ``check_resume_config`` part by part, not as an option.
DATA_KEY = "train_data"


def _digest(lines) -> str:
    import hashlib

    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def patches_fingerprint(names, labels=None) -> Dict[str, Any]:
    """{"patches": N, "digest": ...} of a split: its file names (not paths: a moved dataset still
    matches) with their patch-level labels (rows of ``labels`` [N,K]) where given."""
    rows = []
    for i, name in enumerate(names):
        label = "" if labels is None else "".join(str(int(v)) for v in labels[i].tolist())
        rows.append(f"{name}\t{label}")
    return {"patches": len(rows), "digest": _digest(sorted(rows))}


def files_fingerprint(files) -> Dict[str, Any]:
    """{"files": N, "digest": ...} of (name, path) pairs: each name with its file's size in bytes
    (cheap: no file is read; regenerated masks of other content almost always differ in size)."""
    import os

    rows = sorted(f"{name}\t{os.path.getsize(path)}" for name, path in files)
    return {"files": len(rows), "digest": _digest(rows)}


def _data_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> list:
    """What differs between two ``DATA_KEY`` fingerprints, in words (parts either side lacks are
    not compared)."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return []
    diffs = []
    for part, what in (("train", "the train split"), ("val", "the val split")):
        a, b = saved.get(part), current.get(part)
        if not isinstance(a, dict) or not isinstance(b, dict) or a == b:
            continue
        if a.get("patches") != b.get("patches"):
            diffs.append(f"{what} had {a.get('patches')} patches, now {b.get('patches')}")
        else:
            diffs.append(f"{what}'s patch names or labels changed ({b.get('patches')} patches)")
    a, b = saved.get("masks"), current.get("masks")
    train_same = saved.get("train") == current.get("train")
    if isinstance(a, dict) and isinstance(b, dict) and a != b and train_same:
        diffs.append(f"the masks in --masks are not the ones it trained on ({b.get('files')} mask files, other "
                     f"sizes or names)")
    return diffs


def check_resume_config(path: str, saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    """WsssError if the run that saved checkpoint ``path`` had other options than this one (its
    "config" against ours), naming each difference: resuming would silently mix two runs (a
    different --lr, --epochs or dataset changes the schedule or the data mid-run).  Keys either
    side lacks (checkpoints from older versions) are not compared.  The data are compared by their
    fingerprints (``DATA_KEY``: the train patches' names and labels, stage 3's mask files, the
    val patches), so a moved dataset resumes and another one (or other masks) does not."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    diffs = []
    for key in sorted(set(saved) & set(current) - RESUMABLE_CHANGES - {DATA_KEY}):
        if plain(saved[key]) != plain(current[key]):
            name = {"description": "the dataset description", "class_names": "the classes",
                    "num_classes": "the number of classes", "freeze_resolved": "the frozen layers"}.get(
                key, f"--{key.replace('_', '-')}")
            diffs.append(name if key == "description" else f"{name} {plain(saved[key])} (now {plain(current[key])})")
    data = _data_differences(saved.get(DATA_KEY), current.get(DATA_KEY))
    if diffs or data:
        what = " and ".join(w for w, d in (("options", diffs), ("data", data)) if d)
        lead = "with other options" if not data else "on other data" if not diffs else "with other options and data"
        raise WsssError(f"{path} was saved by a run {lead}: {'; '.join(diffs + data)}. Resume it with the same "
                        f"{what}, or start over with --no-resume (or another output folder)")


def check_batchnorm_batches(n_samples: Optional[int], batch_size: int, stage: str, hint: str = "",
                            folder: str = "") -> None:
    """WsssError where training could only form batches of one patch: BatchNorm in training mode
    needs 2 samples per batch (torch's "Expected more than 1 value per channel" where a layer sees
    1x1 maps: stage 3's ASPP image pooling always, stage 1's last layers on small patches), and
    per-patch statistics are not what the reference trains with (batch 20).  Larger data and
    batches never form a batch of one: ``drops_last`` drops a short last batch."""
    if batch_size < 2:
        raise WsssError(f"--batch-size must be at least 2 for {stage}, got {batch_size}: training BatchNorm needs "
                        f"2 patches per batch (the reference trains with 20){hint}")
    if n_samples is not None and n_samples < 2:
        split = f"the train split {folder}" if folder else "the train split"
        patches = "1 patch" if n_samples == 1 else f"{n_samples} patches"
        raise WsssError(f"{split} has {patches}; {stage} needs at least 2 (training BatchNorm needs 2 patches per "
                        f"batch){hint}")


def nonfinite_state(model: torch.nn.Module, probe: Optional[torch.Tensor]) -> Optional[str]:
    """None if every floating weight and buffer of ``model`` is finite and, with ``probe`` (scaled
    training images on the model's device), its eval-mode outputs are too; otherwise what
    is not.  (A diverged step can leave finite but huge weights, ~1e29, whose outputs overflow to
    NaN: the loss is checked before each step, never after the last.)  The eval-mode forward
    changes no state and draws no random numbers: a resumed run still trains exactly."""
    import itertools

    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"weight {name} is not finite"
    if probe is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe)
    finally:
        model.train(was_training)
    outs = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else [out]
    if not all(bool(torch.isfinite(o.float()).all()) for o in outs if isinstance(o, torch.Tensor)):
        return "its outputs on training patches are not finite"
    return None


def remove_previous_run(paths, out_dir: str) -> None:
    """Remove the files ``paths`` that an earlier run left in ``out_dir`` (called by a run that
    starts over, right before it writes its first checkpoint), with one line naming them: the
    earlier run's final / best checkpoint beside this run's ``*_last.pt`` would pass for this
    run's result (and its ``*_last.pt`` would be resumed)."""
    import os

    removed = []
    for path in paths:
        if os.path.isfile(path):
            os.unlink(path)
            removed.append(os.path.basename(path))
    if removed:
        print(f"starting over: removed the previous run's {', '.join(removed)} from {out_dir}", flush=True)


def random_flips(images: torch.Tensor, gen: torch.Generator, vertical: bool = True,
                 masks: Optional[torch.Tensor] = None):
    """Per-sample random horizontal (and vertical) flips of images [N,C,H,W] and masks [N,...,H,W].

    Draws come from ``gen`` only, so runs are reproducible whatever the loader does.
    """
    n = images.shape[0]
    hflip = torch.rand(n, generator=gen) < 0.5
    vflip = torch.rand(n, generator=gen) < 0.5 if vertical else torch.zeros(n, dtype=torch.bool)

    def apply(t: torch.Tensor) -> torch.Tensor:
        shape = (n,) + (1,) * (t.dim() - 1)
        h = hflip.to(t.device).reshape(shape)
        v = vflip.to(t.device).reshape(shape)
        t = torch.where(h, t.flip(-1), t)
        return torch.where(v, t.flip(-2), t)

    images = apply(images)
    if masks is None:
        return images
    return images, apply(masks)


class WorkerSeed:
    """worker_init_fn that seeds numpy/random in DataLoader workers from torch's per-worker seed."""

    def __call__(self, worker_id: int) -> None:
        s = torch.initial_seed() % (2 ** 32)
        np.random.seed(s)
        random.seed(s)


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int = 0,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=workers, drop_last=drop_last, worker_init_fn=WorkerSeed(),
                                       persistent_workers=False, collate_fn=collate_patches)


def collate_patches(batch):
    """torch's default collation, after checking that the patches of a batch (dicts with "image"
    and "name") have one size: mixed sizes are a DataError naming two files, not torch.stack's
    "stack expects each tensor to be equal size"."""
    from torch.utils.data import default_collate

    if batch and isinstance(batch[0], dict) and "image" in batch[0]:
        first = batch[0]
        for item in batch[1:]:
            if item["image"].shape != first["image"].shape:
                from wsss.errors import DataError

                def size(it):
                    return "x".join(str(v) for v in it["image"].shape[-2:][::-1])

                raise DataError(f"patches of different sizes: {first.get('name', '?')} is {size(first)} px, "
                                f"{item.get('name', '?')} is {size(item)} px; every patch of a dataset must "
                                f"have the size of the others")
    return default_collate(batch)


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, *, step: int, steps: int,
                max_steps: int, base_lr: float, poly_power: float,
                loss_of: Callable[[Dict[str, torch.Tensor]], Tuple[torch.Tensor, int]],
                diverged: Callable[[int, torch.Tensor], str], desc: str, progress: bool,
                postfix: Optional[Dict[str, str]] = None) -> Tuple[float, int]:
    """One epoch of SGD as both trainers run it: at most ``steps`` batches, the poly learning
    rate per step (times each param group's ``lr_mult``), ``loss_of(batch) -> (loss, batch
    size)``, a WsssError with ``diverged(i, loss)`` as its message on a non-finite loss, a
    tqdm bar.  Returns (mean loss per sample, the global step after the epoch)."""
    from tqdm import tqdm

    model.train()
    total, count = 0.0, 0
    bar = tqdm(total=steps, desc=desc, disable=not progress, unit="batch", dynamic_ncols=True)
    try:
        for i, batch in enumerate(loader):
            if i >= steps:
                break
            lr = poly_lr(base_lr, step, max_steps, poly_power)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            loss, n = loss_of(batch)
            if not torch.isfinite(loss):
                raise WsssError(diverged(i, loss))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += loss.item() * n
            count += n
            bar.set_postfix(loss=f"{total / count:.4f}", **(postfix or {}), lr=f"{lr:.2e}")
            bar.update(1)
    finally:
        bar.close()
    return total / max(count, 1), step

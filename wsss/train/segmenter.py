"""Stage 3: DeepLabV3+ trained on the multi-layer pseudo masks (METHOD.md, stage 3).

Loss = sum_l weight_l * CE(logits, PM_l), default 0.2 CE(PM_b4_5) + 0.2 CE(PM_b5_2) + 0.6 CE(PM_bn7);
pixels at the background index carry no loss (ignore_index, the job of the reference's
constant 100 logit).  SGD momentum 0.9, weight decay 5e-4, lr 0.01 (ASPP + decoder 10x), poly
0.9, joint horizontal flip and Gaussian blur of the image; the checkpoint with the best
validation mIoU is kept (``segmenter_best.pt``), ``segmenter_last.pt`` after every epoch for
resuming.  The same code trains the fully supervised baseline: ``layers=("",)`` with
``mask_dir`` the folder of true masks and ``layer_weights=(1.0,)``.

A resume on other data (``common.DATA_KEY``: train patch names and labels, the mask files' names
and sizes, the val patches) is refused; a run that starts over removes the previous run's
segmenter_best.pt and segmenter_last.pt when it writes its first checkpoint; a run whose weights
or outputs stop being finite fails before writing a checkpoint; --batch-size 1 and a one-patch
train split are refused (ASPP's image-pooling BatchNorm cannot train on a batch of one).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from wsss.errors import WsssError

__all__ = ["SegmenterConfig", "train_segmenter", "build_segmenter", "evaluate_segmenter"]


@dataclass
class SegmenterConfig:
    data_root: str
    mask_dir: str  # stage-2 output folder (with one sub-folder per layer)
    out_dir: str
    dataset: str = "auto"
    layers: Tuple[str, ...] = ("b4_5", "b5_2", "bn7")
    layer_weights: Tuple[float, ...] = (0.2, 0.2, 0.6)
    backbone: str = "resnet101"
    width: float = 1.0
    epochs: int = 30
    batch_size: int = 20
    lr: float = 0.01
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    blur_prob: float = 0.5
    val_split: Optional[str] = "val"
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    workers: int = 0
    max_steps_per_epoch: Optional[int] = None
    progress: bool = True
    init: Optional[str] = None  # initial backbone weights (an ImageNet ResNet); random (Kaiming) without

    def validate(self) -> None:
        if len(self.layers) != len(self.layer_weights) or not self.layers:
            raise WsssError(f"--layers and --layer-weights must have the same (non-zero) length, got "
                            f"{list(self.layers)} and {list(self.layer_weights)}")
        if not all(w >= 0 and math.isfinite(w) for w in self.layer_weights) or sum(self.layer_weights) <= 0:
            raise WsssError(f"--layer-weights must be >= 0 with a positive sum, got {list(self.layer_weights)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise WsssError(f"--epochs and --batch-size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.width > 0:
            raise WsssError(f"--width must be > 0, got {self.width}")
        from wsss.train.common import check_batchnorm_batches

        # (ASPP's image-pooling BatchNorm sees one value per channel and sample: a batch of one fails)
        check_batchnorm_batches(None, self.batch_size, "stage 3")


def build_segmenter(num_classes: int, backbone: str, width: float):
    from wsss.models import DeepLabV3Plus

    try:
        return DeepLabV3Plus(num_classes, backbone=backbone, width=width)
    except ValueError as e:
        raise WsssError(str(e)) from e


def _gaussian_blur(images: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    """Blur a random subset of images [N,3,H,W] (float) with a 5x5 Gaussian of random sigma in
    [0, 1): the reference's RandomGaussianBlur (PIL's GaussianBlur, whose radius is the standard
    deviation, of ``random.random()``, for half the images)."""
    n = images.shape[0]
    pick = torch.rand(n, generator=gen) < prob
    sigmas = torch.rand(n, generator=gen).clamp_(min=1e-3)  # (sigma -> 0: the identity, not 0/0)
    if not pick.any():
        return images
    out = images.clone()
    coords = torch.arange(5, dtype=images.dtype, device=images.device) - 2
    for i in torch.nonzero(pick).flatten().tolist():
        k1 = torch.exp(-(coords ** 2) / (2 * float(sigmas[i]) ** 2))
        k1 = k1 / k1.sum()
        k2 = (k1[:, None] * k1[None, :]).expand(3, 1, 5, 5)
        padded = F.pad(images[i:i + 1], (2, 2, 2, 2), mode="reflect")
        out[i:i + 1] = F.conv2d(padded, k2, groups=3)
    return out


def train_segmenter(cfg: SegmenterConfig, resume: bool = True) -> Dict:
    """Train (or resume) stage 3; returns {'best': path, 'last': path, 'best_miou', 'history'}."""
    from wsss.data import MaskedPatches, PseudoMaskPatches, get_description
    from wsss.train.common import (DATA_KEY, autocast, check_batchnorm_batches, check_resume_config, drops_last,
                                   load_checkpoint, make_loader, nonfinite_state, random_flips, remove_previous_run,
                                   resolve_device, save_atomic, seed_everything, step_plan, train_epoch)

    cfg.validate()
    device = resolve_device(cfg.device)
    description = get_description(cfg.dataset, cfg.data_root)
    k = description.num_classes
    ignore = description.background_index
    train_set = PseudoMaskPatches(cfg.data_root, cfg.mask_dir, cfg.layers, description)
    check_batchnorm_batches(len(train_set), cfg.batch_size, "stage 3", folder=train_set.patches.folder)
    val_set = MaskedPatches(cfg.data_root, description, cfg.val_split) if cfg.val_split else None
    seed_everything(cfg.seed)
    model = build_segmenter(k, cfg.backbone, cfg.width).to(device)
    optimizer = torch.optim.SGD([
        {"params": model.backbone_parameters(), "lr_mult": 1.0},
        {"params": model.head_parameters(), "lr_mult": cfg.head_lr_mult},
    ], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch, max_steps = step_plan(len(train_set), cfg.batch_size, cfg.epochs, cfg.max_steps_per_epoch)
    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path = os.path.join(cfg.out_dir, "segmenter_last.pt")
    best_path = os.path.join(cfg.out_dir, "segmenter_best.pt")
    config = dataclasses.asdict(cfg)
    # patch_size: the tile size a bundle of this segmenter runs at by default (wsss-export reads it)
    config.update(num_classes=k, class_names=list(description.class_names), description=description.to_dict(),
                  patch_size=int(train_set[0]["image"].shape[-1]))
    config[DATA_KEY] = _data_fingerprint(train_set, cfg.layers, val_set)
    # a training image: after every epoch the weights and the outputs of this image must be finite
    probe = train_set[0]["image"][None].to(device).float().div_(255.0)
    weights = torch.tensor(cfg.layer_weights, dtype=torch.float32)

    start_epoch, step, history, best_miou = 0, 0, [], -1.0
    fresh = True  # (starting over: the previous run's files go when the first checkpoint is written)
    if resume and os.path.isfile(last_path):
        fresh = False
        ckpt = load_checkpoint(last_path, "segmenter")
        check_resume_config(last_path, ckpt.get("config") or {}, config)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        history, best_miou = list(ckpt.get("history", [])), float(ckpt.get("best_miou", -1.0))
        if cfg.progress:
            print(f"resuming from {last_path} at epoch {start_epoch}", flush=True)
    elif cfg.init:  # (resumed: the weights come from the checkpoint)
        from wsss.models.checkpoints import load_backbone_init

        source = load_backbone_init(model, cfg.init, f"--init {cfg.init} (for --backbone {cfg.backbone} "
                                                     f"--width {cfg.width:g})")
        if cfg.progress:
            print(f"backbone initialised from {cfg.init} ({source})", flush=True)

    for epoch in range(start_epoch, cfg.epochs):
        loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                             workers=cfg.workers, drop_last=drops_last(len(train_set), cfg.batch_size))
        aug = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 7)
        # NB: dropout masks from a per-epoch seed, as stage 1 does: a resumed run then trains
        # exactly as an uninterrupted one (the global generator restarted at the seed)
        torch.manual_seed(cfg.seed * 1000 + epoch + 13)
        t0 = time.time()

        def loss_of(batch, aug=aug):
            images, masks = random_flips(batch["image"], aug, vertical=False, masks=batch["masks"])
            x = _gaussian_blur(images.float().div_(255.0), aug, cfg.blur_prob).to(device)
            masks = masks.to(device)  # [N,L,H,W]
            with autocast(device, cfg.precision):
                logits = model(x)
            logits = logits.float()
            # NB: zero, but on the graph: a batch whose every pixel is ignored (background) still
            # steps (weight decay, as the reference's constant-logit background does) instead of
            # failing in backward() with "does not require grad"
            loss = logits.sum() * 0.0
            for l in range(masks.shape[1]):
                if weights[l] > 0:
                    layer_loss = F.cross_entropy(logits, masks[:, l], ignore_index=ignore)
                    if torch.isfinite(layer_loss):  # all-ignored batch -> nan; carries no loss
                        loss = loss + weights[l] * layer_loss
            return loss, x.shape[0]

        first_step = step
        mean_loss, step = train_epoch(
            model, optimizer, loader, step=step, steps=steps_per_epoch, max_steps=max_steps, base_lr=cfg.lr,
            poly_power=cfg.poly_power, loss_of=loss_of, desc=f"seg epoch {epoch + 1}/{cfg.epochs}",
            progress=cfg.progress,
            diverged=lambda i, loss, epoch=epoch: (f"segmenter training diverged at epoch {epoch + 1}, step {i}; "
                                                   f"lower --lr"))
        # NB: the loss is checked before each step, never after the last: huge (finite) weights
        # whose outputs are NaN would otherwise be saved, and kept as the best, as a result
        bad = nonfinite_state(model, probe)
        if bad:
            raise WsssError(f"segmenter training diverged at epoch {epoch + 1}, after step {step - first_step - 1} "
                            f"({bad}); lower --lr")
        entry = {"epoch": epoch, "loss": mean_loss, "seconds": time.time() - t0}
        is_best = True
        if val_set is not None:
            scores = evaluate_segmenter(model, None, val_set, description, device=cfg.device,
                                        precision=cfg.precision, batch_size=cfg.batch_size,
                                        workers=cfg.workers)["ungated"]
            entry["val_miou"] = scores["miou"]
            is_best = scores["miou"] > best_miou
            if is_best:
                best_miou = scores["miou"]
            if cfg.progress:
                print(f"seg epoch {epoch + 1}: loss {entry['loss']:.4f}, val mIoU {scores['miou']:.4f} "
                      f"(best {best_miou:.4f})", flush=True)
        history.append(entry)
        state = {"model": model.state_dict(), "config": config, "epoch": epoch, "kind": "segmenter", "step": step,
                 "history": history, "best_miou": best_miou, "finished": epoch + 1 == cfg.epochs}
        if fresh:  # (before the best: the previous run's last would be resumed beside this run's best)
            remove_previous_run([best_path, last_path], cfg.out_dir)
            fresh = False
        if is_best:
            save_atomic(dict(state, optimizer=None), best_path)
        save_atomic(dict(state, optimizer=optimizer.state_dict()), last_path)
    # NB: the best checkpoint is marked as coming from a finished run only now (written during
    # the run, it says "finished": False: a run killed after epoch 6 of 30 is not a result)
    if os.path.isfile(best_path):
        best = load_checkpoint(best_path, "segmenter")
        if best.get("finished") is False:
            save_atomic(dict(best, finished=True), best_path)
    return {"best": best_path, "last": last_path, "best_miou": best_miou, "history": history, "config": config}


def _data_fingerprint(train_set, layers, val_set) -> Dict:
    """What a stage-3 run trains on (``common.DATA_KEY``): the train patches' names and labels, the
    mask files it reads (layer/name and size, no pixel read) and the val patches' names."""
    from wsss.train.common import files_fingerprint, patches_fingerprint

    patches = train_set.patches
    from wsss.data.datasets import mask_name
    files = [(f"{layer or '.'}/{mask_name(n)}", os.path.join(d, mask_name(n)))
             for layer, d in zip(layers, train_set.layer_dirs) for n in patches.names]
    out = {"train": patches_fingerprint(patches.names, patches.labels), "masks": files_fingerprint(files)}
    if val_set is not None:
        out["val"] = patches_fingerprint(val_set.names)
    return out


@torch.no_grad()
def evaluate_segmenter(segmenter, classifier, dataset, description, *, device: str = "cpu", precision: str = "fp32",
                       batch_size: int = 16, eps: float = 0.1, workers: int = 0) -> Dict:
    """Metrics of a split (items with "image" and "mask"): "ungated" always, "gated" with a classifier.

    Gated labels follow wsss.ops.gate_argmax (a class with sigmoid prob <= eps never wins; where
    no class passes, the ungated decision is kept).  Also "classifier_f1" with a classifier
    (labels: the classes present in each mask) and "gate" diagnostics: ``pixels_true_class_gated``
    = share of scored pixels whose true class the gate removes (those pixels cannot be right
    after gating: the direct cost of the gate), ``present_gated`` = share of (image, present
    class) pairs gated, ``absent_passed`` = share of (image, absent class) pairs NOT gated (what
    the gate fails to remove), and the median class probability of present / absent classes.
    """
    from wsss import ops
    from wsss.reference import gate_allowed
    from wsss.train.common import autocast, make_loader, resolve_device
    from wsss.train.metrics import ConfusionMatrix, multilabel_f1

    dev = resolve_device(device)
    was_training = segmenter.training
    segmenter.to(dev).eval()  # (the models are left on ``device``)
    if classifier is not None:
        classifier.to(dev).eval()
    k = description.num_classes
    ungated = ConfusionMatrix(k, description.background_index)
    gated = ConfusionMatrix(k, description.background_index)
    truth_labels, pred_labels, probs = [], [], []
    pixels_scored, pixels_true_gated = 0, 0
    for batch in make_loader(dataset, batch_size, shuffle=False, seed=0, workers=workers):
        x = batch["image"].to(dev).float().div_(255.0)
        mask = batch["mask"]
        with autocast(dev, precision):
            logits = segmenter(x)
        logits = logits.float()
        ungated.update(mask, logits.max(dim=1).indices.cpu())
        if classifier is not None:
            with autocast(dev, precision):
                class_prob = torch.sigmoid(classifier(x).float())
            gated.update(mask, ops.gate_argmax(logits, class_prob, eps).cpu())
            truth_labels.append(torch.stack([(mask == c).flatten(1).any(1) for c in range(k)], dim=1))
            pred_labels.append((class_prob > 0.5).cpu())
            probs.append(class_prob.cpu())
            m = mask.to(torch.int64)
            scored = (m >= 0) & (m < k)
            gated_class = ~gate_allowed(class_prob.cpu(), eps)  # [N,K] (none where no class passes)
            true_gated = torch.gather(gated_class, 1, m.clamp(0, k - 1).flatten(1)).reshape(m.shape) & scored
            pixels_scored += int(scored.sum())
            pixels_true_gated += int(true_gated.sum())
    segmenter.train(was_training)
    out = {"ungated": ungated.scores(description.class_names)}
    if classifier is not None:
        out["gated"] = gated.scores(description.class_names)
        out["classifier_f1"] = multilabel_f1(torch.cat(truth_labels), torch.cat(pred_labels))
        present, prob = torch.cat(truth_labels), torch.cat(probs)
        gated_pairs = ~gate_allowed(prob, eps)

        def share(sel):
            return float(sel.float().mean()) if sel.numel() else float("nan")

        def median(sel):
            return float(sel.median()) if sel.numel() else float("nan")

        out["gate"] = {"eps": float(eps),
                       "pixels_true_class_gated": pixels_true_gated / max(pixels_scored, 1),
                       "present_gated": share(gated_pairs[present]),
                       "absent_passed": share(~gated_pairs[~present]),
                       "median_prob_present": median(prob[present]),
                       "median_prob_absent": median(prob[~present])}
    return out

"""Stage 1: train the ResNet-38 patch classifier with Progressive Dropout Attention.

METHOD.md, stage 1: multilabel soft margin loss on patch-level labels, SGD lr 0.01 with fc8 at
10x, poly decay 0.9, weight decay 5e-4, random horizontal + vertical flips, batch 20, 20 epochs.

mu schedules (``mu_schedule``):
- "paper" (default): mu = 1 for the first 3 epochs, then mu_t = max(0.65, 0.985 * mu_{t-1});
- "reference": mu_e = 0.98 ** e (multiplied after every epoch from epoch 0 while mu > 0.65, so
  it stops at 0.98 ** 22 = 0.641), PDA only from epoch 3 (plain GAP before), as
  ChuHan89/WSSS-Tissue does;
- "constant": mu fixed at ``mu`` from the first step (mu = 1 drops nothing);
- "warmup-constant": plain GAP for the first 3 epochs (as "reference"), then mu fixed at ``mu``;
  with mu = 1 this is the "PDA off" ablation (attention on, no peak dropped) with the same
  warm-up as the reference schedule, so the two differ only in the dropping.
- "none": no attention at all (plain GAP + channel dropout).

Checkpoints (``out_dir/classifier_last.pt`` after every epoch, ``classifier.pt`` at the end)
hold {'model', 'config', 'epoch', 'optimizer', 'kind': 'classifier', 'step', 'history'}: a run
resumed from the last one continues exactly where it stopped (each epoch's shuffling and flips
come from generators seeded by (seed, epoch)); one saved with other options or on other data
(``common.DATA_KEY``: the train patches' names and labels) is refused.  A run that starts over
removes the previous run's classifier.pt and classifier_last.pt when it writes its first
checkpoint (one line says so), and a run whose weights or outputs stop being finite fails
before writing a checkpoint.  Training BatchNorm needs 2 patches per batch: --batch-size 1 and a
one-patch split are refused unless BatchNorm is frozen (--freeze reference).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from wsss.errors import WsssError

__all__ = ["ClassifierConfig", "mu_for_epoch", "train_classifier", "build_classifier"]

MU_SCHEDULES = ("paper", "reference", "constant", "warmup-constant", "none")
WARMUP_EPOCHS = 3  # plain-GAP epochs of the reference schedule before PDA starts


@dataclass
class ClassifierConfig:
    data_root: str
    out_dir: str
    dataset: str = "auto"
    epochs: int = 20
    batch_size: int = 20
    lr: float = 0.01
    fc8_lr_mult: float = 10.0
    momentum: float = 0.0  # NB: the reference's PolyOptimizer is plain SGD without momentum
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    mu_schedule: str = "paper"
    mu: float = 1.0  # for mu_schedule="constant"
    width: float = 1.0
    freeze: str = "auto"  # "reference" | "none" | "auto" (reference only with --init weights)
    init: Optional[str] = None
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    workers: int = 0
    max_steps_per_epoch: Optional[int] = None  # for quick runs
    stop_after_epochs: Optional[int] = None  # end this invocation early (resume later); schedule unchanged
    progress: bool = True

    def validate(self) -> None:
        if self.mu_schedule not in MU_SCHEDULES:
            raise WsssError(f"--mu-schedule must be one of {', '.join(MU_SCHEDULES)}, got {self.mu_schedule!r}")
        if not 0.0 <= self.mu <= 1.0:
            raise WsssError(f"--mu must be in [0, 1], got {self.mu}")
        if self.epochs < 1 or self.batch_size < 1:
            raise WsssError(f"--epochs and --batch-size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.width > 0:
            raise WsssError(f"--width must be > 0, got {self.width}")
        if self.freeze not in ("auto", "reference", "none"):
            raise WsssError(f"--freeze must be auto, reference or none, got {self.freeze!r}")


def mu_for_epoch(schedule: str, epoch: int, mu: float = 1.0) -> Optional[float]:
    """The PDA threshold factor of an epoch (0-based); None means: no attention this epoch."""
    if schedule == "paper":
        value = 1.0
        for _ in range(3, epoch + 1):
            value = max(0.65, 0.985 * value)
        return value
    if schedule == "reference":  # (its loop: ``if gama > 0.65: gama *= 0.98`` after each epoch)
        if epoch < WARMUP_EPOCHS:
            return None
        value = 1.0
        for _ in range(epoch):
            if value > 0.65:
                value *= 0.98
        return value
    if schedule == "constant":
        return float(mu)
    if schedule == "warmup-constant":
        return float(mu) if epoch >= WARMUP_EPOCHS else None
    if schedule == "none":
        return None
    raise WsssError(f"unknown mu schedule {schedule!r}")


def build_classifier(num_classes: int, width: float):
    from wsss.models import ResNet38Classifier

    return ResNet38Classifier(num_classes, width=width)


def _param_groups(model, cfg: ClassifierConfig) -> List[Dict]:
    fc8, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("fc8"):
            fc8.append(p)
        elif p.dim() <= 1:  # BatchNorm affine parameters (trained only when BN is not frozen)
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "lr_mult": 1.0, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "lr_mult": 1.0, "weight_decay": 0.0},
              {"params": fc8, "lr_mult": cfg.fc8_lr_mult, "weight_decay": cfg.weight_decay}]
    return [g for g in groups if g["params"]]


def _load_init(model, path: str) -> None:
    """Initial weights (e.g. ImageNet model A1 converted): every key but fc8 must match, shapes
    included (a checkpoint of another --width is one message, not a traceback); BatchNorm's
    ``num_batches_tracked`` counters may be missing, as the reference code's MXNet converter
    writes none."""
    from wsss.models.checkpoints import load_matching_state_dict, read_checkpoint

    contents = read_checkpoint(path, expected_kind="classifier")
    load_matching_state_dict(model, contents.state_dict, f"--init {path}", except_prefixes=("fc8",),
                             counters_optional=True)


def train_classifier(cfg: ClassifierConfig, resume: bool = True) -> Dict:
    """Train (or resume) stage 1; returns a summary dict with the final checkpoint path and history."""
    from wsss.data import LabelledPatches, get_description
    from wsss.train.common import (DATA_KEY, autocast, check_batchnorm_batches, check_resume_config, drops_last,
                                   load_checkpoint, make_loader, nonfinite_state, patches_fingerprint, random_flips,
                                   remove_previous_run, resolve_device, save_atomic, seed_everything, step_plan,
                                   train_epoch)

    cfg.validate()
    device = resolve_device(cfg.device)
    description = get_description(cfg.dataset, cfg.data_root)
    train_set = LabelledPatches(cfg.data_root, description)
    seed_everything(cfg.seed)
    model = build_classifier(description.num_classes, cfg.width)
    last_path = os.path.join(cfg.out_dir, "classifier_last.pt")
    final_path = os.path.join(cfg.out_dir, "classifier.pt")
    ckpt = load_checkpoint(last_path, "classifier") if resume and os.path.isfile(last_path) else None
    saved = (ckpt or {}).get("config") or {}
    if cfg.freeze != "auto":
        freeze = cfg.freeze
    elif saved.get("freeze_resolved") in ("reference", "none"):
        freeze = saved["freeze_resolved"]  # (a resumed run keeps its choice, with --init given again or not)
    else:
        freeze = "reference" if cfg.init else "none"
    if freeze != "reference":  # (frozen BatchNorm runs in eval mode: any batch works)
        check_batchnorm_batches(len(train_set), cfg.batch_size, "stage 1",
                                hint="; --freeze reference from --init weights fixes BatchNorm",
                                folder=train_set.folder)
    if cfg.init and ckpt is None:  # (resumed: the weights come from the checkpoint)
        _load_init(model, cfg.init)
    if freeze == "reference":
        # NB: freezing conv1a..b2_2 and every BN only makes sense from pretrained weights; from a
        # random init it would freeze random filters and turn BN into an identity.
        model.freeze_reference_layers()
    model.to(device)
    groups = _param_groups(model, cfg)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    steps_per_epoch, max_steps = step_plan(len(train_set), cfg.batch_size, cfg.epochs, cfg.max_steps_per_epoch)
    os.makedirs(cfg.out_dir, exist_ok=True)
    config = dataclasses.asdict(cfg)
    config.update(num_classes=description.num_classes, class_names=list(description.class_names),
                  description=description.to_dict(), freeze_resolved=freeze)
    # what the run trains on (the patches' names and labels): a resume on other data is refused
    config[DATA_KEY] = {"train": patches_fingerprint(train_set.names, train_set.labels)}
    # a training image: after every epoch the weights and the outputs of this image must be finite
    probe = train_set[0]["image"][None].to(device).float().div_(255.0)

    def check_diverged(epoch: int, after: str) -> None:
        bad = nonfinite_state(model, probe)
        if bad:
            raise WsssError(f"classifier training diverged at epoch {epoch + 1}, {after} ({bad}); lower --lr")

    start_epoch, step, history = 0, 0, []
    if ckpt is not None:
        check_resume_config(last_path, saved, config)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step, history = ckpt["epoch"] + 1, ckpt["step"], list(ckpt.get("history", []))
        _log(cfg, f"resuming from {last_path} at epoch {start_epoch}")

    fresh = ckpt is None  # (starting over: the previous run's files go when the first checkpoint is written)
    end_epoch = cfg.epochs if not cfg.stop_after_epochs else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        mu = mu_for_epoch(cfg.mu_schedule, epoch, cfg.mu)
        loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                             workers=cfg.workers, drop_last=drops_last(len(train_set), cfg.batch_size))
        flips = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 7)
        torch.manual_seed(cfg.seed * 1000 + epoch + 13)  # dropout masks
        t0 = time.time()

        def loss_of(batch, mu=mu, flips=flips):
            x = random_flips(batch["image"], flips, vertical=True).to(device).float().div_(255.0)
            y = batch["label"].to(device)
            with autocast(device, cfg.precision):
                logits = model(x) if mu is None else model.forward_pda(x, mu)
            return F.multilabel_soft_margin_loss(logits.float(), y), x.shape[0]

        first_step = step
        mean_loss, step = train_epoch(
            model, optimizer, loader, step=step, steps=steps_per_epoch, max_steps=max_steps, base_lr=cfg.lr,
            poly_power=cfg.poly_power, loss_of=loss_of, desc=f"cls epoch {epoch + 1}/{cfg.epochs}",
            progress=cfg.progress, postfix={"mu": "off" if mu is None else f"{mu:.3f}"},
            diverged=lambda i, loss, epoch=epoch: (f"classifier training diverged at epoch {epoch + 1}, step {i} "
                                                   f"(loss {loss.item()}); lower --lr"))
        check_diverged(epoch, f"after step {step - first_step - 1}")
        history.append({"epoch": epoch, "loss": mean_loss, "mu": mu, "seconds": time.time() - t0})
        if fresh:
            remove_previous_run([final_path, last_path], cfg.out_dir)
            fresh = False
        save_atomic({"model": model.state_dict(), "config": config, "epoch": epoch, "optimizer": optimizer.state_dict(),
                     "kind": "classifier", "step": step, "history": history, "finished": epoch + 1 == cfg.epochs},
                    last_path)
    if end_epoch < cfg.epochs:
        return {"checkpoint": last_path, "history": history, "config": config, "finished": False}
    model.eval()  # (its state was checked for divergence after the last epoch, before it was saved)
    save_atomic({"model": model.state_dict(), "config": config, "epoch": cfg.epochs - 1, "optimizer": None,
                 "kind": "classifier", "step": step, "history": history, "finished": True}, final_path)
    return {"checkpoint": final_path, "history": history, "config": config, "finished": True}


def _log(cfg, message: str) -> None:
    if cfg.progress:
        print(message, flush=True)

"""Stage 2: multi-layer Grad-CAM pseudo masks, batched (METHOD.md, stage 2).

For each training patch and layer l in (b4_5, b5_2, bn7), and each class logit z_k:
  alpha_kc = mean_hw dz_k/dF_c,  L_k = sum_c alpha_kc F_c (no ReLU),  bilinear to the patch size;
per patch, one min-max normalisation over the K maps jointly; maps of classes absent from the
patch label set to 0; LUAD-style background (gray > 200, objects < 50 px removed) becomes one
more channel scoring just above 1; pseudo mask = argmax -> palette PNG per layer and patch.

Batching (the reference runs one patch, one layer, one class backward at a time):
- one forward pass per batch gives all three layers;
- BN is in eval mode and samples are independent, so d(sum_n z_nk)/dF_n = dz_nk/dF_n: ONE
  backward per class serves the whole batch and both b4_5 and b5_2 (or a single vmapped
  backward over the K classes, ``autograd.grad(..., is_grads_batched=True)``, which measured
  slower on CPU);
- at bn7 no backward is needed: z_k = sum_c w_kc mean_hw F_c, so dz_k/dF_c = w_kc / (h w) and
  L_k = CAM_k / (h w), one matmul.
Grad-CAM maps of b4_5 and b5_2 come from the fused op wsss.ops.gradcam.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from wsss.errors import WsssError
from wsss.files import save_png

__all__ = ["LAYERS", "PseudoMaskConfig", "gradcam_maps", "gradcam_maps_reference_loop", "masks_from_cams",
           "background_mask", "generate_pseudo_masks", "score_pseudo_masks"]

LAYERS = ("b4_5", "b5_2", "bn7")
# in a pseudo-mask folder while a run writes its masks (hidden: readers never see it)
STAGING_DIR = ".wsss-pseudo-masks-staging"


@dataclass
class PseudoMaskConfig:
    data_root: str
    checkpoint: str
    out_dir: str
    dataset: str = "auto"
    batch_size: int = 16
    layers: Tuple[str, ...] = LAYERS
    device: str = "cpu"
    precision: str = "fp32"
    workers: int = 0
    truth_dir: Optional[str] = None  # palette masks of the train patches, to score the pseudo masks
    progress: bool = True


def gradcam_maps(model, x: torch.Tensor, layers: Sequence[str] = LAYERS, batched_backward: bool = False
                 ) -> Dict[str, torch.Tensor]:
    """Grad-CAM maps {layer: [N,K,h_l,w_l]} (no ReLU, not resized) of scaled input x [N,3,H,W].

    ``model`` must be a ResNet38Classifier in eval mode.  One forward; backward passes only for
    b4_5/b5_2: one per class for the whole batch and both layers (default), or one vmapped
    backward over the K classes when ``batched_backward`` is True; none for bn7.
    NB: measured on CPU (benchmarks/bench_pseudo_masks.py) the vmapped backward is ~1.5x
    slower than K plain batched backward passes, hence the default.
    """
    from wsss import ops
    from wsss.reference import class_activation_maps

    if model.training:
        raise WsssError("gradcam_maps: the classifier must be in eval mode (BN statistics, no dropout)")
    backward_layers = [l for l in layers if l != "bn7"]
    # NB: the input requires grad so that the activations are on a graph even when no parameter
    # does (a frozen classifier); its own gradient is never computed (grad w.r.t. the features)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        maps = model.feature_maps(x)
        logits = maps["logits"]  # [N,K]
        k = logits.shape[1]
        out: Dict[str, torch.Tensor] = {}
        if backward_layers:
            feats = [maps[l] for l in backward_layers]
            if batched_backward:
                # grad_outputs [K,N,K]: one-hot class k for every sample -> grads [K,N,C,h,w] per layer.
                eye = torch.eye(k, dtype=logits.dtype, device=logits.device)[:, None, :].expand(k, logits.shape[0], k)
                grads = torch.autograd.grad(logits, feats, grad_outputs=eye, is_grads_batched=True)
                per_layer = [g.transpose(0, 1) for g in grads]  # [N,K,C,h,w]
            else:
                per_class = [torch.autograd.grad(logits[:, c].sum(), feats, retain_graph=c < k - 1) for c in range(k)]
                per_layer = [torch.stack([pc[i] for pc in per_class], dim=1) for i in range(len(feats))]
            for name, f, g in zip(backward_layers, feats, per_layer):
                out[name] = ops.gradcam(f.detach().contiguous(), g.detach().to(f.dtype).contiguous())
    if "bn7" in layers:
        bn7 = maps["bn7"].detach()
        h, w = bn7.shape[2:]
        weight = model.fc8.weight.detach().reshape(k, -1)
        out["bn7"] = class_activation_maps(bn7, weight) / float(h * w)
    return {l: out[l] for l in layers}


def gradcam_maps_reference_loop(model, x: torch.Tensor, layers: Sequence[str] = LAYERS) -> Dict[str, torch.Tensor]:
    """The reference code's way, faithfully re-created (for the benchmark and as an oracle).

    One patch, one layer, one class at a time: a fresh forward per (patch, layer), a hook that
    keeps the target layer's gradient, and per class ``model.zero_grad(); logits.backward(
    one_hot, retain_graph=True)``, so parameter gradients are computed too, as in the
    reference; Grad-CAM by hand.  Returns the same maps as gradcam_maps.
    """
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    out = {l: [] for l in layers}
    try:
        for n in range(x.shape[0]):
            xi = x[n:n + 1].detach()
            for layer in layers:
                per_class = []
                with torch.enable_grad():
                    maps = model.feature_maps(xi)
                    feat = maps[layer]
                    saved = {}
                    feat.register_hook(lambda g: saved.__setitem__("grad", g))
                    logits = maps["logits"]
                    k = logits.shape[1]
                    for c in range(k):
                        model.zero_grad()
                        one_hot = torch.zeros_like(logits)
                        one_hot[0, c] = 1.0
                        logits.backward(gradient=one_hot, retain_graph=True)
                        alpha = saved["grad"].mean(dim=(2, 3), keepdim=True)
                        per_class.append((alpha * feat).sum(dim=1).detach())  # [1,h,w]
                out[layer].append(torch.stack(per_class, dim=1))
    finally:
        model.zero_grad()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return {l: torch.cat(v) for l, v in out.items()}


def background_mask(images: torch.Tensor, white_threshold: int = 200, min_object_px: int = 50) -> torch.Tensor:
    """LUAD background: gray > threshold with objects smaller than min_object_px removed.

    images uint8 [N,3,H,W] -> bool [N,H,W].  Gray as the reference computes it, OpenCV's
    COLOR_RGB2GRAY of uint8 pixels: ITU-R 601 luma in 15-bit fixed point, rounded to an integer
    (the same as OpenCV 5.0 for all 2^24 colours; so (201, 200, 200), luma 200.3, is gray 200:
    not background).
    """
    from skimage.morphology import remove_small_objects

    rgb = images.to(torch.int32)
    gray = (rgb[:, 0] * 9798 + rgb[:, 1] * 19235 + rgb[:, 2] * 3735 + (1 << 14)) >> 15
    white = (gray > white_threshold).cpu().numpy()
    cleaned = np.stack([remove_small_objects(m, max_size=min_object_px - 1) if m.any() else m for m in white]) \
        if _skimage_has_max_size() else np.stack([remove_small_objects(m, min_size=min_object_px) for m in white])
    return torch.from_numpy(cleaned)


def _skimage_has_max_size() -> bool:
    import inspect

    from skimage.morphology import remove_small_objects

    return "max_size" in inspect.signature(remove_small_objects).parameters


def masks_from_cams(cams: torch.Tensor, labels: torch.Tensor, size: Tuple[int, int],
                    background: Optional[torch.Tensor], background_index: int) -> torch.Tensor:
    """Pseudo masks uint8 [N,H,W] from Grad-CAM maps [N,K,h,w] and patch labels [N,K] (0/1).

    Bilinear to ``size``; per-patch joint min-max over the K maps; absent classes -> 0;
    background [N,H,W] bool (or None) -> a channel scoring just above 1 -> background_index.
    """
    n, k = cams.shape[:2]
    up = F.interpolate(cams.float(), size=size, mode="bilinear", align_corners=False)
    flat = up.reshape(n, -1)
    lo = flat.min(dim=1).values[:, None, None, None]
    hi = flat.max(dim=1).values[:, None, None, None]
    norm = (up - lo) / (hi - lo).clamp_min(1e-12)
    norm = norm * labels.to(norm.dtype)[:, :, None, None]
    if background is not None:
        bg = background.to(norm.device)[:, None].to(norm.dtype) * 1.0001  # just above 1 where background
        norm = torch.cat([norm, bg], dim=1)
    idx = norm.max(dim=1).indices  # NB: max(1).indices, not argmax(1): far faster on CPU
    out = idx.to(torch.uint8)
    if background is not None:
        out = torch.where(idx == k, torch.full_like(out, background_index), out)
    return out


def generate_pseudo_masks(cfg: PseudoMaskConfig) -> Dict:
    """Write out_dir/<layer>/<stem>.png for every train patch; returns timing (and scores if truth given).

    The run owns its folder's masks: everything that can be checked cheaply (labels, truth masks,
    the checkpoint) is checked before the folder is touched; the masks are written into a hidden
    staging folder inside it (STAGING_DIR) and only once every one is there do they replace the
    folder's masks (``_publish``): a run that fails or is killed while it computes leaves an
    earlier run's masks as they were.  Publishing removes the masks of an earlier wsss run that
    this run does not rewrite (other patches, other --layers), and a manifest
    (PSEUDO_MASK_MANIFEST) records the layers and masks this run wrote, which is what the readers
    (PseudoMaskPatches) and the scores take."""
    from tqdm import tqdm

    from wsss.cli._train_args import check_same_classes, describe_dataset
    from wsss.data import LabelledPatches, get_description
    from wsss.data.datasets import image_size, mask_name
    from wsss.models.checkpoints import classifier_from_state_dict, read_checkpoint
    from wsss.train.common import autocast, make_loader, resolve_device

    bad = [l for l in cfg.layers if l not in LAYERS]
    if bad:
        raise WsssError(f"--layers: unknown layer(s) {bad}; choose from {', '.join(LAYERS)}")
    description = get_description(cfg.dataset, cfg.data_root)
    # (read once: its recorded classes checked against the description's, a model of another
    # cohort refused before anything else is read or written)
    contents = read_checkpoint(cfg.checkpoint, expected_kind="classifier")
    check_same_classes("--classifier", contents, description, describe_dataset(cfg.dataset, cfg.data_root))
    device = resolve_device(cfg.device)
    dataset = LabelledPatches(cfg.data_root, description)
    mask_names = [mask_name(n) for n in dataset.names]
    # (headers only, about 0.02 ms a patch: a file that cannot be read stops the run before the
    # folder is touched rather than halfway)
    sizes = [image_size(os.path.join(dataset.folder, n)) for n in dataset.names]
    if cfg.truth_dir:
        check_truth_masks(cfg.truth_dir, dataset, description, sizes)
    model = classifier_from_state_dict(contents.state_dict, num_classes=description.num_classes,
                                       where=f"checkpoint {contents.path}")
    del contents
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    palette = description.palette_flat()
    use_bg = not description.background_is_tissue
    t0 = time.time()
    staging = _new_staging_dir(cfg.out_dir, cfg.layers)
    try:
        loader = make_loader(dataset, cfg.batch_size, shuffle=False, seed=0, workers=cfg.workers)
        bar = tqdm(total=len(dataset), desc="pseudo masks", unit="patch", disable=not cfg.progress,
                   dynamic_ncols=True)
        for batch in loader:
            images = batch["image"]
            x = images.to(device).float().div_(255.0)
            with autocast(device, cfg.precision):
                cams = gradcam_maps(model, x, cfg.layers)
            bg = background_mask(images, description.white_threshold, description.min_object_px) if use_bg else None
            for layer in cfg.layers:
                masks = masks_from_cams(cams[layer], batch["label"].to(device), tuple(images.shape[2:]), bg,
                                        description.background_index).cpu().numpy()
                for name, mask in zip(batch["name"], masks):
                    save_png(os.path.join(staging, layer, mask_name(name)), mask.astype(np.uint8, copy=False),
                             palette)
            bar.update(images.shape[0])
        bar.close()
        manifest = {"format": "wsss-pseudo-masks", "version": 1, "layers": list(cfg.layers), "masks": mask_names,
                    "data": os.path.abspath(dataset.folder), "classifier": os.path.abspath(cfg.checkpoint),
                    "dataset": description.name}
        _publish(cfg.out_dir, staging, cfg.layers, mask_names, json.dumps(manifest, indent=1))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.time() - t0
    result = {"patches": len(dataset), "seconds": seconds, "patches_per_second": len(dataset) / max(seconds, 1e-9),
              "out_dir": cfg.out_dir, "layers": list(cfg.layers)}
    if cfg.truth_dir:
        result["scores"] = score_pseudo_masks(cfg.out_dir, cfg.truth_dir, description, cfg.layers, names=mask_names)
    return result


def _is_own_temp_file(name: str) -> bool:
    """A temporary file of wsss.files.atomic_path for a mask (``.<stem>.png.<random>.tmp``), left
    by a run that was killed hard."""
    return name.startswith(".") and name.endswith(".tmp") and ".png." in name


def _new_staging_dir(out_dir: str, layers: Sequence[str]) -> str:
    """An empty ``out_dir/STAGING_DIR/<layer>/`` for each layer, where this run writes its masks
    (on the folder's file system, so that publishing them is renaming them); a staging folder
    left by a run that was killed hard is removed first (the name is wsss's own)."""
    staging = os.path.join(out_dir, STAGING_DIR)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.islink(staging) or os.path.isfile(staging):
        os.unlink(staging)
    shutil.rmtree(staging, ignore_errors=True)
    for layer in layers:
        os.makedirs(os.path.join(staging, layer))
    return staging


def _publish(out_dir: str, staging: str, layers: Sequence[str], mask_names: Sequence[str], manifest: str) -> None:
    """This run's masks (all written in ``staging``) become ``out_dir``'s.

    The incomplete-marker first (a run killed while the masks move is never taken for a finished
    one, and the folder's old manifest goes), then every mask is renamed into place (a few ms per
    thousand: the window where a kill would leave old and new masks mixed); where an earlier wsss
    run wrote the folder (its marker or manifest is there), its masks that this run did not write
    are removed: PNGs of other patches in the layer folders, every PNG of layer folders this run
    does not write (the folder too, once empty).  Nothing else is deleted; in a folder without
    wsss's marks (written by hand or by an older wsss) other files stay, and the manifest written
    last tells the readers which masks are this run's."""
    from wsss.data.datasets import INCOMPLETE_MARKER, PSEUDO_MASK_MANIFEST
    from wsss.files import write_atomic

    marker = os.path.join(out_dir, INCOMPLETE_MARKER)
    manifest_path = os.path.join(out_dir, PSEUDO_MASK_MANIFEST)
    owned = os.path.isfile(marker) or os.path.isfile(manifest_path)
    with open(marker, "w", encoding="utf-8") as f:
        f.write("wsss-pseudo-masks is moving (or was killed while moving) its masks into this folder\n")
    if os.path.lexists(manifest_path):
        os.unlink(manifest_path)
    for layer in layers:
        folder = os.path.join(out_dir, layer)
        os.makedirs(folder, exist_ok=True)
        for name in mask_names:
            _move(os.path.join(staging, layer, name), os.path.join(folder, name))
    if owned:
        keep = set(mask_names)
        for layer in LAYERS:
            folder = os.path.join(out_dir, layer)
            if os.path.islink(folder) or not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                stale = (name.lower().endswith(".png") and (layer not in layers or name not in keep)) \
                    or _is_own_temp_file(name)
                if stale and os.path.isfile(path) and not os.path.islink(path):
                    os.unlink(path)
            if layer not in layers:
                try:
                    os.rmdir(folder)
                except OSError:  # (other files there: not wsss's to delete)
                    pass
    write_atomic(manifest_path, lambda tmp: Path(tmp).write_text(manifest, encoding="utf-8"))
    os.unlink(marker)


def _move(src: str, dst: str) -> None:
    """Rename src over dst; across file systems (a layer folder that is a link elsewhere) copy."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.move(src, dst)


def check_truth_masks(truth_dir: str, dataset, description, sizes: Optional[Sequence[Tuple[int, int]]] = None
                      ) -> None:
    """Before any work: every train patch of ``dataset`` (LabelledPatches) has a truth mask
    <stem>.png in ``truth_dir`` that reads as a palette mask of this description and has its
    image's size (``sizes``: the images' (width, height), read from their headers when not
    given); else DataError naming the file (and both sizes).  Reads every truth mask (about
    0.1 ms for a 224 px PNG)."""
    from wsss.data import read_mask
    from wsss.data.datasets import image_size, mask_name
    from wsss.errors import DataError

    if not os.path.isdir(truth_dir):
        raise DataError(f"pseudo masks: truth folder {truth_dir} does not exist")
    for i, name in enumerate(dataset.names):
        image_path = os.path.join(dataset.folder, name)
        truth_path = os.path.join(truth_dir, mask_name(name))
        if not os.path.isfile(truth_path):
            raise DataError(f"pseudo masks: no truth mask {truth_path} for {image_path}")
        truth = read_mask(truth_path, description)
        width, height = sizes[i] if sizes is not None else image_size(image_path)
        if truth.shape != (height, width):
            raise DataError(f"{truth_path}: truth mask size {truth.shape[1]}x{truth.shape[0]} does not match its "
                            f"image {image_path} ({width}x{height})")


def score_pseudo_masks(pseudo_dir: str, truth_dir: str, description, layers: Sequence[str] = LAYERS,
                       names: Optional[Sequence[str]] = None) -> Dict:
    """mIoU etc. of each layer's pseudo masks against truth palette masks of the same names.

    names: the mask file names to score; by default those of the folder's manifest (the last
    wsss-pseudo-masks run there), else every PNG of the layer folder."""
    from wsss.data import read_mask
    from wsss.data.datasets import read_pseudo_mask_manifest
    from wsss.errors import DataError
    from wsss.train.metrics import ConfusionMatrix

    if names is None:
        manifest = read_pseudo_mask_manifest(pseudo_dir)
        if manifest is not None:
            names = manifest["masks"]
            missing = [l for l in layers if l not in manifest["layers"]]
            if missing:
                raise DataError(f"pseudo masks: the last wsss-pseudo-masks run into {pseudo_dir} wrote no "
                                f"{', '.join(missing)} masks (it wrote {', '.join(manifest['layers'])})")
    folders, layer_names = {}, {}
    for layer in layers:
        folder = folders[layer] = os.path.join(pseudo_dir, layer)
        layer_names[layer] = set(names) if names is not None else \
            {n for n in os.listdir(folder) if n.endswith(".png")} if os.path.isdir(folder) else set()
        if not layer_names[layer]:
            raise DataError(f"pseudo masks: {folder} holds no masks")
    # (each truth mask read once, scored against every layer's mask of that name)
    cms = {layer: ConfusionMatrix(description.num_classes, description.background_index) for layer in layers}
    for name in sorted(set().union(*layer_names.values())):
        truth_path = os.path.join(truth_dir, name)
        truth = None
        for layer in layers:
            if name not in layer_names[layer]:
                continue
            mask_path = os.path.join(folders[layer], name)
            if truth is None:
                if not os.path.isfile(truth_path):
                    raise DataError(f"pseudo masks: no truth mask {truth_path} for {mask_path}")
                truth = read_mask(truth_path, description)
            if not os.path.isfile(mask_path):
                raise DataError(f"pseudo masks: {mask_path} is missing")
            mask = read_mask(mask_path, description)
            if truth.shape != mask.shape:
                raise DataError(f"{truth_path}: truth mask size {truth.shape[1]}x{truth.shape[0]} does not match "
                                f"the pseudo mask {mask_path} ({mask.shape[1]}x{mask.shape[0]})")
            cms[layer].update(truth, mask)
    return {layer: cms[layer].scores(description.class_names) for layer in layers}

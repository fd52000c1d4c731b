"""Readers (torch Datasets) for the LUAD-HistoSeg / BCSS-WSSS layouts.

- ``LabelledPatches``: a train split, patch-level labels parsed from the file names.
- ``MaskedPatches``: a val/test split, ``img/`` RGB patches and ``mask/`` palette masks.
- ``PseudoMaskPatches``: train patches with the per-layer pseudo masks of stage 2.

Items are dicts of tensors: "image" uint8 [3,H,W] (the models divide by 255 themselves),
"label" float32 [K], "mask" int64 [H,W] (palette indices; background = description's
background_index), "masks" int64 [L,H,W] (one per pseudo-mask layer), "name" str.
Every problem with a file raises DataError naming the file.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from wsss.data.description import DatasetDescription, parse_label
from wsss.errors import DataError

__all__ = ["LabelledPatches", "MaskedPatches", "PseudoMaskPatches", "read_rgb", "read_mask", "list_images",
           "resolve_split_dir", "mask_name", "image_size", "read_pseudo_mask_manifest", "INCOMPLETE_MARKER",
           "PSEUDO_MASK_MANIFEST"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# in a pseudo-mask folder while wsss-pseudo-masks writes it (left there by a run that was killed)
INCOMPLETE_MARKER = ".wsss-pseudo-masks-incomplete"
# in a pseudo-mask folder once a wsss-pseudo-masks run has written all its masks: the layers and
# mask names that run wrote (JSON).  Readers take only those: a folder that held an earlier run
# (other patches, other --layers) may still hold that run's files where wsss did not remove them.
PSEUDO_MASK_MANIFEST = ".wsss-pseudo-masks.json"


def read_pseudo_mask_manifest(pseudo_root: str) -> Optional[Dict]:
    """The manifest of the last finished wsss-pseudo-masks run into ``pseudo_root``
    ({"layers": [...], "masks": [<stem>.png, ...], ...}), None where there is none (a folder
    written by hand or by an older wsss), DataError naming the file where it cannot be read."""
    path = os.path.join(pseudo_root, PSEUDO_MASK_MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"pseudo masks: {path}: cannot read the record of the last wsss-pseudo-masks run "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): run wsss-pseudo-masks again") from None
    ok = isinstance(manifest, dict) and all(
        isinstance(manifest.get(k), list) and all(isinstance(v, str) for v in manifest[k]) for k in ("layers", "masks"))
    if not ok:
        raise DataError(f"pseudo masks: {path}: not a record of a wsss-pseudo-masks run (expected lists 'layers' "
                        f"and 'masks'): run wsss-pseudo-masks again")
    return manifest


def list_images(folder: str, what: str) -> List[str]:
    """Sorted image file names in ``folder``; DataError if it is missing or empty."""
    if not os.path.isdir(folder):
        raise DataError(f"{what}: folder {folder} does not exist")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not names:
        raise DataError(f"{what}: folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}): empty split")
    return names


def check_unique_stems(folder: str, names: Sequence[str]) -> None:
    """DataError naming both files when two names share a stem (a.png, a.jpg).

    NB: images are paired with masks (and pseudo masks) by stem, so one of the two would silently
    be scored against the other's mask, or its mask overwritten.
    """
    seen: Dict[str, str] = {}
    for n in names:
        stem = os.path.splitext(n)[0]
        if stem in seen:
            raise DataError(f"{os.path.join(folder, seen[stem])} and {n}: two files with the stem {stem!r} in "
                            f"{folder}; files are matched by stem, keep one")
        seen[stem] = n


def mask_name(image_name: str) -> str:
    """The file name of an image's (pseudo or truth) mask: its stem + ".png"."""
    return os.path.splitext(image_name)[0] + ".png"


def resolve_split_dir(root: str, split: str) -> str:
    """root/split if it exists, else root itself when it already is that split's folder."""
    candidate = os.path.join(root, split)
    if os.path.isdir(candidate):
        return candidate
    if os.path.isdir(root) and os.path.basename(os.path.normpath(root)) == split:
        return root
    raise DataError(f"dataset {root}: no '{split}' split (expected folder {candidate})")


# Pixel modes read as they are: 8-bit grey, palette and colour (an alpha channel, where there is
# one, is dropped as for RGBA: patches are opaque); 16-bit grey keeps its high byte, as PIL reads
# 16-bit RGB.  Anything else (32-bit integer or float, CMYK, Lab, ...) is refused by name: PIL's
# convert("RGB") clips or guesses (16-bit grey became all white) instead of failing.
_RGB_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "YCbCr"})
_GREY16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_MODE_NAMES = {"I": "32-bit integer grey", "F": "32-bit float grey", "CMYK": "CMYK colour", "LAB": "Lab colour",
               "HSV": "HSV colour", "I;16S": "signed 16-bit grey", "RGBa": "premultiplied RGBA",
               "La": "premultiplied grey+alpha"}
# what PIL raises for a file it cannot decode (a header claiming a huge image among them)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _decode_problem(e: BaseException) -> str:
    if isinstance(e, Image.DecompressionBombError):
        import re

        numbers = re.findall(r"\d+", str(e))
        claim = f"{numbers[0]} pixels, over PIL's limit of {numbers[1]}" if len(numbers) >= 2 else str(e)
        return f"its header claims {claim} for one image (a damaged or hostile file, far larger than any patch)"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_mode(path: str, mode: str) -> None:
    if mode not in _RGB_MODES and mode not in _GREY16_MODES:
        raise DataError(f"{path}: cannot use the image: its pixels are {_MODE_NAMES.get(mode, mode)} "
                        f"(PIL mode {mode}), not 8-bit RGB, grey or palette: save the patch as 8-bit RGB")


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) of an image from its header alone (cheap: nothing is decoded), with the
    checks read_rgb makes on the header (readable, not claiming a huge size, a usable pixel
    mode); DataError naming the file."""
    try:
        with Image.open(path) as img:
            _check_mode(path, img.mode)
            return img.size
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: cannot read the image: {_decode_problem(e)}") from e


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H,W,3]; DataError naming the file if it cannot be decoded or its pixels are not
    8-bit grey, palette or colour, or 16-bit grey (scaled to 8 bits: the high byte)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in _GREY16_MODES:
                grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            _check_mode(path, mode)
            return np.asarray(img.convert("RGB"))
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: cannot read the image: {_decode_problem(e)}") from e


def read_mask(path: str, description: DatasetDescription) -> np.ndarray:
    """Palette indices uint8 [H,W] from a palette ('P'), grayscale ('L') or RGB-coloured mask.

    Allowed values are 0..K-1 and the background index; anything else is a DataError that
    names the file and the offending value.
    """
    try:
        with Image.open(path) as img:
            if img.mode in ("P", "L"):
                mask = np.asarray(img)
            elif img.mode in ("RGB", "RGBA"):
                mask = _rgb_to_index(np.asarray(img.convert("RGB")), description, path)
            else:
                raise DataError(f"{path}: mask mode {img.mode} is not supported (expected a palette PNG)")
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: cannot read the mask: {_decode_problem(e)}") from e
    k = description.num_classes
    bad = (mask >= k) & (mask != description.background_index)
    if bad.any():
        value = int(mask[bad][0])
        raise DataError(f"{path}: palette index {value} out of range: expected 0..{k - 1} "
                        f"({', '.join(description.class_names)}) or {description.background_index} (background)")
    return mask.astype(np.uint8, copy=False)


def _rgb_to_index(rgb: np.ndarray, description: DatasetDescription, path: str) -> np.ndarray:
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(code.shape, 255, dtype=np.uint8)
    known = np.zeros(code.shape, dtype=bool)
    for idx, (r, g, b) in enumerate(description.palette):
        hit = code == ((r << 16) | (g << 8) | b)
        out[hit] = idx
        known |= hit
    if not known.all():
        y, x = np.argwhere(~known)[0]
        raise DataError(f"{path}: colour {tuple(int(v) for v in rgb[y, x])} at (x={x}, y={y}) is not in the "
                        f"palette of {description.name}")
    return out


def _to_chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


class LabelledPatches(torch.utils.data.Dataset):
    """Train split: patches whose file names carry the patch-level label.

    root: the dataset root (with a train/ folder) or the train folder itself.
    All labels are parsed up front, so a bad file name fails before any training.
    """

    def __init__(self, root: str, description: DatasetDescription, split: str = "train"):
        self.folder = resolve_split_dir(root, split)
        self.description = description
        self.names = list_images(self.folder, f"{description.name} {split} split")
        check_unique_stems(self.folder, self.names)  # (pseudo masks are written as <stem>.png)
        self.labels = torch.tensor([parse_label(os.path.join(self.folder, n), description) for n in self.names],
                                   dtype=torch.float32)  # [N,K]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Dict:
        path = os.path.join(self.folder, self.names[i])
        return {"image": _to_chw(read_rgb(path)), "label": self.labels[i], "name": self.names[i]}


class MaskedPatches(torch.utils.data.Dataset):
    """A val/test split: ``img/`` RGB patches and ``mask/`` palette masks of the same stem."""

    def __init__(self, root: str, description: DatasetDescription, split: str = "val",
                 image_dir: str = "img", mask_dir: str = "mask"):
        base = resolve_split_dir(root, split)
        self.image_folder = os.path.join(base, image_dir)
        self.mask_folder = os.path.join(base, mask_dir)
        self.description = description
        what = f"{description.name} {split} split"
        self.names = list_images(self.image_folder, what)
        check_unique_stems(self.image_folder, self.names)
        mask_names = list_images(self.mask_folder, what + " masks")
        check_unique_stems(self.mask_folder, mask_names)
        masks = {os.path.splitext(n)[0]: n for n in mask_names}
        self.mask_names = []
        for n in self.names:
            stem = os.path.splitext(n)[0]
            if stem not in masks:
                raise DataError(f"{os.path.join(self.image_folder, n)}: no mask {stem}.png in {self.mask_folder}")
            self.mask_names.append(masks[stem])

    def __len__(self) -> int:
        return len(self.names)

    def validate(self) -> None:
        """Check every image/mask pair (sizes, palette indices) before work starts."""
        for i in range(len(self)):
            self[i]

    def __getitem__(self, i: int) -> Dict:
        ipath = os.path.join(self.image_folder, self.names[i])
        mpath = os.path.join(self.mask_folder, self.mask_names[i])
        rgb = read_rgb(ipath)
        mask = read_mask(mpath, self.description)
        if mask.shape != rgb.shape[:2]:
            raise DataError(f"{mpath}: mask size {mask.shape[1]}x{mask.shape[0]} does not match its image "
                            f"{ipath} ({rgb.shape[1]}x{rgb.shape[0]})")
        return {"image": _to_chw(rgb), "mask": torch.from_numpy(mask.astype(np.int64)), "name": self.names[i]}


class PseudoMaskPatches(torch.utils.data.Dataset):
    """Train patches with their stage-2 pseudo masks: pseudo_root/<layer>/<stem>.png per layer.

    Also used for the fully supervised baseline with ``layers=("",)`` and a truth folder.
    Items: "image" uint8 [3,H,W], "masks" int64 [L,H,W], "label" float32 [K], "name".
    """

    def __init__(self, root: str, pseudo_root: str, layers: Sequence[str], description: DatasetDescription,
                 split: str = "train"):
        self.patches = LabelledPatches(root, description, split)
        self.description = description
        self.layer_dirs = [os.path.join(pseudo_root, layer) if layer else pseudo_root for layer in layers]
        if os.path.exists(os.path.join(pseudo_root, INCOMPLETE_MARKER)):
            raise DataError(f"pseudo masks: {pseudo_root} is from a wsss-pseudo-masks run that did not finish "
                            f"(its masks may mix two runs): run wsss-pseudo-masks again")
        # Only what the last run wrote: a folder rerun with other patches or --layers may still hold
        # the earlier run's masks where wsss did not own the folder to remove them.
        manifest = read_pseudo_mask_manifest(pseudo_root)
        if manifest is not None:
            written = set(manifest["masks"])
            for layer, d in zip(layers, self.layer_dirs):
                if layer and layer not in manifest["layers"]:
                    older = f" ({d} is from an older run)" if os.path.isdir(d) else ""
                    raise DataError(f"pseudo masks: the last wsss-pseudo-masks run into {pseudo_root} wrote the "
                                    f"layers {', '.join(manifest['layers'])}, not {layer}{older}: run "
                                    f"wsss-pseudo-masks with --layers {','.join(l for l in layers if l)}")
            for n in self.patches.names:
                if mask_name(n) not in written:
                    raise DataError(f"pseudo masks: the last wsss-pseudo-masks run into {pseudo_root} (on "
                                    f"{manifest.get('data', 'another dataset')}) wrote no mask for "
                                    f"{os.path.join(self.patches.folder, n)}: run wsss-pseudo-masks on this dataset")
        for d in self.layer_dirs:
            if not os.path.isdir(d):
                raise DataError(f"pseudo masks: folder {d} does not exist (run wsss-pseudo-masks first)")
        # Fail before training if any mask is missing.
        for d in self.layer_dirs:
            present = set(os.listdir(d))
            for n in self.patches.names:
                if mask_name(n) not in present:
                    raise DataError(f"pseudo masks: {os.path.join(d, mask_name(n))} is missing for "
                                    f"{os.path.join(self.patches.folder, n)}")
    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> Dict:
        item = self.patches[i]
        h, w = item["image"].shape[1:]
        masks = []
        for d in self.layer_dirs:
            path = os.path.join(d, mask_name(item["name"]))
            mask = read_mask(path, self.description)
            if mask.shape != (h, w):
                raise DataError(f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match its image "
                                f"{item['name']} ({w}x{h})")
            masks.append(torch.from_numpy(mask.astype(np.int64)))
        item["masks"] = torch.stack(masks)
        return item

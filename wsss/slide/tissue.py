"""Tissue detection on a low-resolution view of a slide, and user-supplied masks.

``detect_tissue``: Otsu threshold on HSV saturation of a thumbnail (H&E tissue is coloured,
glass and background are grey/white), then closing, hole filling and removal of objects
smaller than a physical area.  ``load_tissue_mask``: any image file whose non-zero pixels
are tissue, stretched over the whole slide.  Both give a ``TissueMask``: a small bool array
plus the microns per mask pixel, which maps any region of an output grid onto the mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from wsss.errors import SlideError

__all__ = ["TissueMask", "detect_tissue", "load_tissue_mask", "read_mask_image", "full_tissue_mask"]


@dataclass
class TissueMask:
    """mask: bool [h, w] over the whole slide; mpp_y, mpp_x: microns per mask pixel; source: how it was made."""

    mask: np.ndarray
    mpp_y: float
    mpp_x: float
    source: str
    threshold: Optional[float] = None

    def region(self, x: int, y: int, width: int, height: int, grid_mpp: float,
               grid_mpp_x: Optional[float] = None) -> np.ndarray:
        """bool [height, width]: the mask (nearest neighbour) over a region of a grid at ``grid_mpp``
        (rows; columns at ``grid_mpp_x`` where given: a picture whose sides were rounded apart).

        Output pixel (r, c) samples the mask at the micron position of its centre.
        """
        rows, inside_r = self.sample_index(y, height, grid_mpp, axis=0)
        cols, inside_c = self.sample_index(x, width, grid_mpp if grid_mpp_x is None else grid_mpp_x, axis=1)
        return self.mask[rows[:, None], cols[None, :]] & inside_r[:, None] & inside_c[None, :]

    def sample_index(self, start: int, n: int, grid_mpp: float, axis: int) -> tuple:
        """(index int64 [n] clipped into the mask, inside bool [n]) of grid pixels start..start+n-1
        along ``axis`` (0: rows, 1: columns): ``region`` is the outer product of two of these."""
        m = self.mask.shape[axis]
        idx = ((np.arange(start, start + n) + 0.5) * (grid_mpp / (self.mpp_y if axis == 0 else self.mpp_x))).astype(np.int64)
        return np.clip(idx, 0, m - 1), (idx >= 0) & (idx < m)

    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def full_tissue_mask(width_um: float, height_um: float) -> TissueMask:
    """Everything is tissue (used with --no-tissue-detection and in tests)."""
    return TissueMask(np.ones((1, 1), bool), height_um, width_um, "all")


def detection_factor(view, mask_mpp: Optional[float] = None) -> float:
    """Output-grid pixels per mask pixel of ``detect_tissue`` (see its mask_mpp)."""
    plan = view.plan
    if mask_mpp is None:
        extent_um = max(plan.width, plan.height) * plan.mpp
        mask_mpp = min(max(extent_um / 1024.0, 4.0, plan.mpp), 32.0)
    return max(1.0, mask_mpp / plan.mpp)


GLASS_SATURATION = 0.1  # the most a thumbnail's glass (background) pixels' median saturation is


def detect_tissue(
    view,
    *,
    mask_mpp: Optional[float] = None,
    min_object_um2: float = 20_000.0,
    min_hole_um2: float = 20_000.0,
    closing_um: float = 16.0,
    min_saturation: float = 0.04,
    finer: Sequence[Optional[np.ndarray]] = (),
    workers: int = 1,
) -> tuple[TissueMask, np.ndarray]:
    """Detect tissue on a thumbnail of ``view`` (a SlideView).  Returns (mask, thumbnail uint8 [h,w,3]).

    mask_mpp: microns per mask pixel; default: about 1024 px along the longest side, within
    4..32 um/px (and no finer than the view).  min_object_um2 / min_hole_um2: objects
    and holes smaller than this area (square microns) are removed / filled.  NB: the Otsu
    threshold is floored at ``min_saturation`` so a slide of only background (where Otsu
    would split noise) yields no tissue.  finer: whole-view thumbnails already read; one at
    least as fine as the mask is resized instead of reading the slide again (SlideView.thumbnail);
    workers: reader threads for that read.
    """
    from skimage import filters, morphology

    plan = view.plan
    factor = detection_factor(view, mask_mpp)
    thumb = view.thumbnail(factor, finer=finer, workers=workers)
    th, tw = thumb.shape[:2]
    mpp_y = plan.height * plan.mpp / th
    mpp_x = plan.width * plan.mpp / tw
    rgb = thumb.astype(np.float32) / 255.0
    cmax, cmin = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0)
    if float(saturation.max() - saturation.min()) < 1e-3:
        threshold = 1.0  # uniform image: no tissue
    else:
        threshold = _glass_threshold(saturation, filters.threshold_otsu, min_saturation)
    mask = (saturation > threshold) & (cmax > 0.1)  # NB: near-black (pen, dust, folds) is not tissue
    px_area = mpp_y * mpp_x
    radius = max(1, int(round(closing_um / math.sqrt(px_area))))
    mask = morphology.closing(mask, morphology.disk(radius))
    # NB: on a small image (a crop, a biopsy fragment, a test patch) the physical minimum would
    # remove everything (a 512^2 crop at 0.25 um/px is 0.016 mm^2): at most 1% of the image
    small = 0.01 * th * tw  # (pixels)
    mask = _remove_small(morphology.remove_small_holes, mask, int(min(min_hole_um2 / px_area, small)))
    mask = _remove_small(morphology.remove_small_objects, mask, int(min(min_object_um2 / px_area, small)))
    return TissueMask(mask.astype(bool), mpp_y, mpp_x, "otsu-saturation", threshold), thumb


def _glass_threshold(saturation: np.ndarray, otsu, floor: float) -> float:
    """The saturation that separates glass from tissue: Otsu's, where its lower class is glass
    (median <= GLASS_SATURATION: 0.008 on the CMU slide, 0.012 on the synthetic one).

    NB: with no glass in view (a crop inside a resection) Otsu splits two kinds of tissue, e.g.
    pale stroma (~0.28) from cellular regions (~0.6), and dropped half of it; with tinted glass
    (~0.06) beside both, glass and stroma fall below it together.  So a lower class that is not
    glass is split once more, kept if its own lower part is glass, else nothing is glass (the
    floor)."""
    threshold = max(float(otsu(saturation)), floor)
    lower = saturation[saturation <= threshold]
    if lower.size == 0 or float(np.median(lower)) <= GLASS_SATURATION:
        return threshold
    if float(lower.max() - lower.min()) >= 1e-3:
        inner = max(float(otsu(lower)), floor)
        below = lower[lower <= inner]
        if below.size and float(np.median(below)) <= GLASS_SATURATION:
            return inner
    return floor


def _remove_small(fn, mask: np.ndarray, area_px: int) -> np.ndarray:
    """skimage's remove_small_objects/holes across versions (max_size since 0.26: removes <=)."""
    import inspect

    if area_px < 1:
        return mask
    if "max_size" in inspect.signature(fn).parameters:
        return fn(mask, max_size=area_px - 1)
    return fn(mask, area_px)


def read_mask_image(path) -> np.ndarray:
    """The 2-D array of a user mask image (PNG/TIFF/...), or SlideError naming what is wrong."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        raise SlideError(f"--tissue-mask {path}: is a directory, not an image file")
    if not path.is_file():
        raise SlideError(f"--tissue-mask {path}: no such file")
    try:
        with Image.open(path) as img:
            # NB: 16-bit, 32-bit and float masks (e.g. 0/1 floats) are read as they are: converting
            # them to 8-bit "L" first truncated values below 1 to 0 (an empty mask, silently); so
            # are palette masks ("P": a label image), whose indices count, not their colours' brightness
            arr = np.asarray(img if img.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F") else img.convert("L"))
    except Exception as e:  # noqa: BLE001 (PIL raises several types for non-images)
        raise SlideError(f"--tissue-mask {path}: not an image PIL can read ({type(e).__name__}: {e})") from None
    if arr.ndim != 2 or arr.size == 0:
        raise SlideError(f"--tissue-mask {path}: expected a 2-D mask image, got shape {arr.shape}")
    return arr


def load_tissue_mask(path, *, slide_width_um: float, slide_height_um: float) -> TissueMask:
    """A user mask image (PNG/TIFF/...; non-zero = tissue) stretched over the whole slide."""
    arr = read_mask_image(path)
    h, w = arr.shape
    aspect_slide = slide_width_um / slide_height_um
    if abs((w / h) / aspect_slide - 1.0) > 0.05 + 2.0 / min(w, h):
        raise SlideError(f"--tissue-mask {path}: its aspect ratio {w}x{h} does not match the slide's "
                         f"({slide_width_um:.0f} x {slide_height_um:.0f} um)")
    return TissueMask(arr > 0, slide_height_um / h, slide_width_um / w, f"file:{path}")

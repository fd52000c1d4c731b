"""Synthetic whole-slide images: a tiled pyramidal TIFF plus a matching ground-truth label TIFF.

The pyramid is written with tifffile as SEPARATE PAGES, one per level (OpenSlide opens that
as "generic-tiff" with all levels; a SubIFD pyramid opens as one level, BUILD_NOTES.md).
Level 0 is rendered tile by tile (wsss.synthetic.tissue renders any window on its own); each
level is box-downsampled 2x into a disk-backed memmap that feeds the next level, so memory
stays flat however large the slide is.  mpp is written into the resolution tags
(pixels per centimetre), which OpenSlide reports as openslide.mpp-x/y.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterator, List, Optional, Tuple

import numpy as np

from wsss.files import atomic_path
from wsss.synthetic.tissue import class_names_for, render_window

__all__ = ["write_synthetic_slide", "truth_path_for"]


def truth_path_for(path: str) -> str:
    """Where write_synthetic_slide puts the ground truth of ``path``: <stem>_truth.tif."""
    stem, _ = os.path.splitext(path)
    return f"{stem}_truth.tif"


def _level_shapes(width: int, height: int, tile_size: int, max_levels: int) -> List[Tuple[int, int]]:
    shapes = [(height, width)]
    while len(shapes) < max_levels and max(shapes[-1]) > tile_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _downsample2(tile: np.ndarray) -> np.ndarray:
    """2x box mean of an [h,w,3] uint8 block (h, w even) -> [h/2,w/2,3] uint8."""
    h, w = tile.shape[:2]
    t = tile.reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
    return ((t.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def write_synthetic_slide(path: str, width: int, height: int, *, seed: int = 0, mpp: float = 0.5,
                          tile_size: int = 256, num_classes: int = 4, compression: str = "jpeg",
                          jpeg_quality: int = 90, max_levels: int = 8,
                          truth_path: Optional[str] = None) -> str:
    """Write a synthetic H&E slide to ``path`` (pyramidal tiled TIFF) and its truth; return the truth path.

    width, height: level-0 size in pixels; mpp: microns per pixel at level 0.
    tile_size: TIFF tile edge (multiple of 16).  compression: "jpeg" (lossy, quality
    ``jpeg_quality``) or a lossless tifffile codec ("zlib", "lzw", "none").
    The truth (default <stem>_truth.tif) is a single-level tiled uint8 TIFF, zlib-compressed,
    of level-0 size: 0..K-1 tissue classes, K background; its ImageDescription names the
    classes.  Both files are written to temporary names and moved into place when complete.
    """
    import tifffile

    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if tile_size % 16 or tile_size <= 0:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    names = class_names_for(num_classes)
    truth_path = truth_path or truth_path_for(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    shapes = _level_shapes(width, height, tile_size, max_levels)
    resolution = (1e4 / mpp, 1e4 / mpp)  # pixels per cm
    codec = None if compression in (None, "none") else compression
    comp_args = {}
    if codec == "jpeg":
        comp_args = {"compression": "jpeg", "compressionargs": {"level": int(jpeg_quality)}}
    elif codec is not None:
        comp_args = {"compression": codec}
    ts = tile_size

    scratch = tempfile.mkdtemp(prefix=".wsss-pyramid-", dir=folder)
    memmaps: List[Optional[np.ndarray]] = [None]
    try:
        # (each file appears whole or not at all: written to a hidden temporary, then renamed)
        with atomic_path(path, "slide.") as tmp_slide, atomic_path(truth_path, "truth.") as tmp_truth:
            # Level i+1 is accumulated in a disk-backed memmap while level i is written.
            for i, (h, w) in enumerate(shapes[1:], start=1):
                memmaps.append(np.lib.format.open_memmap(os.path.join(scratch, f"level{i}.npy"), mode="w+",
                                                         dtype=np.uint8, shape=(h, w, 3)))

            def level_tiles(level: int) -> Iterator[np.ndarray]:
                h, w = shapes[level]
                nxt = memmaps[level + 1] if level + 1 < len(shapes) else None
                for ty in range(0, h, ts):
                    for tx in range(0, w, ts):
                        th, tw = min(ts, h - ty), min(ts, w - tx)
                        if level == 0:
                            rgb, _ = render_window(tx, ty, th, tw, seed=seed, num_classes=num_classes, mpp=mpp)
                        else:
                            rgb = np.asarray(memmaps[level][ty:ty + th, tx:tx + tw])
                        if nxt is not None:
                            # Odd edge blocks: replicate the last row/column before the 2x mean.
                            eh, ew = th + (th & 1), tw + (tw & 1)
                            block = np.pad(rgb, ((0, eh - th), (0, ew - tw), (0, 0)), mode="edge")
                            nxt[ty // 2:(ty + eh) // 2, tx // 2:(tx + ew) // 2] = _downsample2(block)
                        tile = np.full((ts, ts, 3), 255, dtype=np.uint8)  # tifffile wants full tiles
                        tile[:th, :tw] = rgb
                        yield tile

            description = (f"wsss synthetic H&E slide; seed={seed}; mpp={mpp}; "
                           f"classes={','.join(names)}; background={num_classes}")
            with tifffile.TiffWriter(tmp_slide, bigtiff=height * width * 3 > 2 ** 31 - 2 ** 27) as tif:
                for level, (h, w) in enumerate(shapes):
                    tif.write(
                        level_tiles(level),
                        shape=(h, w, 3), dtype=np.uint8, tile=(ts, ts), photometric="rgb",
                        subfiletype=0 if level == 0 else 1,
                        resolution=(resolution[0] / 2 ** level, resolution[1] / 2 ** level),
                        resolutionunit="CENTIMETER",
                        description=description if level == 0 else None,
                        metadata=None, **comp_args,
                    )
            # The truth is rendered again, labels only (cheap next to the RGB pass), tile by tile.
            with tifffile.TiffWriter(tmp_truth, bigtiff=height * width > 2 ** 31 - 2 ** 27) as truth_tif:
                truth_tif.write(
                    _truth_tiles(width, height, ts, seed, num_classes, mpp),
                    shape=(height, width), dtype=np.uint8, tile=(ts, ts), photometric="minisblack",
                    compression="zlib", resolution=resolution, resolutionunit="CENTIMETER",
                    description=(f"wsss synthetic truth; classes={','.join(names)}; background={num_classes}; "
                                 f"seed={seed}; mpp={mpp}"),
                    metadata=None,
                )
            memmaps.clear()  # close the memmaps before their files are removed
    finally:
        memmaps.clear()
        for name in os.listdir(scratch):
            os.remove(os.path.join(scratch, name))
        os.rmdir(scratch)
    return truth_path


def _truth_tiles(width: int, height: int, ts: int, seed: int, num_classes: int, mpp: float) -> Iterator[np.ndarray]:
    from wsss.synthetic.tissue import render_labels_window

    for ty in range(0, height, ts):
        for tx in range(0, width, ts):
            th, tw = min(ts, height - ty), min(ts, width - tx)
            tile = np.full((ts, ts), num_classes, dtype=np.uint8)
            tile[:th, :tw] = render_labels_window(tx, ty, th, tw, seed=seed, num_classes=num_classes, mpp=mpp)
            yield tile

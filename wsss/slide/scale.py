"""Reading a slide at a requested resolution (microns per pixel).

``plan_scale`` picks the pyramid level to read for a target mpp: the coarsest level whose mpp
is within ``tolerance`` of the target (finer or coarser), read as is (the output grid then has
that level's true mpp); where none is, the coarsest level still at least as fine as the target
(nothing upsampled when avoidable), resampled.  ``SlideView`` reads regions in the
output grid's coordinates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Optional, Sequence

import numpy as np

from wsss.errors import SlideError
from wsss.slide.reader import SlideReader, ThreadHandles

__all__ = ["ScalePlan", "plan_scale", "SlideView", "MAX_UPSAMPLING"]

MAX_UPSAMPLING = 2.0  # the most a slide's finest level is enlarged to reach a model's mpp


@dataclass(frozen=True)
class ScalePlan:
    """How the output grid maps onto the slide.

    level: pyramid level read; level_mpp: its microns per pixel; mpp: microns per pixel of
    the output grid; scale: level pixels per output pixel (1.0 = read as is, > 1 downsample);
    width, height: the output grid size in pixels.
    """

    level: int
    level_mpp: float
    mpp: float
    scale: float
    width: int
    height: int

    @property
    def resampled(self) -> bool:
        return self.scale != 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def plan_scale(reader: SlideReader, target_mpp: float, *, tolerance: float = 0.05) -> ScalePlan:
    """Pick the level and resampling factor that read ``reader`` at ``target_mpp``.

    NB: a level within ``tolerance`` (relative) of the target is used without resampling,
    e.g. a 0.499 um/px scan for a 0.5 um/px model: resampling by 0.2% would only blur.
    """
    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise SlideError(f"target mpp must be a positive number, got {target_mpp}")
    mpp0 = reader.mpp
    level_mpps = _level_mpps(reader)
    # Prefer a level that matches within tolerance (the coarsest such one).
    matching = [lvl for lvl, m in enumerate(level_mpps) if abs(m / target_mpp - 1.0) <= tolerance]
    if matching:
        lvl = max(matching, key=lambda i: level_mpps[i])
        w, h = reader.level_dimensions[lvl]
        return ScalePlan(lvl, level_mpps[lvl], level_mpps[lvl], 1.0, int(w), int(h))
    lvl = _coarsest_level_as_fine_as(level_mpps, target_mpp)
    scale = target_mpp / level_mpps[lvl]
    if scale * MAX_UPSAMPLING * (1.0 + tolerance) < 1.0:
        given = getattr(reader, "mpp_override", None) is not None
        fix = ("Check the --mpp given: it is the slide's level-0 resolution" if given
               else "If the slide's resolution is recorded wrongly, pass --mpp")
        raise SlideError(
            f"{reader.path}: the slide's finest level is {level_mpps[0]:.4g} um/px"
            f"{' (--mpp)' if given else ''}, {1 / scale:.3g}x coarser than the model's {target_mpp:g} um/px; "
            f"upsampling by more than {MAX_UPSAMPLING:g}x would show the model tissue at a scale it never "
            f"saw.  {fix}")
    w0, h0 = reader.dimensions
    width = max(1, int(round(w0 * mpp0 / target_mpp)))
    height = max(1, int(round(h0 * mpp0 / target_mpp)))
    return ScalePlan(lvl, level_mpps[lvl], float(target_mpp), float(scale), width, height)


def _level_mpps(reader: SlideReader) -> list:
    return [reader.level_mpp(lvl) for lvl in range(reader.level_count)]


def _coarsest_level_as_fine_as(level_mpps: Sequence[float], mpp: float) -> int:
    """The coarsest level whose mpp is at most ``mpp`` (nothing upsampled), else level 0."""
    finer = [lvl for lvl, m in enumerate(level_mpps) if m <= mpp]
    return max(finer, key=lambda i: level_mpps[i]) if finer else 0


class SlideView:
    """Regions of a slide in the output grid of a ``ScalePlan``.

    ``read(x, y, w, h) -> uint8 [h, w, 3]``; outside the slide is white.  Resampled reads use
    PIL's antialiased bilinear filter on a source box with a margin wide enough that the
    filter never touches the box edge, so overlapping tiles see the same pixels.
    """

    def __init__(self, reader: SlideReader, plan: ScalePlan) -> None:
        self.reader = reader
        self.plan = plan

    def reopen(self) -> "SlideView":
        return SlideView(self.reader.reopen(), self.plan)

    def close(self) -> None:
        self.reader.close()

    def spec(self) -> Optional[tuple]:
        """What opens this view the same way in another process (``SlideView.from_spec``), or
        None (see SlideReader.spec)."""
        reader = self.reader.spec()
        return None if reader is None else (reader, self.plan)

    @classmethod
    def from_spec(cls, spec: tuple) -> "SlideView":
        from wsss.slide.reader import open_spec

        reader, plan = spec
        return cls(open_spec(reader), plan)

    def read(self, x: int, y: int, width: int, height: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 [height, width, 3] of the view at (x, y) (into ``out`` where given)."""
        plan = self.plan
        if not plan.resampled:
            return self.reader.read_region(plan.level, x, y, width, height, out=out)
        from PIL import Image

        s = plan.scale
        margin = int(math.ceil(max(s, 1.0))) + 2
        sx0, sy0 = x * s, y * s
        sx1, sy1 = (x + width) * s, (y + height) * s
        rx0, ry0 = int(math.floor(sx0)) - margin, int(math.floor(sy0)) - margin
        rx1, ry1 = int(math.ceil(sx1)) + margin, int(math.ceil(sy1)) + margin
        src = self.reader.read_region(plan.level, rx0, ry0, rx1 - rx0, ry1 - ry0)
        img = Image.fromarray(src)
        resized = img.resize((int(width), int(height)), resample=Image.BILINEAR,
                         box=(sx0 - rx0, sy0 - ry0, sx1 - rx0, sy1 - ry0))
        if out is None:
            return np.asarray(resized)
        out[...] = np.asarray(resized)
        return out

    def thumbnail_size(self, factor: float) -> tuple:
        """(width, height) of ``read_downsampled(factor)``."""
        return (max(1, int(round(self.plan.width / factor))), max(1, int(round(self.plan.height / factor))))

    def thumbnail(self, factor: float, *, finer: Sequence[Optional[np.ndarray]] = (), workers: int = 1) -> np.ndarray:
        """``read_downsampled(factor)``, or one of ``finer`` (whole-view thumbnails already read)
        box-resized when it is at least as fine: a slide without a pyramid is decoded whole
        for each read, so a run reads its thumbnail once (tissue detection, overlay)."""
        from PIL import Image

        w, h = self.thumbnail_size(factor)
        for t in finer:
            if t is not None and t.shape[0] >= h and t.shape[1] >= w:
                return t if t.shape[:2] == (h, w) else np.asarray(Image.fromarray(t).resize((w, h), resample=Image.BOX))
        return self.read_downsampled(factor, workers=workers)

    def thumbnail_level(self, factor: float) -> int:
        """The pyramid level ``read_downsampled(factor)`` reads: the coarsest at least as fine
        as the thumbnail (microns per pixel), else level 0."""
        # NB: 0.1% slack, so a level exactly at the thumbnail's mpp is not lost to rounding
        return _coarsest_level_as_fine_as(_level_mpps(self.reader), self.plan.mpp * factor * 1.001)

    def read_downsampled(self, factor: float, *, block: int = 2048, workers: int = 1) -> np.ndarray:
        """The whole output grid reduced by ``factor`` (>= 1), read in bands: uint8 [h, w, 3].

        Used for thumbnails; reads the coarsest pyramid level that is fine enough, so a big
        slide with a pyramid never decodes level 0; blocks of ``block`` source pixels.
        ``workers`` > 1 reads the blocks in that many threads, each with its own handle
        (decoders release the GIL): a slide without a usable pyramid is decoded whole here.
        """
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        reader = self.reader
        lvl = self.thumbnail_level(factor)
        f = self.plan.mpp * factor / reader.level_mpp(lvl)  # level pixels per thumbnail pixel
        tw, th = self.thumbnail_size(factor)
        # Read the level in blocks of whole thumbnail pixels (bounded memory on big levels).
        step = max(1, int(block // max(f, 1e-9)))
        out = np.empty((th, tw, 3), np.uint8)
        blocks = [(ty0, min(th, ty0 + step), tx0, min(tw, tx0 + step))
                  for ty0 in range(0, th, step) for tx0 in range(0, tw, step)]

        def read_block(src_reader, ty0: int, ty1: int, tx0: int, tx1: int) -> None:
            sx0, sx1, sy0, sy1 = tx0 * f, tx1 * f, ty0 * f, ty1 * f
            rx0, ry0 = int(math.floor(sx0)), int(math.floor(sy0))
            rx1, ry1 = max(rx0 + 1, int(math.ceil(sx1))), max(ry0 + 1, int(math.ceil(sy1)))
            src = Image.fromarray(src_reader.read_region(lvl, rx0, ry0, rx1 - rx0, ry1 - ry0))
            out[ty0:ty1, tx0:tx1] = np.asarray(src.resize(
                (tx1 - tx0, ty1 - ty0), resample=Image.BOX, box=(sx0 - rx0, sy0 - ry0, sx1 - rx0, sy1 - ry0)))

        n_threads = min(max(1, workers), len(blocks))
        if n_threads == 1:
            for b in blocks:
                read_block(reader, *b)
            return out
        handles = ThreadHandles(reader)
        try:
            with ThreadPoolExecutor(n_threads, thread_name_prefix="wsss-thumbnail") as pool:
                for _ in pool.map(lambda b: read_block(handles.get(), *b), blocks):
                    pass  # NB: consumes the results, so a failed block raises here
        finally:
            handles.close()
        return out

"""Whole-slide access: readers (OpenSlide, tifffile), resolution planning, tissue detection.

``open_slide(path, reader="auto", mpp=None) -> SlideReader``; ``plan_scale(reader, mpp)`` and
``SlideView`` read regions at a target resolution; ``detect_tissue(view)`` finds tissue on a
thumbnail.  Errors a user can cause raise ``wsss.errors.SlideError``.
"""
from wsss.slide.reader import READERS, OpenSlideReader, SlideReader, ThreadHandles, TiffSlideReader, open_slide
from wsss.slide.scale import ScalePlan, SlideView, plan_scale
from wsss.slide.tissue import TissueMask, detect_tissue, full_tissue_mask, load_tissue_mask

__all__ = [
    "READERS", "SlideReader", "OpenSlideReader", "TiffSlideReader", "open_slide", "ThreadHandles",
    "ScalePlan", "SlideView", "plan_scale",
    "TissueMask", "detect_tissue", "full_tissue_mask", "load_tissue_mask",
]

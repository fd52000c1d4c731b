"""The whole-slide runner: tiling with overlap, weight-window blending, memory-bounded
stitching, pyramidal label TIFF and per-slide reports (``run_slide`` / ``run_slides``)."""
from wsss.runner.model import SlideModel
from wsss.runner.pipeline import OUTPUT_FILES, RunOptions, SlideResult, run_slide, run_slides
from wsss.runner.tiling import TileGrid, tile_starts, weight_window

__all__ = ["OUTPUT_FILES", "RunOptions", "SlideModel", "SlideResult", "run_slide", "run_slides",
           "TileGrid", "tile_starts", "weight_window"]

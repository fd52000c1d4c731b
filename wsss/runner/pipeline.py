"""The whole-slide pipeline: one slide's run and many slides'.

A slide's run (``_SlideRun``): open the slide, detect tissue, plan the tile grid at the model's
resolution; the tile stage (wsss.runner.tile_stage: read -> batch -> predict -> blend/stitch,
all overlapping); the outputs (label pyramid, pictures, areas, polygons; on CUDA mostly built
while the tiles run), written in a work folder and published at once with run.json, which
``--resume`` checks (``fingerprint``).  ``run_slides``: many slides, a failing one reported
and skipped.  The model side is wsss.runner.model's ``SlideModel``.

Python API::

    model = SlideModel.from_bundle(load_bundle("model.pt"), device="cpu", precision="auto")
    result = run_slide("slide.svs", model, "out/slide", RunOptions(overlap=32))
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from wsss.errors import WsssError
from wsss.files import lock_output_folder, probe_writable
from wsss.runner.model import PendingProbabilities, SlideModel, resolve_precision
from wsss.runner.tile_stage import _env_number, _run_tiles, default_workers, reader_processes

__all__ = ["SlideModel", "PendingProbabilities", "RunOptions", "resolve_precision", "check_output_dir",
           "check_distinct_out_dirs", "SlideResult", "run_slide", "run_slides", "OUTPUT_FILES",
           "RUN_FORMAT_VERSION"]

RUN_FORMAT_VERSION = 1


# NB: the early path's outline slabs are traced in worker processes, off this process's GIL:
# on threads, beside the GIL-bound work of feeding a GPU, they fell behind (an H200 run at
# 32768^2 still had 1.05 s of GeoJSON after the last tile; two threads beside three GIL-holding
# ones took 10-11 s for a noisy 2048^2 map that takes ~1 s alone, two processes ~2 s on 2 cores).
# WSSS_OUTLINE_PROCESSES=0 traces them on two threads instead (for A/B measurements)
OUTLINE_PROCESSES = max(0, _env_number("WSSS_OUTLINE_PROCESSES", min(4, max(1, (os.cpu_count() or 2) // 4))))
OUTPUT_FILES = ("labels.tiff", "overlay.png", "tissue_qc.png", "areas.json", "areas.csv", "polygons.geojson")
OPTIONAL_OUTPUT_FILES = ("probs.tiff",)  # (--probs)


@dataclass
class RunOptions:
    """Options that shape the result (all but ``batch_size``/``workers``/``stitch_threads``/
    ``stitch_device``/``background_outputs``/``early_pyramid``/``resume``/``progress`` enter the
    resume fingerprint).

    NB: where blending runs can move a label only where two classes tie to the last float32
    bit (see wsss.runner.band_stitching), as the batch size can on a GPU: not a new result."""

    tile_size: Optional[int] = None  # default: the model's tile size
    overlap: Optional[int] = None  # default: tile_size // 8
    # None (auto): 32 tiles and 4 reader threads when the model runs on CUDA, else 8 and 2.
    # NB: 4 readers, not 8: on an H200 host (16 cores, reference networks, 16384^2) 8 readers
    # took the GIL from the thread that feeds the GPU (tile stage +7.2% against +4.3% with 4;
    # 8192^2: +21% against +5%); 2 could not read the ~1000 tiles/s it predicts
    batch_size: Optional[int] = None
    workers: Optional[int] = None
    # 1: blend and finalise on one thread; 2: finalise (gate+argmax, counts, paste, deflate) on a
    # second thread; 0 (auto): 2 when the model runs on CUDA (a GPU outruns one stitch thread),
    # else 1 (on the CPU every helper thread takes cores from the model)
    stitch_threads: int = 0
    # where overlapping predictions are blended: "cpu" (the Stitcher, in host threads), "model"
    # (the BandStitcher, on the model's device), "auto": the model's device when it is CUDA and
    # the band fits (see _stitch_on_device), else the CPU
    stitch_device: str = "auto"
    # run_slides: write a slide's outputs on a second thread while the next slide's tiles run
    # (on a GPU the CPU-only outputs would leave it idle; 4 slides on a 2-core CPU: -8% wall time
    # with a CPU model, -23% with a stand-in accelerator; docs/runner.md)
    background_outputs: bool = True
    # build the label pyramid's coarser levels during the tile stage, from output tile rows as
    # they become final, on otherwise idle cores; None (auto): when the model runs on CUDA (on
    # a CPU model the pyramid's threads would take its cores); same file either way
    early_pyramid: Optional[bool] = None
    mpp: Optional[float] = None  # slide level-0 microns per pixel, overrides metadata
    reader: str = "auto"
    tissue: str = "auto"  # "auto" (detect), "none" (everything), or a mask image path
    min_tissue: float = 0.0  # a tile runs when its tissue fraction is above this
    output_tile: int = 256  # TIFF tile edge of the label mask
    write_probs: bool = False
    resume: bool = False
    progress: bool = True
    mpp_tolerance: float = 0.05
    min_polygon_um2: float = 200.0  # GeoJSON: smaller objects/holes are dropped/filled

    def for_model(self, model: "SlideModel") -> "RunOptions":
        """These options with the automatic batch size and reader count resolved for ``model``."""
        return replace(self, batch_size=self.batch_size if self.batch_size is not None else (32 if model.on_cuda else 8),
                       workers=self.workers if self.workers is not None else default_workers(model.device))

    def fingerprint_fields(self) -> dict:
        d = asdict(self)
        for k in ("batch_size", "workers", "stitch_threads", "stitch_device", "background_outputs", "early_pyramid",
                  "resume", "progress"):
            d.pop(k)
        if self.tissue not in ("auto", "none"):
            from wsss.bundle import file_sha256

            d["tissue_sha256"] = file_sha256(Path(self.tissue)) if Path(self.tissue).is_file() else None
        return d


@dataclass
class SlideResult:
    slide: str
    out_dir: str
    status: str  # "done" | "skipped" | "failed"
    message: str = ""
    outputs: Dict[str, str] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    areas: Optional[dict] = None


class _StageTimer:
    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, dt: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + dt

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)




def _slide_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(slide: Path, model: SlideModel, options: RunOptions, resolved: Optional[dict] = None) -> str:
    """Hash of everything that decides the outputs: slide file, model identity, options.

    resolved: the values options left to defaults resolved for this slide (tile_size, overlap,
    the reader that opened it, its mpp): typing out a default (--overlap 12 where 12 is what the
    bundle implies, --reader tifffile where auto picks it) is the same run, not a new one."""
    fields = options.fingerprint_fields()
    fields.update(resolved or {})
    blob = json.dumps({"format": RUN_FORMAT_VERSION, "slide": _slide_identity(slide), "model": model.identity,
                       "options": fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _is_complete(out_dir: Path, fp: str) -> bool:
    run_json = out_dir / "run.json"
    if not run_json.is_file():
        return False
    try:
        info = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # NB: any run.json that is not what a finished run writes means "redo" (null, a list, sizes
    # that are not a {name: bytes} object: the slide failed with an AttributeError instead)
    if not isinstance(info, dict) or info.get("status") != "complete" or info.get("fingerprint") != fp:
        return False
    sizes = info.get("output_sizes")
    if not isinstance(sizes, dict) or not sizes:
        return False
    return all(isinstance(name, str) and "/" not in name and isinstance(size, int)
               and (out_dir / name).is_file() and (out_dir / name).stat().st_size == size
               for name, size in sizes.items())


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("wsss", "torch", "numpy", "tifffile", "openslide-python", "openslide-bin", "scikit-image",
                "shapely", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        import openslide

        out["libopenslide"] = openslide.__library_version__
    except Exception:
        pass
    return out


def check_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable, or raise WsssError naming it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WsssError(f"output directory {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe_writable(out_dir)
    except OSError as e:
        raise WsssError(f"output directory {out_dir} cannot be written: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------
# One slide
# --------------------------------------------------------------------------------------
def run_slide(slide, model: SlideModel, out_dir, options: Optional[RunOptions] = None, *,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> SlideResult:
    """Segment one slide into ``out_dir`` (see wsss.runner.writers for the files).

    Raises WsssError subclasses for expected mistakes (bad slide, bad options).
    """
    with _gil_switch_interval(model):
        phases = _slide_phases(slide, model, out_dir, options, log)
        result = _advance(phases)  # the tile stage
        return result if result is not None else _advance(phases)  # the outputs


# NB: the runner's threads (readers, band writer, pyramid, outlines, label TIFF) each hold the GIL
# briefly between native calls.  A thread that gives it up for a native call waits, to take it
# back, until the holder's switch interval (CPython's default: 5 ms) runs out, so with a dozen
# threads each short step can cost up to 5 ms (H100 host, 16 cores: reads took 4.4 ms of worker
# time per tile, 8 readers 8.1 ms).  The runner shortens the interval while it runs and restores
# it afterwards: on that machine the tile stage went from +30% over the model alone to +13%.
# Only for models on CUDA: on this 2-core CPU machine an A/B (2048^2, demo model) was within
# its noise, and CPU runs keep the interpreter's setting.  WSSS_SWITCH_INTERVAL (seconds; 0:
# leave it alone) overrides the value.
SWITCH_INTERVAL_S = _env_number("WSSS_SWITCH_INTERVAL", 0.001, float)
_switch_lock = threading.Lock()
_switch_state = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _gil_switch_interval(model: SlideModel):
    """sys.setswitchinterval(SWITCH_INTERVAL_S) while any run of a CUDA model is inside (nested
    or on several threads: the first in sets it, the last out restores the caller's value)."""
    if SWITCH_INTERVAL_S <= 0 or not model.on_cuda:
        yield
        return
    with _switch_lock:
        if _switch_state["depth"] == 0:
            _switch_state["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        _switch_state["depth"] += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_state["depth"] -= 1
            if _switch_state["depth"] == 0:
                sys.setswitchinterval(_switch_state["saved"])


def _advance(phases) -> Optional[SlideResult]:
    """Run a slide's phases to the next pause: None after the tile stage, else its result."""
    try:
        next(phases)
    except StopIteration as stop:
        return stop.value
    return None


_preload: Optional[threading.Thread] = None
_tissue_libraries = threading.Event()  # set once the preload thread has imported scikit-image


def preload_slide_libraries() -> None:
    """Import, on a daemon thread, the libraries a slide's stages import on first use: tissue
    detection's (scikit-image), then the outputs' (polygons, pictures).  ``wsss-infer`` calls it
    before it loads the bundle.  Otherwise the first slide of a process pays them: scikit-image's
    filters and morphology ~0.28 s in its tissue stage (the real slide's whole run 1.39 s on this
    VM), the outputs' ~0.25 s after its last tile (while the outline joins used
    scipy.sparse.csgraph; they no longer do); imported during the tile stage they would hold
    the GIL against the model's thread (3072^2 demo bench: tile stage +0.4 s).

    NB: a slide's run first waits for scikit-image (``_preloaded``): imported on two threads at
    once, its lazily loaded submodules can be seen half initialised ("partially initialized
    module 'skimage.morphology' has no attribute 'closing'", in 1 of 10-20 runs of a tiny slide
    that opened at once).  The other libraries load eagerly, and Python's per-module import
    locks make a second importer wait for the first: they need no wait (and waiting for them
    cost the first slide ~0.1 s where the bundle loaded fast)."""
    global _preload
    if _preload is not None:
        return

    def work() -> None:
        try:
            with contextlib.suppress(Exception):  # (a failed import fails where it is needed)
                import skimage.filters  # noqa: F401
                import skimage.morphology  # noqa: F401
        finally:
            _tissue_libraries.set()
        with contextlib.suppress(Exception):
            import contourpy  # noqa: F401
            import PIL.PngImagePlugin  # noqa: F401
            import shapely  # noqa: F401

    _preload = threading.Thread(target=work, name="wsss-imports", daemon=True)
    _preload.start()


def _preloaded() -> None:
    """Wait for ``preload_slide_libraries``' import of scikit-image, if it was started."""
    if _preload is not None:
        _tissue_libraries.wait()


def _slide_phases(slide, model: SlideModel, out_dir, options: Optional[RunOptions], log: Callable[[str], None]):
    """``run_slide`` as a generator that pauses once, after the tile stage (the model is free
    from there on), and returns the SlideResult; one that is skipped or fails never pauses.

    NB: whoever resumes it may be another thread (``run_slides`` writes one slide's outputs
    in the background while the next slide's tiles run); every resource it opens is released
    by its own finally blocks, wherever it ends.
    """
    run = _SlideRun(slide, model, out_dir, options, log)
    run.open()
    try:
        skipped = run.check()
        if skipped is not None:
            return skipped
        run.plan_tiles()
        run.make_work_folder()
        try:
            run.start_outputs()
            run.run_tiles()
            paused = time.perf_counter()
            yield  # the tile stage is done; the outputs follow (maybe on another thread, later)
            waited = time.perf_counter() - paused
            if waited > 1e-3:
                run.timer.add("outputs (waiting for the slide before)", waited)
            result = run.write_outputs()
        except BaseException:
            run.clean_up_work(failing=True)  # (the run's own error is the one to report)
            raise
        run.clean_up_work()
        return result
    except BaseException:
        run.remove_created_folder()
        raise
    finally:
        run.close()


class _SlideRun:
    """One slide through the runner, phase by phase (``_slide_phases`` drives them):

    - ``open`` the slide; ``check`` the output folder (and ``--resume``);
    - ``plan_tiles``: the scale, the grid, the tissue and the tiles that run;
    - ``make_work_folder``, ``start_outputs``: the work folder, the label spool, and what is
      written during the tile stage (the QC picture, the overlay, and on the early path the
      pyramid, the outlines and the label TIFF);
    - ``run_tiles``: the tile stage;
    - ``write_outputs``: the rest of the outputs and run.json, published at once;
    - ``clean_up_work``, ``close``: whatever ends the run.

    ``state`` holds what the tile stage leaves for the outputs (and the cleanup)."""

    def __init__(self, slide, model: SlideModel, out_dir, options: Optional[RunOptions],
                 log: Callable[[str], None]) -> None:
        self.options = options = (options or RunOptions()).for_model(model)
        self.model, self.log = model, log
        self.slide = Path(slide)
        self.out_dir = Path(out_dir)
        self.timer = _StageTimer()
        self.t_start = time.perf_counter()
        self.tile = int(options.tile_size or model.tile_size)
        self.overlap = int(options.overlap if options.overlap is not None else self.tile // 8)
        if options.output_tile % 16 or options.output_tile < 16:
            raise WsssError(f"output tile size must be a positive multiple of 16, got {options.output_tile}")
        if not 0.0 <= options.min_tissue < 1.0:
            raise WsssError(f"--min-tissue must be in [0, 1), got {options.min_tissue}")
        if options.batch_size < 1:
            raise WsssError(f"--batch-size must be at least 1, got {options.batch_size}")
        if options.stitch_device not in ("auto", "cpu", "model"):
            raise WsssError(f"--stitch-device must be auto, cpu or model, got {options.stitch_device!r}")
        self.bg = int(model.background_index)
        self.reader = None
        self.lock: Optional[int] = None  # (a descriptor holding the output folder's lock)
        self.views: List = []
        self.created = False
        self.work: Optional[Path] = None
        self.spools: list = []
        self.state: dict = {}

    # -- before the tiles -----------------------------------------------------------------------
    def open(self) -> None:
        from wsss.slide import open_slide

        t0 = time.perf_counter()
        _preloaded()
        waited = time.perf_counter() - t0
        if waited > 1e-3:  # (the first slide of a process, when the imports were late)
            self.timer.add("imports (waiting)", waited)
        with self.timer("open"):
            self.reader = open_slide(self.slide, reader=self.options.reader, mpp=self.options.mpp)
        self.created = not self.out_dir.exists()

    def check(self) -> Optional[SlideResult]:
        """The output folder checked and swept of an interrupted run's temporaries; a
        SlideResult when ``--resume`` finds this run's outputs there already."""
        from wsss.runner import writers

        slide, out_dir, options, reader = self.slide, self.out_dir, self.options, self.reader
        check_output_dir(out_dir)
        # NB: two runs publishing into one folder at once could leave one's run.json beside the
        # other's labels (seen with a delay injected into publishing); the lock is the folder's
        # own (no lock file), held until this slide ends
        self.lock = lock_output_folder(out_dir)
        stale = writers.remove_stale_temporaries(out_dir)
        if stale:
            self.log(f"{slide.name}: removed {stale} temporary file(s) an interrupted earlier run left in {out_dir}")
        self.fp = fingerprint(slide, self.model, options, {"tile_size": self.tile, "overlap": self.overlap,
                                                           "reader": reader.kind, "mpp": reader.mpp})
        if options.resume and _is_complete(out_dir, self.fp):
            return SlideResult(str(slide), str(out_dir), "skipped", "outputs match the same model and options")
        # NB: an earlier run's outputs stay as they are until this run has written all of its
        # own (in its work folder): a rerun that fails loses nothing (see _publish)
        return None

    def plan_tiles(self) -> None:
        """The output grid at the model's scale, the tissue, the tiles that run."""
        from wsss.runner import writers
        from wsss.runner.thumbnail import TileThumbnail
        from wsss.runner.tiling import TileGrid
        from wsss.slide import SlideView, detect_tissue, full_tissue_mask, load_tissue_mask, plan_scale
        from wsss.slide.tissue import detection_factor

        model, options, reader, tile = self.model, self.options, self.reader, self.tile
        if options.workers > 0 and reader_processes(model.device):
            from wsss.runner import reading

            reading.reserve(options.workers)  # (they start while the tissue is found)
        plan = self.plan = plan_scale(reader, model.mpp if model.mpp is not None else reader.mpp,
                                      tolerance=options.mpp_tolerance)
        view = self.view = SlideView(reader, plan)
        grid = self.grid = TileGrid(plan.width, plan.height, tile, self.overlap)

        # the overlay's thumbnail: the slide at the label pyramid's overview level
        self.sizes = writers.level_sizes(plan.width, plan.height, options.output_tile)
        self.overview = writers.overview_level(self.sizes)  # (the level the overlay shows)
        self.overview_factor = plan.width / self.sizes[self.overview][0]
        self.overview_thumb = self.qc_thumb = None
        with self.timer("tissue"):
            if options.tissue == "auto":
                # NB: one read of the slide for both pictures: whichever is finer is read, the
                # other resized from it (a slide without a pyramid is decoded whole per read)
                if self.overview_factor < detection_factor(view):
                    self.overview_thumb = view.read_downsampled(self.overview_factor, workers=options.workers)
                tissue, self.qc_thumb = detect_tissue(view, finer=[self.overview_thumb], workers=options.workers)
            elif options.tissue == "none":
                tissue = full_tissue_mask(plan.width * plan.mpp, plan.height * plan.mpp)
            else:
                tissue = load_tissue_mask(options.tissue, slide_width_um=plan.width * plan.mpp,
                                          slide_height_um=plan.height * plan.mpp)
            self.tissue = tissue
            tissue_area = _TissueIntegral(tissue)
            grid.select(lambda x, y: tissue_area.fraction(x, y, tile, tile, plan.mpp) > options.min_tissue)
        # the mask the stitchers gate with (None: every pixel is tissue)
        self.gate_mask = tissue if options.tissue != "none" else None
        # No thumbnail read yet, every tile runs, and a thumbnail read would decode the tiles'
        # level again (no coarser level: a flat TIFF): the reader threads sum the overview
        # picture from the tiles instead (~0.13 ms per tile against ~1 ms to decode it again).
        self.tile_thumb = None
        if self.overview_thumb is None and self.qc_thumb is None and len(grid.tiles) == grid.total \
                and view.thumbnail_level(self.overview_factor) <= plan.level:
            self.tile_thumb = TileThumbnail(plan.width, plan.height, 2 ** self.overview, grid.xs, grid.ys)
        resampled = ("" if not plan.resampled else f", downsampled x{plan.scale:.3g}" if plan.scale > 1
                     else f", upsampled x{1 / plan.scale:.3g}")
        name = self.slide.name
        self.log(f"{name}: {plan.width}x{plan.height} px at {plan.mpp:.4g} um/px (level {plan.level}{resampled}), "
                 f"{len(grid.tiles)}/{grid.total} tiles with tissue ({100 * tissue.fraction():.1f}% tissue)")
        if not grid.tiles and grid.total and tissue.fraction() > 0:  # (tissue, but under --min-tissue in every tile)
            self.log(f"{name}: warning: no tile has more than {100 * self.options.min_tissue:g}% tissue "
                     f"(--min-tissue {self.options.min_tissue:g}), every pixel will be background")
        elif not grid.tiles:
            grey = (self.qc_thumb is not None and tissue.source == "otsu-saturation"
                    and not np.ptp(self.qc_thumb, axis=2).any())  # every pixel R = G = B
            why = " (the slide has no colour: detection looks for stained tissue)" if grey else ""
            if tissue.source == "otsu-saturation":
                hint = ("see tissue_qc.png; --no-tissue-detection runs every tile, --tissue-mask takes a mask of "
                        "your own")
            else:  # (a user's mask that marks nothing)
                hint = f"the tissue mask {Path(str(self.options.tissue)).name} marks none of the slide"
            self.log(f"{name}: warning: no tissue found{why}, every pixel will be background ({hint})")

    def make_work_folder(self) -> None:
        from wsss.runner import writers

        self.work = Path(tempfile.mkdtemp(prefix=f".work.{writers.temp_tag()}.", suffix=".tmp", dir=self.out_dir))
        self.stage = self.work / "outputs"  # (published into out_dir when every file is written)
        self.stage.mkdir()

    def start_outputs(self) -> None:
        """The label spool, and what is written during the tile stage: the tissue QC picture,
        the overlay (row by row)."""
        from wsss.runner import writers
        from wsss.runner.stitching import TileSpool
        from wsss.runner.tiling import weight_window

        options, plan, state = self.options, self.plan, self.state
        self.label_spool = TileSpool(str(self.work / "labels.spool"), options.output_tile, plan.width, plan.height,
                                     np.uint8, fill=self.bg)
        self.spools.append(self.label_spool)
        self.window = weight_window(self.tile, self.overlap)
        self.finalize = _make_finalize(self.gate_mask, plan.mpp, self.bg)
        self.early_pyramid = options.early_pyramid
        if self.early_pyramid is None:
            self.early_pyramid = self.model.on_cuda

        # NB: the tissue QC picture needs no labels, so it is written on a thread during the
        # tile stage, not after it (0.84 s of an H100 run's tail at 32768^2, behind the tail's
        # other threads): at once with a thumbnail read for tissue detection, else once the
        # readers have summed the overview from the last tile
        state["qc_pool"] = ThreadPoolExecutor(1, thread_name_prefix="wsss-qc")
        tile_thumb = self.tile_thumb
        if self.qc_thumb is not None:
            state["qc"] = state["qc_pool"].submit(self._write_qc, self.qc_thumb)
        elif tile_thumb is not None:
            tile_thumb.on_complete = lambda: state.__setitem__("qc", state["qc_pool"].submit(self._write_qc,
                                                                                              tile_thumb.image()))
        # the overlay is encoded row by row as the overview level's labels and the thumbnail's
        # rows arrive (the labels from the pyramid, during the tiles on the early path); a
        # thumbnail neither read for tissue detection nor summed from the tiles is read at the end
        overlay = state["overlay"] = writers.OverlayWriter(self.stage / "overlay.png", *self.sizes[self.overview],
                                                           self.model.palette, self.bg,
                                                           class_names=self.model.class_names)
        if tile_thumb is not None:
            overlay.watch_thumbnail(tile_thumb)
            tile_thumb.on_rows = overlay.thumbnail_rows
        elif self.overview_thumb is not None or self.qc_thumb is not None:
            overlay.set_thumbnail(self.view.thumbnail(self.overview_factor, finer=[self.overview_thumb, self.qc_thumb]))

    def _write_qc(self, picture: np.ndarray) -> None:
        from wsss.runner import writers

        plan = self.plan
        with self.timer("write_qc"), _writing(self.out_dir / "tissue_qc.png"):
            shape = picture.shape[:2]
            writers.write_tissue_qc(self.stage / "tissue_qc.png", picture, _mask_at(self.tissue, plan, shape),
                                    _tiles_footprint(self.grid, self.tile, plan, shape))

    def _polygon_outlines(self, levels, K: int, threads: Optional[int] = None, processes: int = 0) -> "_Outlines":
        """The GeoJSON's outline builder, on the polygon level of the label pyramid."""
        from wsss.runner import writers
        from wsss.runner.outlines import OutlineBuilder

        plan = self.plan
        level = writers.polygon_level(levels, plan.mpp)
        poly = levels[level]
        # NB: a level-L label pixel covers 2^L grid pixels (the last one of a row only
        # partly): 2^L, not the ratio of the rounded-up level widths
        poly_mpp = plan.mpp * 2 ** level
        scale = poly_mpp / self.reader.mpp  # -> level-0 px of the input slide
        builder = OutlineBuilder(
            poly.width, poly.height, [k for k in range(K) if k != self.bg], scale=scale,
            extent=writers.geojson_extent(self.reader.dimensions, scale), threads=threads, processes=processes,
            output="geojson",
            min_area_px=max(1, int(round(self.options.min_polygon_um2 / poly_mpp ** 2))))
        return _Outlines(level, builder)

    # -- the tile stage -------------------------------------------------------------------------
    def _make_stitcher(self, K: int, device=None):
        """K is only known after the first prediction: the stitcher is made then (``_run_tiles``)."""
        from wsss.runner.band_stitching import BandStitcher
        from wsss.runner.stitching import Stitcher

        plan, grid, timer = self.plan, self.grid, self.timer
        if device is None:
            stitcher = Stitcher(plan.width, plan.height, self.tile, grid.xs, grid.ys, grid.tiles, self.window, K,
                                self.finalize, labels_out=None, background_index=self.bg)  # type: ignore[arg-type]
        else:
            stitcher = BandStitcher(plan.width, plan.height, self.tile, grid.tiles, self.window, K, device,
                                    tissue=self.gate_mask, grid_mpp=plan.mpp, background_index=self.bg,
                                    timer=lambda s: timer.add("stitch (band writer)", s),
                                    wait_timer=lambda s: timer.add("stitch (device, writer queue full)", s))
        try:
            return self._attach_outputs(stitcher)
        except BaseException:  # NB: the band stitcher's writer thread is already running
            stitcher.finish(raise_errors=False)
            raise

    def _attach_outputs(self, stitcher):
        from wsss.runner import writers
        from wsss.runner.stitching import OutputTiles, TileSpool

        options, plan, state, model = self.options, self.plan, self.state, self.model
        T = options.output_tile
        expected = stitcher.covered_pixels_per_output_tile(T)
        stitcher.labels_out = OutputTiles(self.label_spool, expected)
        if self.early_pyramid:
            # NB: one thread keeps pace: each level-0 tile row is read once and voted up
            # through every level (~1 ms per level-0 megapixel here against ~15 for the
            # reference networks on an H200)
            pyramid = state["pyramid"] = writers.LabelPyramid(self.label_spool, self.work, fill=self.bg,
                                                              expected=expected)
            state["pyramid_during_tiles"] = True
            self.spools.extend(pyramid.levels[1:])
            stitcher.labels_out.on_stored = pyramid.tiles_stored
            # the GeoJSON's outlines too: slab by slab as the polygon level's rows are made,
            # in worker processes (see OUTLINE_PROCESSES)
            outlines = state["outlines"] = self._polygon_outlines(pyramid.levels, stitcher.num_classes, threads=2,
                                                                  processes=OUTLINE_PROCESSES)
            pyramid.watch_rows(outlines.level, outlines.builder.add)
            pyramid.watch_rows(self.overview, state["overlay"].add_labels)
            # ... and the label TIFF, each tile row once it is final
            writer = state["tiff_writer"] = ThreadPoolExecutor(1, thread_name_prefix="wsss-labels")
            state["labels_tiff"] = writer.submit(
                writers.write_label_tiff, self.stage / "labels.tiff", pyramid.levels, mpp=plan.mpp,
                palette=model.palette, background_index=self.bg, tiles=pyramid.iter_final_compressed,
                class_names=_class_names(model, stitcher.num_classes))
        if options.write_probs:
            ps = TileSpool(str(self.work / "probs.spool"), T, plan.width, plan.height, np.float16,
                           channels=stitcher.num_classes, fill=0)
            self.spools.append(ps)
            state["probs_spool"] = ps
            stitcher.probs_out = OutputTiles(ps, expected)
        return stitcher

    def run_tiles(self) -> None:
        options, state = self.options, self.state
        with self.timer("tiles"):
            stitcher = _run_tiles(self.view, self.grid, self.model, options, self.timer, self._make_stitcher,
                                  self.views, state, self.slide, thumbnail=self.tile_thumb,
                                  mask_rows=None if self.gate_mask is None else self.gate_mask.mask.shape[0])
        if "batch_limit" in state:
            n = state["batch_limit"]
            self.log(f"{self.slide.name}: warning: the GPU ran out of memory with batches of {options.batch_size} "
                     f"tiles; the slide ran in batches of {n} (--batch-size {n} saves the failed attempts)")
        if stitcher is None:  # no tissue tile at all
            self.class_pixels = np.zeros(256, np.int64)
            self.K = len(self.model.class_names)
        else:
            self.class_pixels = stitcher.class_pixels.copy()
            self.K = stitcher.num_classes
            state["peak_pieces"] = stitcher.peak_pieces
            state["peak_piece_mb"] = stitcher.peak_piece_bytes / 2**20
        # NB: a device stitcher's accumulator must not outlive the tile stage (none kept here)

    # -- after the tiles ------------------------------------------------------------------------
    def write_outputs(self) -> SlideResult:
        """Every output (what is left of those begun during the tiles) into the work folder,
        then published into the output folder with run.json."""
        from wsss.runner import writers

        options, plan, state, model, timer = self.options, self.plan, self.state, self.model, self.timer
        out_dir, stage, bg, K = self.out_dir, self.stage, self.bg, self.K
        class_pixels = self.class_pixels
        covered = int(class_pixels.sum())
        class_pixels[bg] += plan.width * plan.height - covered  # tiles never run: background
        names = _class_names(model, K)

        with timer("pyramid"):  # (what is left of it, when built during the tile stage)
            if "pyramid" not in state:
                pyramid = state["pyramid"] = writers.LabelPyramid(self.label_spool, self.work, fill=bg)
                self.spools.extend(pyramid.levels[1:])
                outlines = state["outlines"] = self._polygon_outlines(pyramid.levels, K, threads=options.workers)
                # NB: the polygon and overview levels' rows are kept (<= 2048^2 and 1024^2 bytes)
                # and traced / encoded beside each other, not while the pyramid is built: on 2
                # cores that overlap made the CPU path's tail longer (the pyramid 0.02 -> 0.06
                # s, the GeoJSON no shorter)
                state["polygon_rows"], state["overview_rows"] = [], []
                pyramid.watch_rows(outlines.level, state["polygon_rows"].append)
                pyramid.watch_rows(self.overview, state["overview_rows"].append)
            levels = state["pyramid"].finish()
        # NB: the GeoJSON and the label TIFF (what is left of them, when begun during the tile
        # stage; contourpy, GEOS, zlib and file writes release the GIL) run on threads of their
        # own while the pictures are made; leaving this block waits for them, so the spools
        # they read are closed only after they end, however the block ends.
        with timer("outputs"), ThreadPoolExecutor(2, thread_name_prefix="wsss-outputs") as side:
            def polygons() -> int:
                with timer("write_geojson"), _writing(out_dir / "polygons.geojson"):
                    if "polygon_rows" in state:  # (else traced as the pyramid made the rows: the last slabs are left)
                        state["outlines"].builder.add(np.concatenate(state.pop("polygon_rows")))
                    geoms = state["outlines"].builder.finish()
                    for part, seconds in state["outlines"].builder.timings.items():
                        timer.add(f"write_geojson ({part})", seconds)
                    return writers.write_geojson_features(stage / "polygons.geojson", geoms,
                                                          class_names=names[:K], palette=model.palette)

            def labels_tiff() -> None:
                with timer("write_labels"), _writing(out_dir / "labels.tiff"):
                    if "labels_tiff" in state:
                        state["labels_tiff"].result()
                    else:
                        writers.write_label_tiff(stage / "labels.tiff", levels, mpp=plan.mpp, palette=model.palette,
                                                 background_index=bg, class_names=names)
                    if options.write_probs and "probs_spool" in state:
                        with _writing(out_dir / "probs.tiff"):
                            writers.write_probs_tiff(stage / "probs.tiff", state["probs_spool"], mpp=plan.mpp,
                                                     class_names=names[:K])

            n_features = side.submit(polygons)
            labels_done = side.submit(labels_tiff)
            with timer("write_areas"), _writing(out_dir / "areas.json"):
                areas = writers.class_areas(class_pixels, mpp=plan.mpp, class_names=names[:K], background_index=bg,
                                            palette=model.palette)
                writers.write_areas(stage / "areas.json", stage / "areas.csv", areas)
            # NB: pictures and polygons come from low-resolution levels of the label pyramid
            # (majority vote), so their cost is bounded on any slide (see writers.*_level).
            with timer("write_overlay"), _writing(out_dir / "overlay.png"):
                overlay = state["overlay"]
                state["thumbnail_from_tiles"] = self.tile_thumb is not None
                if self.tile_thumb is None and self.overview_thumb is None and self.qc_thumb is None:
                    thumb = self.view.thumbnail(self.overview_factor, workers=options.workers)
                    state["qc"] = state["qc_pool"].submit(self._write_qc, thumb)  # (beside the overlay)
                    overlay.set_thumbnail(thumb)
                if "overview_rows" in state:  # (else encoded as the pyramid made the rows: the last are left)
                    overlay.add_labels(np.concatenate(state.pop("overview_rows")))
                overlay.finish()
            state["qc"].result()
            labels_done.result()
            n_features = n_features.result()

        outputs = list(OUTPUT_FILES) + (["probs.tiff"] if options.write_probs and "probs_spool" in state else [])
        if options.write_probs and "probs_spool" not in state:
            self.log(f"{self.slide.name}: no tile ran (no tissue): --probs writes no probs.tiff")
        timings = dict(timer.seconds)
        timings["total"] = time.perf_counter() - self.t_start
        _publish(stage, out_dir, outputs, self._run_info(timings, outputs, areas, n_features))
        return SlideResult(str(self.slide), str(out_dir), "done",
                           outputs={n: str(out_dir / n) for n in outputs + ["run.json"]}, timings=timings, areas=areas)

    def _run_info(self, timings: dict, outputs: List[str], areas, n_features: int) -> dict:
        options, plan, state, model, grid = self.options, self.plan, self.state, self.model, self.grid
        tissue, tile, n_tiles = self.tissue, self.tile, len(self.grid.tiles)
        return {
            "status": "complete", "format_version": RUN_FORMAT_VERSION, "fingerprint": self.fp,
            "slide": {**self.reader.describe(), **_slide_identity(self.slide)},
            "model": {"identity": model.identity, "mpp": model.mpp, "tile_size": model.tile_size,
                      "class_names": list(model.class_names), "background_index": self.bg, **model.description},
            "options": {**asdict(options), "tile_size": tile, "overlap": self.overlap},
            "scale": plan.to_dict(),
            "tissue": {"source": tissue.source, "fraction": tissue.fraction(), "threshold": tissue.threshold,
                       "mask_shape": list(tissue.mask.shape)},
            "tiles": {"run": n_tiles, "grid": grid.total, "stitch_device": state.get("stitch_device"),
                      "readers": state.get("readers"),
                      "pyramid_during_tiles": state.get("pyramid_during_tiles", False),
                      "thumbnail_from_tiles": state.get("thumbnail_from_tiles", False),
                      "peak_live_pieces": state.get("peak_pieces", 0),
                      "peak_piece_mb": state.get("peak_piece_mb", 0.0), "heap_trims": state.get("heap_trims", 0),
                      "batch_size_run": state.get("batch_limit", options.batch_size)},
            "throughput": {"megapixels_per_second": n_tiles * tile * tile / 1e6 / max(timings.get("tiles", 0), 1e-9),
                           "tiles_per_second": n_tiles / max(timings.get("tiles", 0), 1e-9)},
            "geojson_features": n_features,
            "areas": areas,
            "versions": _versions(),
            "timings_s": timings,
            "output_sizes": {name: (self.stage / name).stat().st_size for name in outputs},
        }

    # -- whatever ends the run ------------------------------------------------------------------
    def clean_up_work(self, failing: bool = False) -> None:
        """Everything in the work folder stopped and closed, then the folder removed.

        NB: every step runs whatever the others did: a full disk makes the overlay's close fail,
        and the pyramid, the label TIFF's thread and the spools must still end (the thread kept
        the process from exiting, the spools held the disk space).  Errors here never replace a
        failing run's own; after a finished one (its outputs already published) they are
        logged."""
        state = self.state
        steps = []
        if "qc_pool" in state:
            steps.append(("the QC picture", lambda: state["qc_pool"].shutdown(wait=True)))  # (it writes here)
        if "overlay" in state:
            steps.append(("the overlay", state["overlay"].close))
        if "pyramid" in state:
            steps.append(("the label pyramid", state["pyramid"].close))  # NB: waits for rows in flight
        if "outlines" in state:
            steps.append(("the outlines", state["outlines"].builder.close))
        if "tiff_writer" in state:  # (the closed pyramid ends an unfinished file)
            steps.append(("the label TIFF", lambda: state["tiff_writer"].shutdown(wait=True)))
        steps += [(f"spool {Path(s.path).name}", s.close) for s in self.spools]
        try:
            for what, step in steps:
                try:
                    step()
                except Exception as e:  # noqa: BLE001  (the next steps still run)
                    if not failing:
                        self.log(f"{self.slide.name}: warning: cleaning up {what}: {type(e).__name__}: {e}")
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def remove_created_folder(self) -> None:
        """A folder this run made and left empty goes too."""
        if self.created:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()

    def close(self) -> None:
        for v in self.views:
            with contextlib.suppress(Exception):
                v.close()
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
        self.reader.close()


@dataclass
class _Outlines:
    level: int  # of the label pyramid
    builder: object  # wsss.runner.outlines.OutlineBuilder (fed the level's rows, in order)


@contextlib.contextmanager
def _writing(path: Path):
    """An OSError writing an output (a full disk, a file size limit) names the output."""
    try:
        yield
    except OSError as e:
        raise WsssError(f"{path}: cannot be written: {e.strerror or e}") from e


def _publish(stage: Path, out_dir: Path, outputs: List[str], run_info: dict) -> None:
    """Move a run's finished files from its work folder into ``out_dir``, then write run.json.

    NB: until here an earlier run's outputs (and its run.json) are untouched, so a rerun that
    fails (bad slide, a kill, a full disk) loses nothing and leaves no mix of old and new files;
    from the first move on the folder no longer claims completeness (run.json goes first) until
    the new run.json is written last.  Outputs of the earlier run that this one does not write
    (probs.tiff without --probs) are removed, so nothing stale sits beside the new run.json."""
    from wsss.runner import writers

    with contextlib.suppress(FileNotFoundError):
        (out_dir / "run.json").unlink()
    for name in (*OUTPUT_FILES, *OPTIONAL_OUTPUT_FILES):
        if name in outputs:
            os.replace(stage / name, out_dir / name)
        else:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
    writers.write_json_atomic(out_dir / "run.json", run_info)


def _class_names(model: SlideModel, K: int) -> List[str]:
    names = [str(n) for n in model.class_names]
    while len(names) < max(K, model.background_index + 1 if model.background_index < 256 else 0):
        names.append("background" if len(names) == model.background_index else f"class{len(names)}")
    return names


class _TissueIntegral:
    """Tissue fraction of any grid rectangle from a summed-area table of the mask."""

    def __init__(self, tissue) -> None:
        self.t = tissue
        m = tissue.mask.astype(np.int64)
        self.sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
        self.sat[1:, 1:] = m.cumsum(0).cumsum(1)

    def fraction(self, x: int, y: int, w: int, h: int, grid_mpp: float) -> float:
        mh, mw = self.t.mask.shape
        # every mask pixel whose area meets the rectangle
        r0 = min(mh, max(0, int(math.floor(y * grid_mpp / self.t.mpp_y))))
        r1 = min(mh, max(r0 + 1, int(math.ceil((y + h) * grid_mpp / self.t.mpp_y))))
        c0 = min(mw, max(0, int(math.floor(x * grid_mpp / self.t.mpp_x))))
        c1 = min(mw, max(c0 + 1, int(math.ceil((x + w) * grid_mpp / self.t.mpp_x))))
        if r0 >= mh or c0 >= mw:
            return 0.0
        s = self.sat[r1, c1] - self.sat[r0, c1] - self.sat[r1, c0] + self.sat[r0, c0]
        return float(s) / max(1, (r1 - r0) * (c1 - c0))


def _make_finalize(tissue, grid_mpp: float, background_index: int):
    """Piece finaliser: blended probabilities [K,h,w] -> labels via the fused gate+argmax op."""
    import torch

    from wsss.ops import gate_argmax

    ones_cache: Dict[int, "torch.Tensor"] = {}

    def finalize(x: int, y: int, probs: np.ndarray) -> np.ndarray:
        K, h, w = probs.shape
        ones = ones_cache.get(K)
        if ones is None:
            ones = ones_cache[K] = torch.ones(1, K, dtype=torch.float32)
        mask = None
        if tissue is not None:
            mask = torch.from_numpy(np.ascontiguousarray(tissue.region(x, y, w, h, grid_mpp)))[None]
        scores = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))[None]
        return gate_argmax(scores, ones, 0.0, mask, background_index)[0].numpy()

    return finalize


def _mask_at(tissue, plan, shape) -> np.ndarray:
    """bool [h, w]: the tissue mask over a picture of the whole slide of ``shape``, each axis at
    its own pitch (a picture built from tiles rounds each side up on its own)."""
    h, w = shape
    return tissue.region(0, 0, w, h, plan.mpp * plan.height / h, plan.mpp * plan.width / w)


def _tiles_footprint(grid, tile: int, plan, shape) -> np.ndarray:
    """bool [h, w]: the picture's pixels that some tile of the grid covers, one tile row at a
    time (NB: not a Python loop per tile, which stalled for 1 s over 16641 tiles behind the
    tail's busy threads on a GPU host, nor a 2-D difference array, 3x slower on small grids)."""
    h, w = shape
    fy, fx = h / plan.height, w / plan.width
    m = np.zeros((h, w), bool)
    if not grid.tiles:
        return m
    xy = np.asarray(grid.tiles, np.int64)
    for y in np.unique(xy[:, 1]):
        xs = xy[xy[:, 1] == y, 0]
        edges = np.zeros(w + 1, np.int32)
        np.add.at(edges, (xs * fx).astype(np.int64), 1)
        np.add.at(edges, np.minimum(np.ceil((xs + tile) * fx).astype(np.int64), w), -1)
        m[int(y * fy):int(math.ceil((y + tile) * fy))] |= np.cumsum(edges[:w]) > 0
    return m


# --------------------------------------------------------------------------------------
# Many slides
# --------------------------------------------------------------------------------------
def run_slides(slides: Sequence, model: SlideModel, out_dirs: Sequence, options: Optional[RunOptions] = None, *,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> List[SlideResult]:
    """Run each slide into its out_dir; a failing slide is reported and skipped, the others finish.

    With background outputs (``RunOptions.background_outputs``, the default) a slide's outputs
    (pyramid, TIFF, pictures, polygons, run.json) are written on a second thread while the next
    slide's tiles run, at most one slide behind: the model never waits for the CPU-only tail of
    the slide before.  Results and log lines keep the order of
    ``slides``.  Two slides with one output folder, or a folder count other than the slides', are
    a WsssError before any work.
    """
    with _gil_switch_interval(model):
        return _run_slides(slides, model, out_dirs, options, log)


def _run_slides(slides: Sequence, model: SlideModel, out_dirs: Sequence, options: Optional[RunOptions],
                log: Callable[[str], None]) -> List[SlideResult]:
    options = options or RunOptions()
    if len(out_dirs) != len(slides):
        raise WsssError(f"run_slides: {len(slides)} slides and {len(out_dirs)} output folders; give one folder per slide")
    check_distinct_out_dirs(slides, out_dirs)
    background = options.background_outputs
    results: List[Optional[SlideResult]] = [None] * len(slides)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsss-outputs") \
        if background and len(slides) > 1 else None
    behind = None  # (index, future) of the slide whose outputs are being written
    reported = 0

    def report_done() -> None:  # log results in input order as soon as they are known
        nonlocal reported
        while reported < len(results) and results[reported] is not None:
            _log_result(results[reported], log)
            reported += 1

    try:
        for i, (slide, out_dir) in enumerate(zip(slides, out_dirs)):
            phases = _slide_phases(slide, model, out_dir, options, log)
            results[i] = _attempt(slide, out_dir, _advance, phases)  # the tile stage (None: paused)
            if results[i] is None and pool is None:
                results[i] = _attempt(slide, out_dir, _advance, phases)  # its outputs, here and now
            elif results[i] is None:
                if behind is not None:  # one slide behind at most
                    results[behind[0]] = behind[1].result()
                behind = (i, pool.submit(_attempt, slide, out_dir, _advance, phases))
            report_done()
        if behind is not None:
            results[behind[0]] = behind[1].result()
            behind = None
        report_done()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # NB: an interrupted run still finishes (or cleans up) the slide behind
    return results  # type: ignore[return-value]


def check_distinct_out_dirs(slides: Sequence, out_dirs: Sequence) -> None:
    """WsssError unless every slide has its own output folder (two runs would overwrite each
    other, and with background outputs write into it at the same time)."""
    seen: dict = {}
    for slide, out_dir in zip(slides, out_dirs):
        key = Path(out_dir).resolve()
        if key in seen:
            raise WsssError(f"slides {seen[key]} and {slide} would write to the same folder {out_dir}; run them "
                            f"with separate -o folders (e.g. one per case folder)")
        seen[key] = slide


def _attempt(slide, out_dir, fn, *args) -> Optional[SlideResult]:
    """fn(*args), with an error turned into a failed SlideResult for that slide."""
    try:
        return fn(*args)
    except Exception as e:  # NB: one broken slide must not lose the others' results
        message = str(e) if isinstance(e, WsssError) else f"{type(e).__name__}: {e}"
        notes = [n for n in getattr(e, "__notes__", []) if isinstance(n, str)]
        return SlideResult(str(slide), str(out_dir), "failed", "; ".join([message, *notes]))


def _log_result(res: SlideResult, log: Callable[[str], None]) -> None:
    name = Path(res.slide).name
    if res.status == "failed":
        log(f"{name}: FAILED: {res.message}")
    elif res.status == "skipped":
        log(f"{name}: skipped ({res.message})")
    else:
        t = res.timings
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "total")
        log(f"{name}: done in {t.get('total', 0):.2f}s -> {res.out_dir}  [{stages}]")

"""The tile stage of one slide: read tiles -> batch -> predict -> blend/stitch.

Stages overlap: reader threads or processes (each with its own slide handle; wsss.runner.reading)
decode tiles ahead of the model; the main thread batches, submits each batch to the model (torch
releases the GIL) and takes its result one batch later (``SlideModel.predict_async``); a
stitcher thread blends predictions, finalises labels and compresses output tiles
(wsss.runner.stitching).  Or, with blending on the model's device (the CUDA default), the
probabilities never leave it: a ``BandStitcher`` blends them on the model's stream
(wsss.runner.band_stitching).  The outputs around this stage are wsss.runner.pipeline's.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from wsss.errors import BundleError, WsssError
from wsss.runner.model import SlideModel, _BatchHalving

if TYPE_CHECKING:
    from wsss.runner.pipeline import RunOptions, _StageTimer


def _env_number(name: str, default, kind=int):
    """A tuning variable's value (docs/runner.md), or ``default`` with a warning naming it when it
    is not a number: a typo in an A/B measurement must not stop every run at import."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        import warnings

        warnings.warn(f"{name}={value!r} is not a {'whole ' if kind is int else ''}number; using {default}",
                      stacklevel=2)
        return default


# NB: on a GPU host the tiles are read in worker processes (reading.py), off this process's
# GIL, which the thread feeding the model and the band writer hold most of the time (an H200 run
# at 16384^2: 4.5 ms of reader time per tile on threads, the model waiting 2.4 of its 5.1 s);
# on the CPU the model's own threads leave the GIL free and the cores busy, and threads are
# cheaper.  WSSS_READER_PROCESSES=1 uses processes always, 0 never (for A/B measurements)
READER_PROCESSES = _env_number("WSSS_READER_PROCESSES", -1)


def _run_tiles(view, grid, model: SlideModel, options: RunOptions, timer: _StageTimer, make_stitcher, views: list,
               state: dict, slide: Path, thumbnail=None, mask_rows: Optional[int] = None):
    """Read, predict and stitch every selected tile; returns the stitcher (None if no tiles).
    thumbnail: a TileThumbnail the readers add the tiles to (see reading.read_batches); mask_rows: the
    rows of the tissue mask a device stitcher gets (None: none).

    make_stitcher(K, device): a ``Stitcher`` (device None: blend on the CPU) or a
    ``BandStitcher`` on ``device`` (blend where the model's outputs are; see
    ``_stitch_on_device``)."""
    import torch

    from wsss.runner.reading import read_batches

    if not grid.tiles:
        return None
    # NB: helper threads that touch torch get one OpenMP thread, so they never spawn a second
    # team competing with the model's.  torch.set_num_threads also stores a process-wide
    # default that a thread adopts when it first uses torch: this thread reads its own count
    # now (fixing it before any helper runs), and the caller's count is restored at the end.
    # Without this the model ran on ONE thread in the first run of a process.
    caller = threading.current_thread()
    caller_threads = torch.get_num_threads()

    def one_thread_if_helper():
        if threading.current_thread() is not caller:
            torch.set_num_threads(1)

    on_device = _stitch_on_device(model, options, grid, mask_rows)
    state["stitch_device"] = "model" if on_device else "cpu"
    # NB: the batch size that fits is found once per slide (a GPU that ran out of memory with
    # the default 32 tiles of the reference networks still finishes the slide)
    model = _BatchHalving(on_halve=lambda n: state.__setitem__("batch_limit", n)).wrap(model)
    progress = _progress(len(grid.tiles), slide.name, options.progress)
    trim_heap = _HeapTrimmer()
    processes = reader_processes(model.device)
    batches = read_batches(view, grid, options, timer, views, one_thread_if_helper, thumbnail, processes, state)
    try:
        run = _predict_and_stitch_on_device if on_device else _predict_and_stitch
        st = run(batches, grid.tile, model, options, timer, make_stitcher, progress, trim_heap, one_thread_if_helper)
    finally:
        batches.close()  # stops and joins the readers
        progress.close()
        torch.set_num_threads(caller_threads)
        state["heap_trims"] = trim_heap.trims
    if st.pending:
        raise RuntimeError(f"internal error: {st.pending} tile contributions never arrived")
    return st


def default_workers(device: str) -> int:
    """Reader threads when ``--workers`` is not given: 4 for a model on CUDA, else 2."""
    return 4 if str(device).startswith("cuda") else 2


def reader_processes(device: str) -> bool:
    """Whether the readers of a model on ``device`` hand their tiles to worker processes (see
    READER_PROCESSES)."""
    if READER_PROCESSES >= 0:
        return READER_PROCESSES > 0
    return str(device).startswith("cuda") and (os.cpu_count() or 1) >= 8


def _stitch_on_device(model: SlideModel, options: RunOptions, grid, mask_rows: Optional[int] = None) -> bool:
    """Whether to blend on the model's device (``--stitch-device``): "model" always (the model
    must offer ``predict_device``); "auto" when the model runs on CUDA and the band accumulator
    (with the tissue mask's ``mask_rows``) fits in a quarter of the free device memory; "cpu" never."""
    if options.stitch_device == "cpu":
        return False
    if model.predict_device is None:
        if options.stitch_device == "model":
            raise WsssError("--stitch-device model needs a model that can leave its outputs on its device "
                            "(a bundle: SlideModel.from_bundle); this one only returns host arrays")
        return False
    if options.stitch_device == "model":
        return True
    if not model.on_cuda:
        return False
    import torch

    from wsss.runner.band_stitching import BandStitcher

    free, _ = torch.cuda.mem_get_info(torch.device(model.device))
    return BandStitcher.device_bytes(len(model.class_names), grid.tile, grid.width, mask_rows) <= free // 4


def _check_probs_shape(shape, n: int, tile: int) -> None:
    if len(shape) != 4 or shape[0] != n or tuple(shape[2:]) != (tile, tile):
        raise BundleError(f"model returned probabilities of shape {tuple(shape)} for tiles "
                          f"[{n}, 3, {tile}, {tile}]; expected [{n}, K, {tile}, {tile}]")


def _predict_and_stitch(batches, tile: int, model: SlideModel, options: RunOptions, timer: _StageTimer, make_stitcher,
                        progress, trim_heap, one_thread_if_helper):
    """The host-blending consumer: model results (numpy) -> a stitcher thread (``Stitcher``)."""
    stitch_q: "queue.Queue" = queue.Queue(maxsize=3)
    errors: list = []
    holder: dict = {}

    stitch_threads = options.stitch_threads or (2 if model.on_cuda else 1)

    def stitch_worker():
        one_thread_if_helper()  # gate_argmax on small pieces: no OpenMP team beside the model's
        drained = False
        try:
            while True:
                item = stitch_q.get()
                if item is None:
                    drained = True
                    break
                positions, probs = item
                if "stitcher" not in holder:
                    st = holder["stitcher"] = make_stitcher(probs.shape[1], None)
                    if stitch_threads > 1:
                        st.start_emit_thread(init=one_thread_if_helper,
                                             timer=lambda s: timer.add("stitch (finalise thread)", s))
                st = holder["stitcher"]
                t0 = time.perf_counter()
                for (x, y), p in zip(positions, probs):
                    st.add(x, y, p)
                timer.add("stitch", time.perf_counter() - t0)
            if "stitcher" in holder:
                t0 = time.perf_counter()
                holder["stitcher"].finish()
                timer.add("stitch", time.perf_counter() - t0)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)
            if "stitcher" in holder:
                holder["stitcher"].finish(raise_errors=False)
            # drain so the producer never blocks
            while not drained and stitch_q.get() is not None:
                pass

    stitch_thread = threading.Thread(target=stitch_worker, name="wsss-stitch", daemon=True)
    stitch_thread.start()
    try:
        # NB: one batch behind: batch i+1 is submitted to the model before batch i's result is
        # taken, so on CUDA batch i+1's upload and compute overlap batch i's download and its
        # hand-off to the stitcher.  On the CPU (and for plain callables) predict_async has
        # finished by the time it returns, and the same loop runs with a ready result.
        in_flight = None  # (positions, PendingProbabilities, batch number) of the batch submitted last

        def take_result(positions, handle, number):
            n = len(positions)
            with timer("infer"), _naming_batch(number, positions):
                probs = handle.result()
            _check_probs_shape(probs.shape, n, tile)
            t0 = time.perf_counter()
            stitch_q.put((positions, probs))
            timer.add("stitch (waiting)", time.perf_counter() - t0)
            progress.update(n)

        for number, (positions, x) in enumerate(batches, 1):
            if errors:
                raise errors[0]
            with timer("infer"), _naming_batch(number, positions):
                handle = model.predict_async(x)
            if in_flight is not None:
                take_result(*in_flight)
            in_flight = (positions, handle, number)
            if number % 4 == 0:
                trim_heap()
        if in_flight is not None:
            take_result(*in_flight)
    finally:
        stitch_q.put(None)
        stitch_thread.join()
    if errors:
        raise errors[0]
    return holder["stitcher"]


# batches the device-blending loop queues before it waits for the oldest (see below);
# WSSS_DEVICE_BATCHES_AHEAD overrides it (A/B measurements)
DEVICE_BATCHES_AHEAD = max(1, _env_number("WSSS_DEVICE_BATCHES_AHEAD", 2))


def _predict_and_stitch_on_device(batches, tile: int, model: SlideModel, options: RunOptions, timer: _StageTimer, make_stitcher,
                                  progress, trim_heap, one_thread_if_helper):
    """The device-blending consumer: ``model.predict_device`` outputs stay on the device and a
    ``BandStitcher`` blends them there, on the same stream (no host round trip).

    NB: the main thread queues batch i (upload, model, blend) before it waits for batch
    i - DEVICE_BATCHES_AHEAD's event, so the device always has queued work while the host never
    runs more than that many batches ahead (bounded device memory for inputs and outputs).  With
    CUDA graphs the host queues a batch in ~2 ms of the device's ~34 (reference networks, batch
    32, H100): two batches ahead absorb a reader's or the band writer's hiccup that one did not."""
    import torch

    st = None
    queued: deque = deque()  # (event or None, positions, number) of the batches not waited for

    def wait(item):
        event, positions, number = item
        if event is not None:
            # NB: "infer" is the main thread's whole model time (queueing + this wait); the
            # wait alone tells a device-bound run (it grows) from a host-bound one (near 0)
            # (an asynchronous device error surfaces here: the model's or the blending queued after it)
            with timer("infer"), timer("infer (device wait)"), \
                    _naming_batch(number, positions, "the model or the blending queued with it"):
                event.synchronize()  # NB: blocking event: sleeps with the GIL released
        progress.update(len(positions))

    try:
        for number, (positions, x) in enumerate(batches, 1):
            with timer("infer"), _naming_batch(number, positions):
                probs = model.predict_device(x)
            _check_probs_shape(probs.shape, len(positions), tile)
            if st is None:
                st = make_stitcher(probs.shape[1], probs.device)
            t0 = time.perf_counter()
            st.add_batch(positions, probs)
            timer.add("stitch (device, queueing)", time.perf_counter() - t0)
            event = None
            if probs.device.type == "cuda":
                event = torch.cuda.Event(blocking=True)
                event.record(torch.cuda.current_stream(probs.device))
            queued.append((event, positions, number))
            if len(queued) > DEVICE_BATCHES_AHEAD:
                wait(queued.popleft())
            if number % 4 == 0:
                trim_heap()
        while queued:
            wait(queued.popleft())
        t0 = time.perf_counter()
        st.finish()
        timer.add("stitch (device, queueing)", time.perf_counter() - t0)
    except BaseException:
        if st is not None:
            st.finish(raise_errors=False)
        raise
    return st


@contextlib.contextmanager
def _naming_batch(number: int, positions, what: str = "the model"):
    """An error inside gets a note (shown under the traceback, its type and message unchanged)
    naming the batch and the tiles ``what`` failed on."""
    try:
        yield
    except Exception as error:
        (x0, y0), (x1, y1) = positions[0], positions[-1]
        note = (f"wsss runner: {what} failed on batch {number} ({len(positions)} tiles, at grid pixels "
                f"x={x0},y={y0} .. x={x1},y={y1})")
        if hasattr(error, "add_note"):
            error.add_note(note)
        else:  # Python 3.10: what add_note does (a failed slide's message lists the notes either way)
            error.__notes__ = [*getattr(error, "__notes__", []), note]
        raise


class _HeapTrimmer:
    """Hands freed heap pages back to the OS (glibc malloc_trim), but only when the process's RSS
    has grown ``slack_mb`` above its level at the first check (taken after a few batches, so
    it includes the model's working memory).

    NB: with several threads allocating and freeing multi-MB buffers (decoded tiles, model
    activations, piece accumulators), glibc's heaps fragment and RSS creeps up with the number
    of tiles although live memory is bounded: trimming keeps it flat on any slide.  But a trim
    also returns the pages of the model's freed activations, which the next forward pass faults
    back in: trimming every 4 batches made the demo-size model's tile stage 17% slower than
    model-only passes (15 rounds, median) against 7% without trimming.  The baseline is never
    lowered after a trim, so the activations' own come-back never triggers another one.
    """

    def __init__(self, slack_mb: float = 32.0) -> None:
        self.slack = int(slack_mb * 2**20)
        self.trims = 0
        self._trim = None
        self._page = 4096
        self._base: Optional[int] = None
        try:
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError, ValueError):
            pass

    def _rss(self) -> Optional[int]:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def __call__(self) -> None:
        if self._trim is None:
            return
        rss = self._rss()
        if rss is None:  # no /proc: trim unconditionally (the old behaviour)
            self._trim(0)
            self.trims += 1
            return
        if self._base is None:
            self._base = rss
        elif rss > self._base + self.slack:
            self._trim(0)
            self.trims += 1


def _progress(total: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="tile", disable=not enabled, dynamic_ncols=True, leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tiles "
                           "[{elapsed}<{remaining}, {rate_fmt}]")

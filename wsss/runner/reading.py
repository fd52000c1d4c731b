"""The tile stage's readers (``read_batches``): batches of tiles in raster order, read ahead
into a ring of batch buffers by threads or, on a GPU host, by worker processes.

On a GPU host the thread that feeds the model, the band writer and the reader threads share
one GIL, and a reader gives it up and waits to take it back several times per tile (the file
read, the decode, the copy into the batch): an H200 run at 16384^2 spent 4.5 ms of reader time
per 256-px tile, against ~0.3 ms alone, and the model waited 2.4 s of its 5.1 s for tiles.
There each reader thread hands whole batches to a worker process of its own (``workers.py``:
numpy, tifffile or OpenSlide; no torch) with its own slide handle, which reads the tiles
straight into the batch's slot of the ring, kept in shared memory, and, where the runner
builds the overview thumbnail from the tiles, returns the batch's block sums: one message
each way per batch, the tiles never pickled.

The shared ring is a file in /dev/shm (the temporary folder where /dev/shm is missing or
full), space reserved up front (a full tmpfs would otherwise kill a process writing to it),
mapped here and by each worker, and unlinked once every worker has said it mapped it (seen
when a thread next hands its worker a batch, at the latest when the slide's reading ends).  A
process killed before that leaves the file behind (a run's first batches, or a slide of very
few batches); a later run does not remove it.  ``ProcessReaders.open`` returns None where the processes
cannot be used (a reader that cannot be reopened elsewhere, no workers, no shared memory):
the threads read.  A worker that dies mid-run is replaced by its thread (the same result), and
a thread reads its batches itself until its worker has started (a run's first batches never
wait for the processes' imports).
"""
from __future__ import annotations

import mmap
import os
import queue
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from wsss.errors import WsssError
from wsss.runner.workers import Worker, WorkerFailed, WorkerPool, serve

__all__ = ["ProcessReaders", "SharedRing", "read_batches", "reserve"]


# -- in a worker -------------------------------------------------------------------------------
_STATE: dict = {}


def _handle(what: str, *args):
    if what == "read":
        return _read(*args)
    if what == "attach":
        return _attach(*args)
    if what == "detach":
        return _detach()
    raise ValueError(f"unknown task {what!r}")


def _attach(path: str, shape: Tuple[int, ...], view_spec: tuple, blocks: Optional[tuple]) -> None:
    """Map the ring at ``path`` and open the slide (the view of ``SlideView.spec``)."""
    from wsss.runner.thumbnail import TileBlocks
    from wsss.slide.scale import SlideView

    _detach()
    fd = os.open(path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, int(np.prod(shape)))
    finally:
        os.close(fd)
    _STATE.update(ring=np.ndarray(shape, np.uint8, buffer=mapped), view=SlideView.from_spec(view_spec),
                  blocks=TileBlocks(*blocks) if blocks is not None else None)


def _read(slot: int, j0: int, positions: Sequence[Tuple[int, int]], tile: int):
    """The tiles at ``positions`` into rows j0... of ring slot ``slot``; their block sums."""
    out, view, blocks = _STATE["ring"][slot], _STATE["view"], _STATE["blocks"]
    for j, (x, y) in enumerate(positions, j0):
        view.read(x, y, tile, tile, out=out[j])
    if blocks is None:
        return None
    parts, group = blocks.batch_sums(positions, out[j0:j0 + len(positions)])
    if group is not None and blocks.factor <= 16:
        # NB: a block's sum fits 16 bits (16^2 x 255): a batch's sums then fit a pipe (64 KB) at once
        group = (group[0], group[1].astype(np.uint16), *group[2:])
    return parts, group


def _detach() -> None:
    view = _STATE.pop("view", None)
    _STATE.clear()  # (the ring's mapping goes with its last view)
    if view is not None:
        view.close()


def _serve() -> None:
    import tifffile  # noqa: F401  (imported while the parent gets ready)

    serve(_handle)


_WORKERS = WorkerPool(__name__)


# -- in the runner ------------------------------------------------------------------------------
def _shared_dirs() -> List[Optional[str]]:
    return (["/dev/shm"] if os.path.isdir("/dev/shm") else []) + [None]  # (None: the temporary folder)


class SharedRing:
    """A uint8 array of ``shape`` in a file other processes map (``path``) until ``unlink``."""

    def __init__(self, shape: Tuple[int, ...]) -> None:
        self.shape = tuple(int(n) for n in shape)
        size = int(np.prod(self.shape))
        errors = []
        for folder in _shared_dirs():
            try:
                fd, path = tempfile.mkstemp(prefix="wsss-tiles-", dir=folder)
            except OSError as e:
                errors.append(e)
                continue
            try:
                # NB: reserve the pages: on a full tmpfs, writing to a page never reserved kills the writer (SIGBUS)
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.ftruncate(fd, size)
                self._mmap = mmap.mmap(fd, size)
            except OSError as e:
                os.close(fd)
                os.unlink(path)
                errors.append(e)
                continue
            os.close(fd)
            self.path: Optional[str] = path
            self.array = np.ndarray(self.shape, np.uint8, buffer=self._mmap)
            return
        raise OSError(f"no shared memory for {size >> 20} MB of tiles: {errors}")

    def unlink(self) -> None:
        """Remove the file (the mappings stay until their last user lets go)."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


class ProcessReaders:
    """One worker process per reader thread for a slide's tiles (see the module docstring).

    A worker that has not started yet (a fresh one imports numpy and the readers' libraries:
    0.2-0.5 s) does not hold its thread up: until its answer to ``attach`` has come, the thread
    reads its batches itself, so a run's first batches never wait for processes to start
    (``start_on_threads``; off, ``open`` waits for every worker)."""

    start_on_threads = True

    @classmethod
    def open(cls, view, readers: int, ring_shape: Tuple[int, ...], blocks=None) -> Optional["ProcessReaders"]:
        """``readers`` workers reading ``view`` into a new ring of ``ring_shape`` [slots, batch,
        tile, tile, 3] (block sums for ``blocks``, a TileBlocks, where given), or None where they
        cannot be used.  A slide the workers cannot open raises its SlideError (here, or where
        a reader thread first uses its worker)."""
        spec = view.spec() if hasattr(view, "spec") else None
        if spec is None or readers < 1 or _WORKERS.broken:
            return None
        try:
            ring = SharedRing(ring_shape)
        except OSError:
            return None
        self = cls(ring)
        try:
            for _ in range(readers):
                worker = _WORKERS.take()
                if worker is None:  # (one could not start: threads instead)
                    for w in self._workers:  # (sent nothing yet: nothing to wait for, reusable)
                        _WORKERS.release(w)
                    self._workers = []
                    ring.unlink()
                    return None
                self._workers.append(worker)
            settings = blocks.settings if blocks is not None else None
            try:
                for w in self._workers:
                    w.send("attach", ring.path, ring.shape, spec, settings)
                if not self.start_on_threads:
                    for w in self._workers:
                        w.answer()
                        self._attached(w)
            except (EOFError, OSError, WorkerFailed):
                self._broken = True
                self.close()
                return None
        except BaseException:
            self._broken = True
            self.close()
            raise
        for w in self._workers:
            self._free.put(w)
        return self

    def __init__(self, ring: SharedRing) -> None:
        self.ring = ring
        self._workers: List[Worker] = []
        self._free: "queue.Queue[Worker]" = queue.Queue()
        self._local = threading.local()
        self._gone: List[Worker] = []
        self._ready: set = set()  # workers that have answered ``attach`` (and mapped the ring, or said why not)
        self._lock = threading.Lock()
        self._broken = False
        self.tasks = 0  # batches the workers have read (counted loosely across threads: is it 0?)

    @property
    def replaced(self) -> bool:
        """Whether a worker has died and its thread reads in its place."""
        return bool(self._gone)

    def _attached(self, worker: Worker) -> None:
        """``worker`` has answered ``attach``."""
        with self._lock:
            self._ready.add(worker)
            everyone = len(self._ready) == len(self._workers)
        if everyone:
            self.ring.unlink()  # (every worker has mapped it: the name is no longer needed)

    def read(self, slot: int, j0: int, positions, tile: int, on_sums: Optional[Callable] = None) -> bool:
        """The tiles at ``positions`` into rows j0... of ring slot ``slot`` by this thread's
        worker (``on_sums(parts, group)`` with their block sums, where asked); False where the
        caller is to read them itself: its worker is still starting, or has gone."""
        worker = getattr(self._local, "worker", None)
        if worker is None:
            if getattr(self._local, "gone", False):
                return False
            worker = self._local.worker = self._free.get_nowait()  # (one per reader thread)
        try:
            if worker not in self._ready:
                if self.start_on_threads and not worker.has_answer():
                    return False
                try:
                    worker.answer()
                except WsssError:  # (it could not open the slide: raised; the thread reads from now on)
                    self._local.worker, self._local.gone = None, True
                    raise
                except WorkerFailed as e:  # (it could not attach for another reason: as if it had died)
                    raise OSError(str(e)) from e
                finally:
                    self._attached(worker)
            sums = worker.call("read", slot, j0, [(int(x), int(y)) for x, y in positions], tile)
            self.tasks += 1
        except (EOFError, OSError):
            self._local.worker, self._local.gone = None, True
            self._gone.append(worker)
            return False
        if on_sums is not None and sums is not None:
            on_sums(*sums)
        return True

    def close(self) -> None:
        """Detach the workers and give them back (the ring's memory goes with its last user).
        Where one died, the pool gives up first, so the living ones end too (later slides read
        on threads; kept idle, they waited unused for the process's exit)."""
        if self._gone:
            _WORKERS.give_up()
        for w in self._workers:
            if w in self._gone or self._broken:
                _WORKERS.release(w, reusable=False)
                continue
            try:
                if w not in self._ready:
                    try:
                        w.answer()  # (its answer to ``attach``: one still starting finishes first)
                    except WsssError:
                        pass  # (it could not open the slide, and said so)
                w.call("detach")
            except (EOFError, OSError, WorkerFailed):
                _WORKERS.release(w, reusable=False)
                continue
            _WORKERS.release(w)
        self._workers = []
        self.ring.unlink()


def reserve(n: int) -> None:
    """Start n reader workers ahead of a run (they import their libraries meanwhile)."""
    _WORKERS.reserve(n)


def read_batches(view, grid, options, timer, views: list, one_thread_if_helper, thumbnail=None,
                 processes: bool = False, state: Optional[dict] = None):
    """Yield (positions, uint8 tiles [n,3,t,t]) in the grid's raster order, read ahead by
    ``options.workers`` threads (each with its own slide handle) or, with ``processes``, by a
    worker process per thread (``ProcessReaders``; threads where they cannot be used).  The
    tiles' block sums go to ``thumbnail`` (a TileThumbnail), before the batch is handed out
    (their time counts as reading).  ``state["readers"]``: "threads" (also where the slide was
    read before any worker had started), "processes", or "processes, then threads" where a
    worker died.

    NB: each reader copies its tile into its batch's slot of a ring of batch buffers, so the
    thread that feeds the model only waits for a batch, never copies one together (32 copies
    per batch, each giving up the GIL and waiting to retake it while a dozen threads run).
    The ring holds every batch the read-ahead can reach plus the one handed out, which stays
    untouched until the next is asked for: consumers copy or consume it first.  Tiles are
    stored as read (NHWC) and handed out as an NCHW view with channels_last strides: no
    transpose copy, and the bundle predictor's .contiguous(channels_last) is then free.
    """
    import torch

    from wsss.slide import ThreadHandles

    tile, size = grid.tile, options.batch_size
    handles = ThreadHandles(view, on_new=one_thread_if_helper, opened=views)  # (the caller closes views)
    lookahead = size * (max(1, options.workers) + 2)
    ring_shape = (2 + -(-lookahead // size), size, tile, tile, 3)
    readers = None
    if processes and options.workers > 0:
        t0 = time.perf_counter()
        readers = ProcessReaders.open(view, options.workers, ring_shape,
                                      thumbnail.blocks if thumbnail is not None else None)
        timer.add("read (starting processes)", time.perf_counter() - t0)
    ring = readers.ring.array if readers is not None else \
        [np.empty(ring_shape[1:], np.uint8) for _ in range(ring_shape[0])]
    state = state if state is not None else {}
    state["readers"] = "processes" if readers is not None else "threads"

    tiles = grid.tiles
    left = [min(size, len(tiles) - b) for b in range(0, len(tiles), size)]  # tiles of each batch still to read
    left_lock = threading.Lock()

    def read_here(i0: int, i1: int, slot: np.ndarray) -> None:
        v = handles.get()
        for i in range(i0, i1):
            v.read(tiles[i][0], tiles[i][1], tile, tile, out=slot[i % size])

    def read(i0: int, i1: int) -> None:
        """Tiles [i0, i1) of one batch into its ring slot."""
        t0 = time.perf_counter()
        k = (i0 // size) % len(ring)
        slot = ring[k]
        if readers is not None:
            # NB: block sums per run, in the worker or here (never a batch's sum on top of a run's)
            if not readers.read(k, i0 % size, tiles[i0:i1], tile,
                                on_sums=thumbnail.add_sums if thumbnail is not None else None):
                read_here(i0, i1, slot)  # (its worker is still starting, or has gone)
                if readers.replaced:
                    state["readers"] = "processes, then threads"
                if thumbnail is not None:
                    thumbnail.add_batch(tiles[i0:i1], slot[i0 % size:i0 % size + i1 - i0])
        else:
            read_here(i0, i1, slot)
            if thumbnail is not None:
                with left_lock:
                    left[i0 // size] -= i1 - i0
                    complete = not left[i0 // size]
                if complete:
                    b0 = i0 // size * size
                    batch = tiles[b0:b0 + size]
                    thumbnail.add_batch(batch, slot[:len(batch)])
        timer.add("read (worker time)", time.perf_counter() - t0)

    pool = ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="wsss-read") \
        if options.workers > 0 else None
    # NB: a reader task reads a run of one batch's tiles (each batch split between the readers),
    # not one tile: each task submitted wakes a reader, and each future the thread feeding the
    # model waits on is a GIL hand-over on a busy host (32 of each per batch of the CUDA default)
    # NB: a reader process reads a whole batch per task: it needs no GIL, and each task costs
    # this process's threads a few GIL hand-overs (the task's wake-up, its message each way)
    run = size if readers is not None else -(-size // max(1, options.workers))
    chunks = deque((i0, min(i0 + run, b0 + size, len(tiles)))
                   for b0 in range(0, len(tiles), size) for i0 in range(b0, min(b0 + size, len(tiles)), run))
    pending: deque = deque()  # (first tile, end, future or None), in order

    def submit_more():
        # (at most ``lookahead`` tiles read ahead of the batch handed out: the ring holds them)
        while chunks and chunks[0][1] - (pending[0][0] if pending else chunks[0][0]) <= lookahead:
            i0, i1 = chunks.popleft()
            pending.append((i0, i1, pool.submit(read, i0, i1) if pool else None))

    try:
        submit_more()
        while pending:
            b0 = pending[0][0]
            n = min(size, len(tiles) - b0)
            t0 = time.perf_counter()
            while pending and pending[0][0] < b0 + n:
                i0, i1, fut = pending.popleft()
                if fut is not None:
                    fut.result()
                else:
                    read(i0, i1)
            timer.add("read (waiting)", time.perf_counter() - t0)
            # NB: the read-ahead is topped up once per batch, not per tile taken: each submit
            # wakes a reader that then competes for the GIL with this loop (a stand-in GPU at
            # 3072^2: main-thread waits 0.06-0.07 -> 0.02-0.03 s, tile stage -2.5%)
            submit_more()
            batch = ring[(b0 // size) % len(ring)]
            yield list(tiles[b0:b0 + n]), torch.from_numpy(batch[:n]).permute(0, 3, 1, 2)
    finally:
        if pool is not None:
            for _, _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)
        if readers is not None:
            readers.close()
            if not readers.tasks and not readers.replaced:  # (a slide read before any worker had started)
                state["readers"] = "threads"


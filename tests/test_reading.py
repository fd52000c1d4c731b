"""Tile reads in worker processes (wsss.runner.reading): the same tiles, thumbnail and
outputs as the reader threads, errors as they are, a dead worker replaced by its thread, and
no shared-memory file left behind."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
from runner_kit import colour_slide, model, opts, own_workers, write_pyramid

from wsss.errors import SlideError
from wsss.runner import reading, run_slide, tile_stage
from wsss.runner.pipeline import _StageTimer
from wsss.runner.reading import read_batches
from wsss.runner.thumbnail import TileThumbnail
from wsss.runner.tiling import TileGrid
from wsss.runner.workers import Worker
from wsss.slide import SlideView, open_slide
from wsss.slide.scale import plan_scale

from runner_kit import REAL_SLIDE  # noqa: E402


@pytest.fixture
def fresh_readers(monkeypatch):
    """A pool of reader worker processes of the test's own, ended after it.  Its workers read
    every batch (the threads do not stand in while they start: see test_threads_read_while_their_workers_start)."""
    monkeypatch.setattr(reading.ProcessReaders, "start_on_threads", False)
    with own_workers(monkeypatch, reading) as workers:
        yield workers


def ring_files() -> set:
    import tempfile

    return {p for d in ("/dev/shm", tempfile.gettempdir()) for p in glob.glob(os.path.join(d, "wsss-tiles-*"))}


def read_all(view, grid, processes: bool, workers: int = 3, batch: int = 4, factor: int = 4, state=None):
    """[(positions, tiles copy)] of every batch, and the thumbnail summed from them."""
    thumb = TileThumbnail(grid.width, grid.height, factor, grid.xs, grid.ys)
    out, views = [], []
    try:
        for positions, x in read_batches(view, grid, opts(batch_size=batch, workers=workers), _StageTimer(), views,
                                          lambda: None, thumb, processes, state):
            assert x.is_contiguous(memory_format=torch.channels_last)
            out.append((positions, x.clone()))
    finally:
        for v in views:
            v.close()
    return out, thumb.image()


@pytest.mark.parametrize("reader, resample",
                         [("tifffile", False), ("tifffile", True), ("openslide", False), ("real", True)])
def test_processes_read_the_tiles_and_thumbnail_the_threads_do(tmp_path, fresh_readers, reader, resample):
    if reader != "tifffile":
        import openslide  # noqa: F401  (a dependency: missing is a broken install, not a skip)
    if reader == "real":  # (an .svs through OpenSlide, at the demo bundle's scale)
        if not REAL_SLIDE.is_file():
            pytest.skip(f"real test slide absent: {REAL_SLIDE}")
        r = open_slide(REAL_SLIDE, reader="openslide")
        view = SlideView(r, plan_scale(r, 1.0))
    else:
        path = tmp_path / "s.tif"
        img = colour_slide(203, 170, seed=3)
        write_pyramid(path, [img, img[::2, ::2].copy()])
        r = open_slide(path, reader=reader)
        view = SlideView(r, plan_scale(r, 0.63 if resample else 0.5))
    assert view.plan.resampled == resample and view.spec() is not None
    grid = TileGrid(view.plan.width, view.plan.height, 96 if reader == "real" else 32, 8)
    before = ring_files()
    try:
        want, want_thumb = read_all(view, grid, processes=False)
        for _ in range(2):  # (the second slide reuses the workers)
            got, got_thumb = read_all(view, grid, processes=True)
            assert [p for p, _ in got] == [p for p, _ in want]
            for (_, a), (_, b) in zip(got, want):
                assert torch.equal(a, b)
            assert want_thumb is not None and np.array_equal(got_thumb, want_thumb)
    finally:
        view.close()
    assert len(fresh_readers._idle) == 3 and not fresh_readers.broken
    assert ring_files() == before


def test_a_run_with_reader_processes_writes_the_same_outputs(tmp_path, monkeypatch, fresh_readers):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(150, 190, seed=4)])
    outs = {}
    for processes in (0, 1):
        monkeypatch.setattr(tile_stage, "READER_PROCESSES", processes)
        res = run_slide(path, model(), tmp_path / f"out{processes}", opts(overlap=8, workers=2))
        assert res.status == "done", res.message
        outs[processes] = res
    assert fresh_readers._idle and not fresh_readers.broken  # (processes were used)
    assert [json.loads((tmp_path / f"out{p}" / "run.json").read_text())["tiles"]["readers"] for p in (0, 1)] == \
        ["threads", "processes"]
    for name in ("labels.tiff", "overlay.png", "tissue_qc.png", "areas.json", "polygons.geojson"):
        a, b = (tmp_path / f"out{p}" / name for p in (0, 1))
        if name == "labels.tiff":
            assert np.array_equal(tifffile.imread(a), tifffile.imread(b))
        else:
            assert a.read_bytes() == b.read_bytes(), name


def test_a_corrupt_tile_read_in_a_worker_raises_its_slide_error(tmp_path, monkeypatch, fresh_readers):
    path = tmp_path / "c.tif"
    write_pyramid(path, [colour_slide(64, 64)])
    with tifffile.TiffFile(path) as t:
        off = t.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[off:off + 16] = b"\x00garbage-bytes!!"
    path.write_bytes(bytes(data))
    r = open_slide(path)
    view = SlideView(r, plan_scale(r, 0.5))
    before = ring_files()
    try:
        with pytest.raises(SlideError) as e:
            read_all(view, TileGrid(64, 64, 32, 8), processes=True)
    finally:
        view.close()
    assert str(path) in str(e.value) and "tile 3" in str(e.value)
    assert fresh_readers._idle and not fresh_readers.broken  # (the workers answered: kept)
    assert ring_files() == before


def test_a_dead_reader_worker_is_replaced_by_its_thread(tmp_path, fresh_readers):
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(120, 140, seed=5)])
    r = open_slide(path)
    view = SlideView(r, plan_scale(r, 0.5))
    grid = TileGrid(140, 120, 32, 8)
    try:
        want, want_thumb = read_all(view, grid, processes=False, workers=2)
        fresh_readers.reserve(2)
        real = Worker.call

        def dies_on_read(self, *message):
            if message[0] == "read":  # (killed between two batches, as by the OOM killer)
                self.proc.kill()
                self.proc.wait()
            return real(self, *message)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Worker, "call", dies_on_read)
            state = {}
            got, got_thumb = read_all(view, grid, processes=True, workers=2, state=state)
    finally:
        view.close()
    assert [p for p, _ in got] == [p for p, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert np.array_equal(got_thumb, want_thumb) and state["readers"] == "processes, then threads"
    assert fresh_readers.broken and not fresh_readers._idle  # (later slides read on threads)


def _reads_in_workers(monkeypatch) -> list:
    """The "read" tasks the workers are given (one per batch), from now on."""
    tasks, real = [], Worker.call

    def counted(self, *message):
        if message[0] == "read":
            tasks.append(len(message[3]))
        return real(self, *message)

    monkeypatch.setattr(Worker, "call", counted)
    return tasks


@pytest.mark.parametrize("started", ["after 6 batches", "never"])
def test_threads_read_while_their_workers_start(tmp_path, fresh_readers, monkeypatch, started):
    """A run's first batches do not wait for the worker processes to start (0.2-0.5 s each):
    until its worker has answered, a reader thread reads its batches itself."""
    monkeypatch.setattr(reading.ProcessReaders, "start_on_threads", True)
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(200, 230, seed=6)])
    r = open_slide(path)
    view = SlideView(r, plan_scale(r, 0.5))
    grid = TileGrid(230, 200, 32, 8)
    real, asked = Worker.has_answer, []

    def starts_late(self):
        asked.append(1)
        if started == "never" or len(asked) <= 6:
            return False
        while not real(self):  # (from then on: as soon as it has booted)
            time.sleep(0.005)
        return True

    before = ring_files()
    try:
        want, want_thumb = read_all(view, grid, processes=False)
        monkeypatch.setattr(Worker, "has_answer", starts_late)
        in_workers, state = _reads_in_workers(monkeypatch), {}
        got, got_thumb = read_all(view, grid, processes=True, state=state)
    finally:
        view.close()
    batches = len(want)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want)) and np.array_equal(got_thumb, want_thumb)
    assert len(in_workers) == (0 if started == "never" else batches - 6)
    assert state["readers"] == ("threads" if started == "never" else "processes")
    assert len(fresh_readers._idle) == 3 and not fresh_readers.broken  # (each answered; kept for the next slide)
    assert ring_files() == before


def test_a_slide_the_workers_cannot_open_is_its_slide_error_not_a_hang(tmp_path, fresh_readers, monkeypatch):
    """The workers' answer to ``attach`` is a SlideError (the file went after it was opened here):
    raised by the thread that asked first, and the others' answers taken before the workers go back."""
    monkeypatch.setattr(reading.ProcessReaders, "start_on_threads", True)
    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(120, 140, seed=7)])
    r = open_slide(path)
    view = SlideView(r, plan_scale(r, 0.5))
    real = Worker.has_answer

    def booted(self):
        while not real(self):
            time.sleep(0.005)
        return True

    monkeypatch.setattr(Worker, "has_answer", booted)
    path.unlink()
    try:
        with pytest.raises(SlideError) as e:
            read_all(view, TileGrid(140, 120, 32, 8), processes=True)
    finally:
        view.close()
    assert str(path) in str(e.value)
    assert len(fresh_readers._idle) == 3 and not fresh_readers.broken


def test_views_that_cannot_be_reopened_elsewhere_are_read_on_threads(tmp_path, fresh_readers):
    """Only this package's readers are reopened in a worker: a subclass may read differently."""
    from wsss.slide.reader import TiffSlideReader

    class Tinted(TiffSlideReader):
        def read_region(self, *a, **kw):
            out = super().read_region(*a, **kw)
            out[..., 2] = 7
            return out

    path = tmp_path / "s.tif"
    write_pyramid(path, [colour_slide(64, 64)])
    r = Tinted(path)
    view = SlideView(r, plan_scale(r, 0.5))
    try:
        assert view.spec() is None
        got, _ = read_all(view, TileGrid(64, 64, 32, 8), processes=True)
    finally:
        view.close()
    assert all((x[:, 2] == 7).all() for _, x in got)
    assert not fresh_readers._idle  # (never started)


def test_reader_workers_load_no_torch_and_end_with_their_parent():
    from wsss.runner import workers

    heavy = "[n for n in sys.modules if n in ('torch', 'wsss.ops', 'wsss.runner.pipeline', 'wsss.runner.tile_stage') or n.startswith('torch.')]"
    probe = workers._BOOT.replace("._serve()", f" and print({heavy})")
    out = subprocess.run([sys.executable, "-c", probe, workers._ROOT, reading.__name__],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    w = Worker(reading.__name__)
    w.proc.stdin.close()
    assert w.proc.wait(timeout=30) == 0


def test_reader_processes_are_used_on_gpu_hosts_unless_told(monkeypatch):
    monkeypatch.setattr(tile_stage, "READER_PROCESSES", -1)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert tile_stage.reader_processes("cuda:0") and not tile_stage.reader_processes("cpu")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert not tile_stage.reader_processes("cuda:0")
    monkeypatch.setattr(tile_stage, "READER_PROCESSES", 1)
    assert tile_stage.reader_processes("cpu")
    monkeypatch.setattr(tile_stage, "READER_PROCESSES", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert not tile_stage.reader_processes("cuda:0")


def test_a_full_shared_memory_folder_falls_back_to_the_next(monkeypatch, tmp_path):
    """Space is reserved up front: where /dev/shm is full the ring goes to the temporary folder."""
    real = os.posix_fallocate if hasattr(os, "posix_fallocate") else None
    if real is None:
        pytest.skip("needs os.posix_fallocate")
    calls = []

    def full_shm(fd, offset, size):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        if calls[-1].startswith("/dev/shm/"):
            raise OSError(28, "No space left on device")
        return real(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", full_shm)
    monkeypatch.setattr(reading, "_shared_dirs", lambda: ["/dev/shm", str(tmp_path)])
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    before = set(glob.glob("/dev/shm/wsss-tiles-*"))  # (other runs' rings are not this test's)
    ring = reading.SharedRing((2, 3, 4))
    assert ring.path.startswith(str(tmp_path)) and ring.array.shape == (2, 3, 4)
    ring.unlink()
    assert not list(tmp_path.iterdir()) and set(glob.glob("/dev/shm/wsss-tiles-*")) <= before


def test_a_worker_that_cannot_start_falls_back_to_threads_without_waiting(tmp_path, monkeypatch, fresh_readers):
    """The third reader process cannot start (fork failing with EAGAIN, say): open gives up on
    processes at once (it waited forever for answers to a question never sent), releases the
    two it had and removes its ring."""
    import threading

    path = tmp_path / "s.tif"
    tifffile.imwrite(path, np.full((128, 128, 3), 200, np.uint8), tile=(64, 64), resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    reader = open_slide(path)
    view = SlideView(reader, plan_scale(reader, 0.5))
    real, calls = fresh_readers.take, [0]

    def flaky():
        calls[0] += 1
        if calls[0] == 3:
            fresh_readers.broken = True  # (what take does when Worker() raises OSError)
            return None
        return real()

    monkeypatch.setattr(fresh_readers, "take", flaky)
    before = ring_files()
    result = {}
    t = threading.Thread(target=lambda: result.update(r=reading.ProcessReaders.open(view, 4, (2, 2, 64, 64, 3))),
                         daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "ProcessReaders.open blocked"
    assert result["r"] is None and ring_files() == before
    reader.close()

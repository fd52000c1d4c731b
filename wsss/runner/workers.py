"""Child Python processes that do a module's work off this process's GIL.

What the runner does while the tiles run on a GPU is GIL-bound: the thread feeding the model,
the band writer and every helper thread take turns, and each small numpy call, file read or
GEOS call that gives the GIL up waits to take it back (beside three GIL-holding threads at a
1-ms switch interval, tracing a noisy 2048^2 map's outlines took 10-11 s against ~1 s alone).
Work that needs many such calls and little data in and out is done in worker processes
instead: the outline slabs (``outlines.py``) and the tile reads (``reading.py``).

A worker is ``python -c _BOOT ROOT MODULE``: it imports MODULE (e.g. ``wsss.runner.outlines``)
with the packages above it registered *without* running their ``__init__`` (importing ``wsss``
imports torch: ~1 s and ~300 MB per worker), and runs its ``_serve()``, which calls ``serve``
here with a handler.  Messages are pickles, each after its length, over the worker's stdin
and stdout.  A worker ignores Ctrl-C (it reaches the whole process group) and ends when its
stdin closes, as when the process that started it ends.

``WorkerPool(module)``: a process's workers for one module, started on demand and kept idle for
the next task (a slide's tasks and the next slide's).  ``run`` does a task in an idle worker;
where none can be started, or one dies, the pool is marked broken and the task runs on the
calling thread instead (``fallback``: the same result).  A forked child forgets its parent's
workers (their pipes are the parent's) and starts its own.
"""
from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
import traceback
import weakref
from typing import Callable, List, Optional

from wsss.errors import WsssError

__all__ = ["Worker", "WorkerPool", "WorkerFailed", "serve"]

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (holds wsss/)
_BOOT = ("import importlib, os, sys, types\n"
         "root, module = sys.argv[1], sys.argv[2]\n"
         "parts = module.split('.')\n"
         "for i in range(1, len(parts)):\n"
         "    name = '.'.join(parts[:i])\n"
         "    package = types.ModuleType(name)\n"
         "    package.__path__ = [os.path.join(root, *parts[:i])]\n"
         "    sys.modules[name] = package\n"
         "importlib.import_module(module)._serve()\n")
_FRAME = struct.Struct("<Q")  # each message: its length, then its pickle


class WorkerFailed(RuntimeError):
    """A task raised in a worker; the message holds the worker's traceback."""


def _send(fd: int, obj) -> None:
    """One message, in one write where the pipe takes it (each system call gives up the GIL,
    and on a busy host taking it back costs ~1 ms per thread running)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_FRAME.pack(len(data)) + data)
    while len(view):
        view = view[os.write(fd, view):]


def _receive(fd: int, pending: bytearray):
    """The next message from ``fd`` (bytes read past it stay in ``pending``); EOFError when the
    other end has gone.  Reads what the pipe holds at once: usually the whole message."""
    while True:
        if len(pending) >= _FRAME.size:
            (n,) = _FRAME.unpack_from(pending)
            if len(pending) >= _FRAME.size + n:
                message = pickle.loads(bytes(pending[_FRAME.size:_FRAME.size + n]))
                del pending[:_FRAME.size + n]
                return message
            want = _FRAME.size + n - len(pending)
        else:
            want = _FRAME.size
        chunk = os.read(fd, max(want, 1 << 16))
        if not chunk:
            raise EOFError
        pending += chunk


def serve(handle: Callable) -> None:
    """A worker's loop: ``handle(*message)`` for each message until stdin closes; the reply is
    its result, or what it raised: the exception itself where it pickles (a ``WsssError`` the
    parent raises as it is), always with the traceback's text."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout = sys.stderr  # (a stray print must not break the messages)
    pending = bytearray()
    while True:
        try:
            message = _receive(stdin, pending)
        except EOFError:
            return
        try:
            reply = (True, handle(*message))
        except Exception as e:
            reply = (False, (e, traceback.format_exc()))
        try:
            try:
                _send(stdout, reply)
            except (pickle.PicklingError, TypeError, AttributeError):  # (an exception that does not pickle)
                _send(stdout, (False, (None, reply[1][1] if not reply[0] else traceback.format_exc())))
        except (BrokenPipeError, OSError):  # the parent has gone
            return


class Worker:
    """One worker process running ``module``'s ``_serve`` (see the module docstring)."""

    def __init__(self, module: str) -> None:
        if not sys.executable:
            raise OSError("no Python executable to start a worker with")
        self.module = module
        # NB: this process's sys.path, as multiprocessing's spawn passes it: numpy and the
        # readers' libraries are found where they were found here, also when a program added their folder
        path = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, _ROOT, module], bufsize=0,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=dict(os.environ, PYTHONPATH=path))
        self._pending = bytearray()

    def call(self, *message):
        """The handler's reply to ``message``: its result, or it raises what the task raised (a
        ``wsss.errors.WsssError`` as it is, anything else as ``WorkerFailed``); EOFError or
        OSError when the worker is gone."""
        self.send(*message)
        return self.answer()

    def send(self, *message) -> None:
        """``call`` in two halves (questions to several workers at once, then their answers)."""
        _send(self.proc.stdin.fileno(), message)

    def has_answer(self) -> bool:
        """Whether an answer (or the end of the pipe) has arrived: ``answer`` would not wait for
        the worker."""
        import select

        if len(self._pending) >= _FRAME.size:
            return True
        poller = select.poll()  # (not select.select: a busy process's descriptors can pass 1024)
        poller.register(self.proc.stdout.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def answer(self):
        ok, value = _receive(self.proc.stdout.fileno(), self._pending)
        if ok:
            return value
        error, text = value
        if isinstance(error, WsssError):
            raise error
        raise WorkerFailed(f"{self.module}: a task failed in a worker process:\n{text}")

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


class WorkerPool:
    """This process's workers for ``module``: started on demand, idle ones kept for the next task."""

    MAX_IDLE = 8

    def __init__(self, module: str) -> None:
        self.module = module
        self._idle: List[Worker] = []
        self._lock = threading.Lock()
        self.broken = False  # a worker could not be started or died: tasks on the threads from then on
        _POOLS.add(self)

    def reserve(self, n: int) -> None:
        """Start workers until n are idle (they import their modules meanwhile)."""
        with self._lock:
            while not self.broken and len(self._idle) < min(n, self.MAX_IDLE):
                try:
                    self._idle.append(Worker(self.module))
                except OSError:
                    break
            else:
                return
        self.give_up()  # (one could not start)

    def give_up(self) -> None:
        """No workers from now on (one could not start or died): tasks run on the threads, and
        the idle workers end now rather than wait unused for this process's exit."""
        with self._lock:
            self.broken = True
            idle, self._idle = self._idle, []
        for w in idle:
            w.close()

    def take(self) -> Optional[Worker]:
        """An idle worker (or a new one), now the caller's until ``release``; None where the pool is broken."""
        with self._lock:
            if self.broken:
                return None
            if self._idle:
                return self._idle.pop()
        try:
            return Worker(self.module)
        except OSError:
            self.give_up()
            return None

    def release(self, worker: Worker, *, reusable: bool = True) -> None:
        """A worker taken back: kept idle for the next task, or ended (``reusable=False``: it died,
        or was interrupted between a question and its answer)."""
        if reusable:
            with self._lock:
                if len(self._idle) < self.MAX_IDLE and not self.broken:
                    self._idle.append(worker)
                    return
        worker.close()

    def run(self, message: tuple, fallback: Callable[[], object]):
        """``message``'s reply from a worker, or ``fallback()`` on this thread where no worker
        can answer (see ``Worker.call``: what the task raised is raised here)."""
        worker = self.take()
        if worker is None:
            return fallback()
        try:
            result = worker.call(*message)
        except (EOFError, OSError):
            self.give_up()
            self.release(worker, reusable=False)
            return fallback()
        except Exception as e:
            # (the task failed; the worker answered and goes on)
            self.release(worker, reusable=isinstance(e, (WorkerFailed, WsssError)))
            raise
        except BaseException:  # (interrupted between question and answer: not reusable)
            self.release(worker, reusable=False)
            raise
        self.release(worker)
        return result

    def shutdown(self) -> None:
        """End the idle workers (at exit; a busy one ends when this process does)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.close()

    def forget(self) -> None:
        """In a forked child: the workers are the parent's (their pipes too), never this one's."""
        self._idle = []
        self._lock = threading.Lock()


def _shutdown_all() -> None:
    for pool in list(_POOLS):
        pool.shutdown()


def _forget_all() -> None:
    for pool in list(_POOLS):
        pool.forget()


atexit.register(_shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all)

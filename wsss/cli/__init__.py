"""One module per command (wsss/cli/<command>.py, each with ``main(argv=None) -> int``).

Heavy imports (torch, models, readers) are deferred into the command bodies so ``--help``
is fast.  ``run`` turns expected mistakes (WsssError) and failures of the file system (OSError: a full
disk, a path that cannot be made) into one clear line and exit code 2.
"""
from __future__ import annotations

import _thread
import os
import signal
import sys
import time
from typing import Callable, Optional, Sequence

INTERRUPT_GRACE_S = 3.0  # the longest an import may hold back a Ctrl-C


class _ImportSafeInterrupt:
    """SIGINT (and SIGTERM, SIGHUP) handler: KeyboardInterrupt, except while the main thread is
    inside an import, where the signal is sent again 10 ms later (until the import ends, or for
    INTERRUPT_GRACE_S at most).  ``signum``: the signal that raised (or is held back).

    NB: SIGTERM and SIGHUP (a batch system's time limit, a closed terminal) ended the process
    at once, without the cleanup Ctrl-C gets: the slide's work folder stayed behind, and a slide
    whose outputs were being written behind the next one's tiles was lost.

    NB: a KeyboardInterrupt raised in importlib's own bookkeeping can leave its global import
    lock held for good (CPython 3.11: in a module lock's weakref callback, where it is also
    swallowed as "Exception ignored"): the command then carried on, and every other thread's
    next import (the scikit-image preload, a reader) waited forever, as did the command for
    them.  One raised in a C extension's initialisation leaves that module unimportable
    ("cannot load module more than once per process").  Both seen with Ctrl-C in the first
    second of ``wsss-infer --demo``.

    At most one re-send is on its way (more presses while one is join it); raising cancels it,
    and ``close`` (``run`` returning) cancels it and swallows one already sent, so no interrupt
    escapes ``run``; ``held`` says one was held back and never raised (``run`` counts it)."""

    def __init__(self) -> None:
        import threading

        self.held_since: Optional[float] = None
        self.signum: Optional[int] = None
        self._lock = threading.Lock()
        self._resending = False
        self._generation = 0  # (raising starts a new one: a re-send of an older one is dropped)
        self._closed = False
        self.pid = os.getpid()  # (a forked child, e.g. a DataLoader worker, inherits the handler)
        self.mute_workers = False  # (run sets it: see _mute_worker_sigchld)
        self.sigchld = None  # the SIGCHLD handler muted, to restore

    @property
    def held(self) -> bool:
        return self.held_since is not None

    def __call__(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            # NB: in a forked child (a DataLoader worker) the signal does what it would without
            # this handler: the KeyboardInterrupt raised in a worker's at-fork hooks (logging's
            # lock, random's reseed) was printed as "Exception ignored in: ..." with a traceback
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self._closed:
            return  # (a re-send that crossed run's return: the command is ending anyway)
        if self.mute_workers and self.sigchld is None:
            self.sigchld = _mute_worker_sigchld()
        if self.signum is None or signum != signal.SIGINT:  # (a SIGTERM is not downgraded by a later Ctrl-C)
            self.signum = signum
        now = time.monotonic()
        if _inside_import(frame) and (self.held_since is None or now - self.held_since < INTERRUPT_GRACE_S):
            if self.held_since is None:
                self.held_since = now
            with self._lock:
                if not self._resending:
                    self._resending = True
                    _thread.start_new_thread(self._send_again, (self._generation,))
            return
        with self._lock:
            self.held_since = None
            self._generation += 1
        raise KeyboardInterrupt

    def _send_again(self, generation: int) -> None:
        time.sleep(0.01)
        with self._lock:
            self._resending = False
            if not self._closed and generation == self._generation:
                _send_signal(self.signum)

    def close(self) -> None:
        with self._lock:
            self._closed = True


def _inside_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _send_signal(signum: int) -> None:
    os.kill(os.getpid(), signum)


# signal -> the disposition the handler replaces (anything else, e.g. SIGHUP ignored under nohup,
# or a handler of the caller's, is left alone)
_HANDLED = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}


def _install_interrupt_handler():
    """The handler above in place of Python's defaults, from the main thread only; returns it
    and {signal: what to restore} (None: nothing was changed)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    handler = _ImportSafeInterrupt()
    previous = {}
    for signum, default in _HANDLED.items():
        if signal.getsignal(signum) is default:
            previous[signum] = default
            signal.signal(signum, handler)
    return (handler, previous) if previous else None


def worker_error_message(error: BaseException) -> str:
    """The message of ``error``; for one a DataLoader worker raised, the original one.

    NB: torch re-raises a worker's exception in the main process as the same class with the
    message "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent
    call last): ..." and the whole formatted traceback (~50 lines for an unreadable image with
    --workers 1); its last line is "module.Class: original message"."""
    text = str(error)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    cls = type(error)
    names = {cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"}
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, 0, -1):
        name, sep, rest = lines[i].partition(": ")
        if sep and name in names:
            return " ".join([rest.strip()] + [l.strip() for l in lines[i + 1:] if l.strip()])
    return lines[-1].strip()  # (the formatted exception's line, whatever its class)


def _is_worker_killed(error: BaseException) -> bool:
    """A torch DataLoader's "DataLoader worker (pid N) is killed by signal: ..." (or "exited
    unexpectedly") error."""
    text = str(error)
    return text.startswith("DataLoader worker (pid") and ("killed by signal" in text or "exited unexpectedly" in text)


def _quiet_worker_deaths(previous_hook, handler: "_ImportSafeInterrupt"):
    """A sys.unraisablehook: the "Exception ignored in: <function _MultiProcessingDataLoaderIter.
    __del__>" report of a worker killed by the signal that stops the command is dropped (the
    command says "stopped by SIGTERM"), once ``handler`` has had a stop signal; anything else goes
    to ``previous_hook``."""

    def hook(unraisable) -> None:
        if handler.signum is not None and unraisable.exc_value is not None and _is_worker_killed(unraisable.exc_value):
            return
        previous_hook(unraisable)

    return hook


def _mute_worker_sigchld() -> Optional[object]:
    """Once a stop signal has arrived: torch's SIGCHLD handler (a DataLoader's, which raises
    "DataLoader worker (pid N) is killed by signal: Terminated" when a worker ends, the workers
    having had the same SIGTERM from the process group) replaced by one that does nothing;
    returns the handler replaced (None: none was torch's)."""
    handler = signal.getsignal(signal.SIGCHLD)
    if callable(handler) and "torch.utils.data" in (getattr(handler, "__module__", None) or ""):
        # NB: a Python handler that does nothing, not SIG_DFL: a SIGCHLD already pending when the
        # disposition became SIG_DFL was reported as "OSError: Signal 17 ignored due to race
        # condition" with a traceback
        signal.signal(signal.SIGCHLD, _child_ended)
        return handler
    return None


def _child_ended(signum, frame) -> None:
    """SIGCHLD handler that does nothing (see _mute_worker_sigchld)."""


def run(prog: str, body: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command body; WsssError -> 'prog: error: message' on stderr and exit code 2."""
    import warnings

    from wsss.errors import WsssError

    # NB: a warning for the user (bf16 on a CPU without bf16 units, ...) reads as one line of the
    # command, not as Python's "file:line: RuntimeWarning:" with a line of source code
    warnings.formatwarning = lambda message, category, *a, **k: f"{prog}: warning: {message}\n"
    installed = _install_interrupt_handler()
    unraisable_hook = sys.unraisablehook
    if installed is not None:
        installed[0].mute_workers = True
        sys.unraisablehook = _quiet_worker_deaths(unraisable_hook, installed[0])
    try:
        rc = int(body(argv) or 0)
        if installed is not None and installed[0].held:
            raise KeyboardInterrupt  # (pressed during the last import: it still ends the command)
        return rc
    except WsssError as e:
        print(f"{prog}: error: {worker_error_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the command could not use (a full disk, a folder where a file goes, ...)
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or worker_error_message(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # (a DataLoader worker killed by the same SIGTERM as the command, noticed by torch's SIGCHLD
        # handler while the interrupt unwound: the interrupt is what ended the command)
        if not (installed is not None and installed[0].signum is not None and _is_worker_killed(e)):
            raise
        signum = installed[0].signum
        print(f"{prog}: {'interrupted' if signum == signal.SIGINT else 'stopped by ' + signal.Signals(signum).name}",
              file=sys.stderr)
        return 128 + int(signum)
    except KeyboardInterrupt:
        signum = (installed[0].signum if installed is not None else None) or signal.SIGINT
        print(f"{prog}: {'interrupted' if signum == signal.SIGINT else 'stopped by ' + signal.Signals(signum).name}",
              file=sys.stderr)
        return 128 + int(signum)  # (130 for Ctrl-C, 143 for SIGTERM, as the shell reports signals)
    except ImportError as e:
        from wsss._library import OpLibraryError

        if not isinstance(e, OpLibraryError):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)  # (a missing or mismatched op library: how to rebuild)
        return 2
    finally:
        if installed is not None:
            installed[0].close()
            for signum, disposition in installed[1].items():
                signal.signal(signum, disposition)
            if installed[0].sigchld is not None and signal.getsignal(signal.SIGCHLD) is _child_ended:
                signal.signal(signal.SIGCHLD, installed[0].sigchld)
            sys.unraisablehook = unraisable_hook

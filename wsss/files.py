"""Temporary files that become results by ``os.replace`` (a result appears whole or not at all)."""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

_umask_lock = threading.Lock()


def process_umask() -> int:
    """The process's file-mode creation mask, read without changing it where /proc says it
    (Linux 4.7 and later).

    NB: ``os.umask`` can only be read by setting it.  The mask is process-wide, so two threads
    doing set-then-restore at once can leave it at 0 for good (every later file world-writable),
    and any file another thread creates in between gets mode 0666.  The fallback does it under a
    lock, which protects against this package's threads only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_temp_file(folder, prefix: str, suffix: str) -> Tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder``, with the permissions a plainly created file would get
    (mkstemp alone gives 0600, and the result it becomes must be as readable as any other file).
    Returns (open descriptor, path)."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.chmod(path, 0o666 & ~process_umask())
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, path


def probe_writable(folder) -> None:
    """Create and remove a file in ``folder``; OSError where that cannot be done.

    NB: a real file, not ``os.access``, which says yes to root on sysfs and read-only mounts
    and knows nothing of quotas or ACLs."""
    fd, path = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    os.close(fd)
    os.unlink(path)


def lock_folder(folder) -> Optional[int]:
    """An exclusive lock on ``folder`` (flock on the folder itself: no lock file to leave
    behind), held until the returned descriptor is closed; BlockingIOError while another
    process holds it; None where the file system cannot lock (the caller goes on unlocked)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # (ENOLCK, EOPNOTSUPP: no locks here)
        os.close(fd)
        return None
    return fd


def lock_output_folder(folder, name=None) -> Optional[int]:
    """lock_folder, with a second run into ``folder`` meanwhile refused in one line (WsssError
    "NAME: another run is writing this output folder now ..."; ``name`` defaults to the
    folder's path)."""
    from wsss.errors import WsssError

    try:
        return lock_folder(folder)
    except BlockingIOError:
        raise WsssError(f"{folder if name is None else name}: another run is writing this output folder now (one "
                        f"run at a time per folder)") from None


def missing_folders(folder) -> Tuple[List[str], str]:
    """The folders on the way to ``folder`` (itself included) that do not exist, deepest first,
    and the nearest one that exists (a file, where the path runs under one)."""
    missing, folder = [], os.path.abspath(folder)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing, folder


@contextlib.contextmanager
def made_folders(folder) -> Iterator[List[str]]:
    """Context manager: ``folder`` made with its missing parents (``os.makedirs``) where it does
    not exist; on an error in the block (Ctrl-C included) the folders this made are removed
    again, deepest first, as long as they are empty (the first that is not stops it).  Yields
    the folders made."""
    made, _ = missing_folders(folder)
    if made:
        os.makedirs(folder, exist_ok=True)
    try:
        yield made
    except BaseException:
        for path in made:
            try:
                os.rmdir(path)
            except OSError:  # (not empty: something was written there)
                break
        raise


@contextlib.contextmanager
def atomic_path(final, tag: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success ``os.replace`` it into place, on any
    error (Ctrl-C included) delete it: a result is whole or absent.

    NB: the temporary name is ``.<final name>.<tag><random>.tmp``: hidden, and never with the
    result's suffix, so a killed process never leaves a file that looks like a result."""
    final = Path(final)
    fd, tmp = new_temp_file(final.parent, f".{final.name}.{tag}", ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(final, write: Callable[[str], None]) -> None:
    """``write(temporary path)``, then the temporary becomes ``final`` (``atomic_path``); the
    folder is made if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    with atomic_path(final) as tmp:
        write(str(tmp))


def save_png(path, array, palette=None) -> None:
    """uint8 array [H, W] or [H, W, 3] as a PNG, atomically; with ``palette`` (PIL's flat list) a
    palette PNG whose pixel values are the array's (class indices)."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img.putpalette(palette)  # "L" -> "P", values kept
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))

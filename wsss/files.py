"""Temporary files that become results by ``os.replace`` (a result appears whole or not at all)."""
from __future__ import annotations

import os
import tempfile
import threading
from typing import Tuple

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

"""Find and load the compiled op library exactly once, with a clear error if it cannot be used."""
from __future__ import annotations

import glob
import os
import threading

import torch

_LOCK = threading.Lock()
_LOADED: str | None = None

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation --force-reinstall --no-deps ."


class OpLibraryError(ImportError):
    """The wsss op library is missing, or was built against another torch."""


def library_path() -> str:
    """Path of the op library shared object inside the installed package."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_ops*.so")) + glob.glob(os.path.join(here, "_ops*.pyd")))
    if not found:
        source_tree = os.path.exists(os.path.join(os.path.dirname(here), "setup.py"))
        hint = (
            " (this is the source folder: after `pip install .` the built package lives in "
            "site-packages; run from another folder, or build in place with "
            "`pip install --no-build-isolation -e .`)" if source_tree else ""
        )
        raise OpLibraryError(
            f"wsss: the op library (wsss/_ops*.so) is missing from {here}{hint}: the package was not "
            f"built; {REBUILD_HINT}"
        )
    return found[0]


def build_info() -> dict:
    try:
        from wsss._build_info import BUILD_INFO
    except ImportError:
        return {}
    return dict(BUILD_INFO)


def load() -> str:
    """Load the op library once per process (a second load from another path would abort)."""
    global _LOADED
    with _LOCK:
        if _LOADED is not None:
            return _LOADED
        built = build_info().get("torch_version")
        if built is not None and built != torch.__version__:
            raise OpLibraryError(
                f"wsss: the op library was built against torch {built} but torch "
                f"{torch.__version__} is installed; {REBUILD_HINT}"
            )
        path = library_path()
        if _already_registered():
            # Registered by someone else in this process (e.g. a host that loaded it first).
            _LOADED = path
            return path
        try:
            torch.ops.load_library(path)
        except OSError as e:
            raise OpLibraryError(f"wsss: could not load the op library {path}: {e}; {REBUILD_HINT}") from e
        _LOADED = path
        return path


def _already_registered() -> bool:
    try:
        torch.ops.wsss.gate_argmax.default
    except (AttributeError, RuntimeError):
        return False
    return True

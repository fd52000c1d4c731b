"""What every benchmark JSON records besides pytest-benchmark's machine info: which wsss was
measured (the installed package or a checkout: pytest's importlib mode imports the installed
one), its git revision where it is a checkout, and every WSSS_* setting of the run."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    import wsss

    where = Path(wsss.__file__).resolve().parent
    try:
        revision = subprocess.run(["git", "-C", str(where), "describe", "--always", "--dirty"], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    machine_info["wsss"] = {"path": str(where), "version": getattr(wsss, "__version__", None),
                            "git_revision": revision, "torch": torch.__version__,
                            "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("WSSS_")}}

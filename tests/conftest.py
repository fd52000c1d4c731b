"""Test-session setup shared by every test file."""
import os

# NB: tests start `python -m wsss...`, `python -c ...` and tools/cpp_host/check.sh with the
# repository as working directory.  Python would then put the source folder first on
# sys.path and import ./wsss, which has no compiled op library after a plain `pip install .`
# (the build goes to site-packages).  PYTHONSAFEPATH (Python >= 3.11) keeps the working
# directory off sys.path in every child process, so they import the installed package.
os.environ.setdefault("PYTHONSAFEPATH", "1")

import sys  # noqa: E402

# NB: helper modules shared by several test files (tests/runner_kit.py) are imported by name;
# with --import-mode=importlib pytest does not put this folder on sys.path itself.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot create files in: a read-only one, or for root (whom
    permissions do not stop) sysfs, which refuses new files to everyone."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        return ro
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("running as root with no /sys/kernel to stand for an unwritable folder")
    return Path("/sys/kernel")

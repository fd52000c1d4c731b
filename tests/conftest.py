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

"""The C++ host (tools/cpp_host) reproduces the Python bundle outputs: labels bit for bit."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "tools" / "cpp_host" / "check.sh"


@pytest.mark.slow
def test_cpp_host_matches_python_bit_for_bit_and_refuses_bad_arguments():
    """Builds the host (a few minutes on 2 shared cores the first time; incremental after) and runs check.sh."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} on PATH: the C++ host cannot be built here")
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(CHECK)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "labels: bit for bit equal" in output and "check.sh: OK" in output, output[-4000:]

    # The host check.sh just built refuses bad arguments in one line (here, not in a test of its
    # own: that would depend on this one having run first).
    host = REPO / "tools" / "cpp_host" / "build" / "wsss_host"
    result = subprocess.run([str(host), "--ops", "/nonexistent/libwsss.so", "--bundle", "x.pt"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("wsss_host: error: cannot load the wsss op library /nonexistent/libwsss.so")
    result = subprocess.run([str(host), "--bogus"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr

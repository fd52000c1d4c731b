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
def test_cpp_host_matches_python_bit_for_bit():
    """Builds the host (a few minutes on 2 shared cores the first time; incremental after) and runs check.sh."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} on PATH: the C++ host cannot be built here")
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(CHECK)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "labels: bit for bit equal" in output and "check.sh: OK" in output, output[-4000:]


def test_host_refuses_bad_arguments_with_one_line():
    host = REPO / "tools" / "cpp_host" / "build" / "wsss_host"
    if not host.exists():
        pytest.skip("tools/cpp_host/build/wsss_host not built yet (test_cpp_host_matches_python_bit_for_bit builds it)")
    result = subprocess.run([str(host), "--ops", "/nonexistent/libwsss.so", "--bundle", "x.pt"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("wsss_host: error: cannot load the wsss op library /nonexistent/libwsss.so")
    result = subprocess.run([str(host), "--bogus"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr

"""The C++ host (tools/cpp_host) reproduces the Python bundle outputs: labels bit for bit.

check.sh builds the host (into $BUILD_DIR, default tools/cpp_host/build) and compares it with
Python; with WSSS_CHECK_PT2=1 in the environment it also exports an AOTInductor .pt2 and runs it
on 1, 2 and 9 tiles.  The other tests here run the host check.sh built (the `host` fixture runs
check.sh once per module) on inputs that must be refused in one line with exit 2, never abort.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "tools" / "cpp_host" / "check.sh"
# where check.sh builds the host (it reads BUILD_DIR too; relative to the repository, its cwd here)
BUILD_DIR = REPO / os.environ.get("BUILD_DIR", "tools/cpp_host/build")


@pytest.fixture(scope="module")
def check_run():
    """check.sh, run once (a few minutes on 2 shared cores the first time; incremental after)."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} on PATH: the C++ host cannot be built here")
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(CHECK)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def host(check_run) -> Path:
    rc, output = check_run
    path = BUILD_DIR / "wsss_host"
    if not path.exists():
        pytest.fail(f"check.sh built no host at {path} (rc {rc}):\n{output[-3000:]}")
    return path


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    """A tiny wsss bundle (as check.sh makes it), so that the host gets past loading the model."""
    import torch

    from wsss.bundle import save_bundle
    from wsss.models import DeepLabV3Plus, ResNet38Classifier, TissueSegmenter

    torch.manual_seed(0)
    module = TissueSegmenter(ResNet38Classifier(4, width=0.0625),
                             DeepLabV3Plus(4, backbone="resnet50", width=0.0625), eps=0.1).eval()
    meta = {"class_names": ["TE", "NEC", "LYM", "TAS"],
            "palette": [[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0], [255, 255, 255]],
            "background_index": 4, "tile_size": 16, "mpp": 1.0, "config": {"check": "test_cpp_host"}}
    path = tmp_path_factory.mktemp("cpp_host") / "model.pt"
    save_bundle(str(path), module, meta)
    return path


@pytest.fixture(scope="module")
def ops_library() -> Path:
    import wsss

    return Path(wsss._library.library_path())


def run_host(host, *args, cwd=None):
    return subprocess.run([str(host), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def assert_refused(result, pattern: str):
    """Exit 2 with exactly one line on stderr that matches pattern (not a signal: -8 SIGFPE, -6 abort)."""
    err = result.stderr
    assert result.returncode == 2, f"rc {result.returncode}: {err[-2000:]}"
    assert len(err.strip().splitlines()) == 1 and err.startswith("wsss_host: error: "), err[-2000:]
    assert re.search(pattern, err), err


@pytest.mark.slow
def test_cpp_host_matches_python_bit_for_bit(check_run):
    rc, output = check_run
    assert rc == 0, output[-4000:]
    assert "labels: bit for bit equal" in output and "check.sh: OK" in output, output[-4000:]
    if os.environ.get("WSSS_CHECK_PT2") == "1":  # a .pt2 on one tile and on more than its max batch
        assert "pt2 on 1 tile and on 9 tiles (max batch 4): equal to Python's" in output, output[-4000:]
        assert "pt2 without wsss_max_batch (older export): batches of 2" in output, output[-4000:]


@pytest.mark.slow
def test_cpp_host_refuses_bad_arguments(host):
    result = run_host(host, "--ops", "/nonexistent/libwsss.so", "--bundle", "x.pt", "--print-metadata")
    assert result.returncode == 2
    assert result.stderr.startswith("wsss_host: error: cannot load the wsss op library /nonexistent/libwsss.so")
    # arguments are checked before anything is loaded
    result = run_host(host, "--ops", "/nonexistent/libwsss.so", "--bundle", "x.pt")
    assert result.returncode == 2 and result.stderr == "wsss_host: error: --tile is required\n"
    result = run_host(host, "--bogus")
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr


@pytest.mark.slow
def test_cpp_host_refuses_tile_sizes_whose_byte_count_overflows(host, small_bundle, ops_library, tmp_path):
    """H * W * 3 wrapped to 0 (then SIGFPE dividing by it) or to -3 (N = -1: an uncaught
    exception from from_blob, abort)."""
    tiles = tmp_path / "t.rgb"
    tiles.write_bytes(bytes(12))
    for height, width in (("4294967296", "4294967296"), ("4", "4611686018427387903"),
                          ("3074457345618258603", "1")):
        result = run_host(host, "--ops", ops_library, "--bundle", small_bundle, "--tile", tiles,
                          "--height", height, "--width", width, "--labels", tmp_path / "l.u8",
                          "--probs", tmp_path / "p.f32")
        assert_refused(result, f"--height {height} --width {width}: a tile of that size has more bytes")
    assert not (tmp_path / "l.u8").exists() and not (tmp_path / "p.f32").exists()


@pytest.mark.slow
def test_cpp_host_range_checks_threads(host, small_bundle, ops_library, tmp_path):
    """--threads 2147483648 became a negative int and at::set_num_threads threw outside any handler."""
    for value, message in (("2147483648", "--threads must be at most 1024, got 2147483648"),
                           ("0", "--threads must be a positive integer, got '0'"),
                           ("99999999999999999999", "--threads must be a positive integer")):
        result = run_host(host, "--ops", ops_library, "--bundle", small_bundle, "--print-metadata",
                          "--threads", value)
        assert_refused(result, re.escape(message))


@pytest.mark.slow
def test_cpp_host_says_a_folder_is_a_folder(host, small_bundle, ops_library, tmp_path):
    """--tile naming a folder aborted (uncaught std::ios_failure); --bundle naming one was called a
    corrupted checkpoint."""
    result = run_host(host, "--ops", ops_library, "--bundle", small_bundle, "--tile", tmp_path,
                      "--height", 16, "--width", 16, "--labels", tmp_path / "l.u8", "--probs", tmp_path / "p.f32")
    assert_refused(result, f"cannot read {re.escape(str(tmp_path))} \\(is a directory\\)")
    result = run_host(host, "--ops", ops_library, "--bundle", tmp_path, "--print-metadata")
    assert_refused(result, f"--bundle {re.escape(str(tmp_path))} is a directory")
    result = run_host(host, "--ops", tmp_path, "--bundle", small_bundle, "--print-metadata")
    assert_refused(result, "cannot load the wsss op library .*: it is a directory")


@pytest.mark.slow
def test_cpp_host_takes_a_bare_ops_file_name_in_the_current_folder(host, small_bundle, ops_library):
    """--ops _ops.so (no '/') made dlopen search the library path, not the current folder."""
    result = run_host(host, "--ops", ops_library.name, "--bundle", small_bundle, "--print-metadata",
                      cwd=ops_library.parent)
    assert result.returncode == 0, result.stderr
    assert '"class_names"' in result.stdout


@pytest.mark.slow
def test_cpp_host_usage_names_the_op_library_python_loads(host):
    """The usage said --ops libwsss_ops.so; the library is wsss/_ops*.so (wsss._library.library_path())."""
    result = run_host(host, "--help")
    assert result.returncode == 0
    assert "wsss._library.library_path()" in result.stdout
    source = (REPO / "tools" / "cpp_host" / "main.cpp").read_text()
    assert "libwsss_ops" not in source
    known = re.search(r"known = \{([^}]*)\}", source).group(1)
    for flag in re.findall(r'"(--[a-z0-9-]+)"', known) + ["--print-metadata"]:
        assert flag in result.stdout, f"--help does not mention {flag}"

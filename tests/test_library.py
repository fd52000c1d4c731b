"""Loading the op library: once per process, and a clear message when it cannot be used."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wsss


def _package_copy(tmp_path: Path, *, keep_library: bool, torch_version: str | None = None) -> Path:
    src = Path(wsss.__file__).parent
    dst = tmp_path / "site" / "wsss"
    ignore = shutil.ignore_patterns("__pycache__", *([] if keep_library else ["_ops*.so"]))
    shutil.copytree(src, dst, ignore=ignore)
    if torch_version is not None:
        info = dict(wsss._library.build_info(), torch_version=torch_version)
        (dst / "_build_info.py").write_text(f"BUILD_INFO = {info!r}\n")
    return dst.parent


# Import the copy, not the installed package (an editable install's finder would win otherwise).
_IMPORT_COPY = (
    "import sys\n"
    "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "import wsss\n"
    "assert wsss.__file__.startswith(sys.argv[1]), wsss.__file__\n"
    "import wsss.ops\n"
)


def _import(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _IMPORT_COPY, str(site)], capture_output=True, text=True, timeout=120)


def test_missing_library_says_so_and_how_to_rebuild(tmp_path):
    r = _import(_package_copy(tmp_path, keep_library=False))
    assert r.returncode != 0
    assert "the op library (wsss/_ops*.so) is missing" in r.stderr
    assert "pip install" in r.stderr
    assert "Segmentation fault" not in r.stderr and "Aborted" not in r.stderr


def test_library_built_against_other_torch_says_so(tmp_path):
    r = _import(_package_copy(tmp_path, keep_library=True, torch_version="1.0.0"))
    assert r.returncode != 0
    assert "built against torch 1.0.0 but torch" in r.stderr
    assert "pip install" in r.stderr


def test_library_already_loaded_from_another_path_is_not_loaded_again(tmp_path):
    # Loading the same ops from a second path aborts the process in a static initializer
    # (one TORCH_LIBRARY per namespace).  A host may have loaded a copy first: import wsss
    # must notice the namespace is registered and not load its own.
    site = _package_copy(tmp_path, keep_library=True)
    other = next((site / "wsss").glob("_ops*.so"))
    code = (
        "import torch, sys\n"
        "torch.ops.load_library(sys.argv[1])\n"
        "import wsss\n"
        "print(wsss.ops.gate_argmax(torch.zeros(1, 2, 1, 1), torch.ones(1, 2), 0.5).tolist())\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(other)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[[[0]]]"


def test_wsss_info_reports_backends_and_threads():
    env = {k: v for k, v in os.environ.items() if k != "WSSS_READER_PROCESSES"}
    r = subprocess.run([sys.executable, "-m", "wsss.info", "--json"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info["op_backends"]) >= {"pda_attention", "pda_pool", "gate_argmax", "gradcam", "band_accumulate",
                                        "band_finalize", "deflate_tiles", "inflate_tiles"}
    for keys in info["op_backends"].values():
        assert "CPU" in keys and "Meta" in keys
    assert info["op_backends"]["pda_pool"].count("Autograd") == 1
    assert info["threads"] >= 1
    assert info["built_against"]["torch_version"] == info["torch"]
    assert isinstance(info["cpu"]["bf16_matrix_units"], bool)
    assert info["runner"]["reader_processes_on_cuda"] == ((os.cpu_count() or 1) >= 8)  # (WSSS_READER_PROCESSES unset)
    text = subprocess.run([sys.executable, "-m", "wsss.info"], capture_output=True, text=True, env=env, timeout=120)
    assert "wsss::gate_argmax" in text.stdout and "bf16 matrix units" in text.stdout and "runner with a model on CUDA" in text.stdout


def test_library_shares_the_process_libstdcxx():
    """The op library must use the process's (torch's) shared libstdc++, not carry a static copy
    (a link with -static-libstdc++): a private copy's locale is never set up, so iostream number
    formatting in it cut error messages short here and segfaulted on a GPU machine."""
    from wsss._library import library_path

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed (it comes with the compiler that builds the op library)")
    r = subprocess.run([nm, "--defined-only", "-C", library_path()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    private = [line for line in r.stdout.splitlines()
               if re.search(r"std::locale::|std::ios_base::Init|std::basic_ostream<[^>]*>::_M_insert", line)]
    assert not private, (f"{library_path()} defines {len(private)} libstdc++ internals (a static copy, e.g. "
                         f"LDFLAGS=-static-libstdc++), such as {private[:3]}")


def test_a_command_without_its_library_says_so_in_one_line(tmp_path):
    """The commands load the op library when they need it (their --help does not): a missing one
    is one line naming it and how to rebuild, exit 2, not an ImportError traceback."""
    site = _package_copy(tmp_path, keep_library=False)
    code = (_IMPORT_COPY.replace("import wsss.ops\n", "")
            + "from wsss.cli.export import main\n"
            "sys.exit(main(['--classifier', sys.argv[2], '--segmenter', sys.argv[2], '--out', sys.argv[3]]))\n")
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    r = subprocess.run([sys.executable, "-c", code, str(site), str(ckpt), str(tmp_path / "m.pt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("wsss-export: error: ") and "op library" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr

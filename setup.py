"""Build the wsss op library: a plain shared object with CPU (and CUDA) kernels.

Switches (environment):
  WSSS_BUILD_CUDA=auto|1|0   auto (default): CUDA kernels when torch is a CUDA build and
                             nvcc is present (never decided from torch.cuda.is_available(),
                             which is False on GPU-less build machines).
  TORCH_CUDA_ARCH_LIST       architectures, default "7.5;8.0;9.0+PTX" (the SASS of T4, A100 and H100 class GPUs, PTX for newer) when no GPU is visible.
  WSSS_DEBUG=1               -O0 -g.
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda"]
    if nvcc:
        # NB: /usr/local/bin/nvcc may be a wrapper; torch would then guess CUDA_HOME=/usr/local
        # and miss libcudart.  Prefer the toolkit folder that really holds nvcc and lib64.
        real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        candidates = [real] + candidates
    for c in candidates:
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and glob.glob(os.path.join(c, "lib*", "libcudart*")) + glob.glob(os.path.join(c, "targets", "*", "lib", "libcudart*")):
            return c
    return None


def _want_cuda() -> bool:
    import torch

    mode = os.environ.get("WSSS_BUILD_CUDA", "auto").lower()
    if mode in ("0", "no", "false", "off"):
        return False
    cuda_home = _find_cuda_home()
    if mode in ("1", "yes", "true", "on"):
        if torch.version.cuda is None or cuda_home is None:
            sys.exit("wsss setup: WSSS_BUILD_CUDA=1 but torch is not a CUDA build or nvcc/CUDA_HOME was not found")
        return True
    return torch.version.cuda is not None and cuda_home is not None


def _shared_libstdcxx_link_args() -> list:
    """Link args that keep libstdc++ shared when the C++ compiler would link a static copy.

    NB: a GPU machine's environment set CXX=/opt/gcc/bin/g++, a toolchain without a shared
    libstdc++.so: the op library got a private static copy of libstdc++ (180 of its internals),
    whose iostreams were never initialised - error messages formatted there segfaulted.  Such a
    compiler prints a bare name for -print-file-name=libstdc++.so; then the op library is linked
    against the libstdc++.so.6 this process (torch) uses, which comes first, so nothing is taken
    from the static archive.  (tests/test_library.py checks the built library.)
    """
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        found = subprocess.run(shlex.split(cxx) + ["-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []  # the compiler links the shared library itself
    import torch  # noqa: F401  (loads the process's libstdc++)

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libstdc++.so" in line})
    except OSError:
        paths = []
    if not paths:
        print(f"wsss setup: WARNING: {cxx} has no shared libstdc++ and the one in use was not found; the op "
              f"library may get a static copy (set CXX to the system compiler)", file=sys.stderr)
        return []
    print(f"wsss setup: {cxx} has no shared libstdc++.so; linking {paths[0]} (the one torch uses) instead of "
          f"a static copy", file=sys.stderr)
    return [paths[0]]


def _extensions():
    want_cuda = _want_cuda()
    if want_cuda:
        os.environ["CUDA_HOME"] = _find_cuda_home()
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "7.5;8.0;9.0+PTX"
    import torch
    from torch.utils import cpp_extension

    debug = os.environ.get("WSSS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx = opt + ["-fopenmp", "-std=c++20", "-fvisibility=hidden"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/composite/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    # NB: rpath to torch/lib so C++ hosts find libc10/libtorch_cpu; $ORIGIN form for installs
    # next to torch in site-packages, absolute form for editable/in-tree builds.
    link = ["-fopenmp", f"-Wl,-rpath,{torch_lib}", "-Wl,-rpath,$ORIGIN/../torch/lib", "-Wl,--no-undefined"]
    link += _shared_libstdcxx_link_args()
    kwargs = dict(extra_link_args=link)
    if want_cuda:
        # NB: on GPU machines without a toolkit, libcudart comes from the nvidia wheel that torch
        # depends on (site-packages/nvidia/cu*/lib); C++ hosts need an rpath to find it.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib"))):
            if glob.glob(os.path.join(d, "libcudart.so*")):
                rel = os.path.relpath(d, site)
                link += [f"-Wl,-rpath,{d}", f"-Wl,-rpath,$ORIGIN/../{rel}"]
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "wsss._ops",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            # (WSSS_WITH_CUDA_KERNELS: the composite ops leave the CUDA key to the kernels in csrc/cuda)
            extra_compile_args={"cxx": cxx + ["-DWSSS_WITH_CUDA_KERNELS"],
                                "nvcc": opt[:1] + ["-std=c++20", "--expt-relaxed-constexpr"]},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(
            "wsss._ops", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx}, **kwargs,
        )
    # NB: no libtorch_python and no Python symbols: the op library is a plain shared object
    # that a C++ host can dlopen.  (It also has no PyInit: load it with torch.ops.load_library.)
    ext.libraries = [l for l in ext.libraries if l != "torch_python"]
    _write_build_info(want_cuda)
    return [ext], cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True, use_ninja=shutil.which("ninja") is not None)


def _write_build_info(with_cuda: bool) -> None:
    import torch

    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
    }
    with open(os.path.join(ROOT, "wsss", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time; the op library was built against this.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


ext_modules, build_ext = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})

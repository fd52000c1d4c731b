"""`wsss-info` / `python -m wsss.info`: versions, op backends, threads, CPU matrix units.

Prints what a bug report needs and what decides speed: which backends each wsss op has
(from the dispatcher, not from build flags), the torch it was built against, the CPU
features that matter for bfloat16 inference, the thread count, and what the whole-slide
runner's GPU path will use here (worker processes for tile reads and outlines, the shared
memory their tile ring lives in).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Optional, Sequence

OPS = ("pda_attention", "pda_attention_backward", "pda_pool", "pda_pool_backward", "gate_argmax", "gradcam",
       "band_accumulate", "band_finalize", "deflate_tiles", "inflate_tiles", "majority_downsample")


def cpu_features() -> dict:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "bf16_matrix_units": "amx_bf16" in flags or "avx512_bf16" in flags,
    }


def op_backends() -> dict:
    import torch

    table = {}
    for name in OPS:
        keys = []
        for key in ("CPU", "CUDA", "Meta", "Autograd"):
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"wsss::{name}", key):
                    keys.append(key)
            except RuntimeError:
                pass
        table[name] = keys
    return table


def runner_info() -> dict:
    """The runner's helper processes on this host (with a CUDA model) and its shared memory."""
    import os
    import shutil

    from wsss.runner import pipeline, tile_stage

    try:
        shm_mb = shutil.disk_usage("/dev/shm").free >> 20
    except OSError:
        shm_mb = None
    return {"cores": os.cpu_count(), "reader_processes_on_cuda": tile_stage.reader_processes("cuda"),
            "outline_processes_on_cuda": pipeline.OUTLINE_PROCESSES, "shared_memory_free_mb": shm_mb}


def collect() -> dict:
    import torch

    import wsss
    import wsss.ops  # noqa: F401  (the op library, with its Python fakes and autograd registered)
    from wsss import _library

    return {
        "wsss": wsss.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "op_library": _library.load(),
        "built_against": _library.build_info(),
        "op_backends": op_backends(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_features(),
        "runner": runner_info(),
    }


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(prog="wsss-info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"wsss {info['wsss']}  (python {info['python']}, {info['platform']})")
    print(f"torch {info['torch']}  cuda build: {info['torch_cuda']}  cuda available: {info['cuda_available']}"
          + (f"  devices: {', '.join(info['cuda_devices'])}" if info["cuda_devices"] else ""))
    b = info["built_against"]
    print(f"op library {info['op_library']}")
    print(f"  built against torch {b.get('torch_version')}, CUDA kernels: {b.get('with_cuda')}"
          + (f" (arch {b.get('cuda_arch_list')})" if b.get("with_cuda") else ""))
    print("op backends:")
    for name, keys in info["op_backends"].items():
        print(f"  wsss::{name:<24} {', '.join(keys)}")
    cpu = info["cpu"]
    print(f"threads {info['threads']}  cpu capability {info['cpu_capability']}  "
          f"avx2 {cpu['avx2']}  avx512f {cpu['avx512f']}  bf16 matrix units "
          f"{'yes' if cpu['bf16_matrix_units'] else 'no'} (amx_bf16 {cpu['amx_bf16']}, avx512_bf16 {cpu['avx512_bf16']})")
    r = info["runner"]
    shm = "no /dev/shm" if r["shared_memory_free_mb"] is None else f"/dev/shm {r['shared_memory_free_mb']} MB free"
    n = r["outline_processes_on_cuda"]
    gpu = "" if info["cuda_available"] else ", were there a GPU"
    print(f"runner with a model on CUDA ({r['cores']} cores{gpu}): tiles read in "
          f"{'worker processes' if r['reader_processes_on_cuda'] else 'threads'}, outlines traced in "
          f"{f'{n} worker process' + ('es' if n > 1 else '') if n else 'threads'}; {shm}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from wsss.cli import run

    return run("wsss-info", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

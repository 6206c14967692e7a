"""Part 1 of `drseg bench gpu`: what the machine is — GPU, versions, cores, which optional packages import — and two
reference figures every other number can be read against: bf16 matmul TFLOP/s and device-to-device copy GB/s."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
from typing import Any

import torch

from hpc_drseg.gpu_check.context import Context
from hpc_drseg.gpu_check.plan import DRY_SIZES
from hpc_drseg.train.bench import time_steps

OPTIONAL_IMPORTS = (
    "triton",
    "accelerate",
    "albumentations",
    "webdataset",
    "submitit",
    "deepspeed",
    "pytest",
    "sklearn",
    "tensorboard",
    "cv2",
    "PIL",
    "tqdm",
)


def import_report(names: tuple[str, ...] = OPTIONAL_IMPORTS, imported: bool = True) -> dict[str, str]:
    """name -> version (or "ok") when it imports, else "missing: <error>". `imported=False` only looks for each
    package ("found"), which costs nothing: a dry run on a loaded 2-core machine would spend ~20 s importing them."""
    report = {}
    for name in names:
        if not imported:
            report[name] = "found (not imported)" if importlib.util.find_spec(name) else "missing"
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # an import may fail with anything (a broken wheel, a missing shared library)
            report[name] = f"missing: {type(exc).__name__}: {exc}"[:200]
            continue
        report[name] = str(getattr(module, "__version__", "ok"))
    return report


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, iters: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_steps(lambda: torch.matmul(a, b, out=out), warmup=3, steps=iters, device=device)
    return 2 * n**3 / timing.step_s / 1e12


def copy_gbps(device: torch.device, mib: int, iters: int = 20) -> float:
    """Bytes read plus bytes written per second of `dst.copy_(src)` (random data: zeros can run faster)."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_steps(lambda: dst.copy_(src), warmup=3, steps=iters, device=device)
    return 2 * src.numel() * 4 / timing.step_s / 1e9


def _device_facts(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"device": f"cpu ({platform.processor() or platform.machine()})"}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def run(ctx: Context) -> None:
    cuda = torch.cuda.is_available() and not ctx.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    imports = import_report(imported=not ctx.dry_run)
    # bf16 is the training precision on a GPU; on a CPU without bf16 units fp32 is the meaningful reference, at the
    # dry run's sizes (an 8192³ fp32 matmul takes minutes on a CPU)
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = ctx.sizes if cuda else DRY_SIZES
    ctx.emit(
        {
            "kind": "environment",
            "cuda_available": torch.cuda.is_available(),
            "dry_run": ctx.dry_run,
            **_device_facts(device),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": imports["triton"],
            "nproc": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "matmul_n": sizes.matmul_n,
            "matmul_dtype": str(dtype).removeprefix("torch."),
            "matmul_tflops": matmul_tflops(device, sizes.matmul_n, dtype),
            "copy_mib": sizes.copy_mib,
            "copy_gbps": copy_gbps(device, sizes.copy_mib),
            "imports": imports,
        }
    )

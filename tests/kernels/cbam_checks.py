"""Parity checks of the fused Triton CBAM against the eager reference of models/cbam.py in float64, shared by
test_cbam_triton.py: run in-process on CUDA, or as this script in a subprocess started with TRITON_INTERPRET=1 on CPU
(Triton picks its interpreter when it is first imported, which a pytest process did long before any test runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from hpc_drseg.kernels import bench, cbam_launch, cbam_triton
from hpc_drseg.models import CBAM
from hpc_drseg.models import cbam as cbam_module
from hpc_drseg.models.cbam import cbam_eager

RESULT_PREFIX = "CBAM-CHECKS "
GRAD_NAMES = ("x", "w_fc1", "w_fc2", "w_spatial")
# ‖triton − float64 reference‖ / ‖reference‖. bf16: the interpreter rounds fp32 → bf16 toward zero (≈3.4e-3 here,
# eager ≈2e-3); compiled Triton rounds to nearest, as eager does.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}

KERNEL_NAMES = (
    "pool_hw_kernel",
    "channel_mlp_kernel",
    "channel_stats_kernel",
    "spatial_gate_kernel",
    "spatial_grad_kernel",
    "channel_grad_kernel",
    "mlp_backward_kernel",
    "input_grad_kernel",
)
RAGGED = {"channels": 40, "shape": (2, 9, 11)}  # 40 = 32 + 8 channels, 9·11 = 64 + 35 pixels: ragged blocks
# 16×16 tiles and 64 programs asked for: F1 splits the 63 pixels, F3/B4 split the 20 channels across programs
SPLIT = {"channels": 20, "shape": (1, 7, 9), "programs": 64, "max_tile": 256}
CASES: dict[str, dict[str, Any]] = {
    "fp32_nchw": RAGGED,
    "fp32_channels_last": {**RAGGED, "channels_last": True},
    "fp32_split_nchw": SPLIT,
    "fp32_split_channels_last": {**SPLIT, "channels_last": True},
    # 8 // 16 → one hidden unit (seed 3: not dead, so the MLP weights get gradients); 3×3 spatial kernel
    "fp32_k3_one_hidden_unit": {"channels": 8, "shape": (1, 5, 7), "k": 3, "channels_last": True, "seed": 3},
    "bf16_nchw": {**RAGGED, "dtype": "bfloat16"},
    "bf16_channels_last": {**RAGGED, "dtype": "bfloat16", "channels_last": True},
    "fp16_channels_last": {**RAGGED, "dtype": "float16", "channels_last": True},
    "ties_fp32": {"channels": 32, "shape": (2, 6, 7), "ties": True},
    "ties_bf16_channels_last": {
        "channels": 32,
        "shape": (2, 6, 7),
        "ties": True,
        "dtype": "bfloat16",
        "channels_last": True,
    },
    # more images than one block of B4's weight-gradient products (16)
    "fp32_batch_17": {"channels": 8, "shape": (17, 3, 4), "k": 3},
    # as in training: bf16 activations, fp32 weights of a channels_last model (its (1, 2, 7, 7) weight is strided)
    "bf16_x_fp32_channels_last_weights": {
        **RAGGED,
        "dtype": "bfloat16",
        "weight_dtype": "float32",
        "channels_last": True,
        "weights_channels_last": True,
    },
}


# ---------------------------------------------------------------------------------- checks (subprocess or GPU)
def make_case(
    channels: int,
    shape: tuple[int, int, int],
    k: int = 7,
    dtype: str = "float32",
    channels_last: bool = False,
    ties: bool = False,
    device: str = "cpu",
    seed: int = 0,
    weight_dtype: str | None = None,
    weights_channels_last: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[x, w_fc1, w_fc2, w_spatial] and an upstream gradient, random (with planted exact ties if `ties`)."""
    gen = torch.Generator().manual_seed(seed)
    b, h, w = shape
    hidden = max(1, channels // 16)
    x = torch.randn(b, channels, h, w, generator=gen)
    if ties:
        x = x.relu()  # post-ReLU maps, as CBAM sees them: exact zeros tie
        x[:, 1] = 0.0  # dead channel: all H·W entries tie for its max
        x[:, 2] = 0.5  # constant channel: the same with a non-zero max
        x[0, :, 2, 3] = 0.0  # all-zero pixel: all C entries of x·gate tie for its channel max
        x[-1, :, -1, :] = 0.0
    weights = [
        torch.randn(hidden, channels, 1, 1, generator=gen) * 0.3,
        torch.randn(channels, hidden, 1, 1, generator=gen) * 0.3,
        torch.randn(1, 2, k, k, generator=gen) * 0.2,
    ]
    upstream = torch.randn(x.shape, generator=gen)
    dt = getattr(torch, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    wdt = getattr(torch, weight_dtype) if weight_dtype else dt
    wfmt = torch.channels_last if weights_channels_last else torch.contiguous_format
    inputs = [x.to(device, dt).contiguous(memory_format=fmt)]
    inputs += [t.to(device, wdt).contiguous(memory_format=wfmt) for t in weights]
    return inputs, upstream.to(device, dt)


def run_with_grads(fn, inputs: list[torch.Tensor], upstream: torch.Tensor) -> tuple[torch.Tensor, tuple]:  # noqa: ANN001
    inputs = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, upstream.to(out.dtype))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖; 0 when both are zero (a dead ReLU gives the MLP weights no gradient), inf when only b is."""
    diff, norm = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


@contextlib.contextmanager
def launch_overrides(programs: int | None, max_tile: int | None) -> Iterator[None]:
    """Smaller tiles / more programs than the defaults pick for tiny maps, so split and chunk paths run."""
    saved = cbam_launch.target_programs, cbam_launch.MAX_TILE
    if programs is not None:
        cbam_launch.target_programs = lambda device: programs
    if max_tile is not None:
        cbam_launch.MAX_TILE = max_tile
    try:
        yield
    finally:
        cbam_launch.target_programs, cbam_launch.MAX_TILE = saved


def launch_shape(x: torch.Tensor) -> dict[str, int]:
    b, c, h, w = x.shape
    cfg = cbam_launch.launch_config(b, c, h * w, cbam_launch.target_programs(x.device))
    grids = cfg.grids(b, c, h * w)
    return {
        "block_c": cfg.block_c,
        "block_hw": cfg.block_hw,
        "c_blocks": grids.pool[1],
        "hw_blocks": grids.pixels[0],
        "pool_splits": grids.pool[2],
        "c_chunks": grids.chunks[2],
        "grad_programs": grids.grad[0],
        "grad_blocks_per_program": cfg.grad_chunk // cfg.block_hw,
    }


def check_case(spec: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Relative errors of the fused op's output and gradients against cbam_eager in float64, plus layout facts."""
    spec = dict(spec)
    overrides = spec.pop("programs", None), spec.pop("max_tile", None)
    inputs, upstream = make_case(**spec, device=device)
    with launch_overrides(*overrides):
        # fused first: its fresh buffers cannot inherit the reference's values from freed memory
        with cbam_launch.count_launches() as launches:
            out, grads = run_with_grads(cbam_triton.cbam_forward, inputs, upstream)
        launch = launch_shape(inputs[0])
    ref, ref_grads = run_with_grads(cbam_eager, [t.double() for t in inputs], upstream.double())
    errors = {"out": relative_error(out, ref)}
    errors.update({name: relative_error(g, r) for name, g, r in zip(GRAD_NAMES, grads, ref_grads)})
    fmt = torch.channels_last if spec.get("channels_last", False) else torch.contiguous_format
    return {
        "errors": errors,
        "reference_norms": {name: r.norm().item() for name, r in zip(("out", *GRAD_NAMES), (ref, *ref_grads))},
        "dtypes_kept": out.dtype == inputs[0].dtype and all(g.dtype == t.dtype for g, t in zip(grads, inputs)),
        "layout_kept": out.is_contiguous(memory_format=fmt) and (grads[0].is_contiguous(memory_format=fmt)),
        "weight_strides_kept": all(g.stride() == t.stride() for g, t in zip(grads[1:], inputs[1:])),
        "launch": launch,
        "launches": dict(launches),
    }


def check_opcheck(device: str) -> dict[str, str]:
    inputs, _ = make_case(16, (2, 5, 6), k=3, channels_last=True, device=device)
    return torch.library.opcheck(cbam_triton.cbam_fused, [t.requires_grad_(True) for t in inputs])


def check_module(device: str, compile_backend: str | None) -> dict[str, Any]:
    """CBAM(impl="triton") through models/cbam.py (optionally torch.compile'd) against cbam_eager in float64 on the
    weights of an eager CBAM loaded into it (float64: on a GPU, eager fp32 convs may run in TF32)."""
    torch.manual_seed(0)
    eager = CBAM(48).to(device)
    fused = CBAM(48, impl="triton").to(device)
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(2, 48, 7, 9, device=device).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape, device=device)
    run = torch.compile(fused, backend=compile_backend, fullgraph=True) if compile_backend else fused
    params = list(fused.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_in = x.clone().requires_grad_(True)
        out = run(x_in)
        grads = torch.autograd.grad(out, [x_in, *params], upstream)
        with torch.autocast(device, dtype=torch.bfloat16):
            autocast_dtype = fused(x).dtype
    weights = [p.detach().double() for p in eager.parameters()]
    ref, ref_grads = run_with_grads(cbam_eager, [x.double(), *weights], upstream.double())
    errors = {"out": relative_error(out, ref)}
    errors.update({name: relative_error(a, b) for name, a, b in zip(GRAD_NAMES, grads, ref_grads)})
    return {
        "active_impl": cbam_module.active_impl("triton", x),
        "fallback_warnings": [str(w.message) for w in caught if "falls back" in str(w.message)],
        "errors": errors,
        "autocast_dtype": str(autocast_dtype),
        "same_state_dict_keys": list(fused.state_dict()) == list(eager.state_dict()),
    }


def check_empty_batch(device: str) -> dict[str, Any]:
    inputs, _ = make_case(16, (1, 4, 5), device=device)
    x = inputs[0][:0].requires_grad_(True)
    out = cbam_triton.cbam_forward(x, *inputs[1:])
    (grad_x,) = torch.autograd.grad(out.sum(), [x])
    return {"shape": list(out.shape), "grad_shape": list(grad_x.shape)}


def check_bench_launches(device: str) -> dict[str, Any]:
    """The benchmark's launch count of the fused op, and that the same count comes back a second time."""
    inputs, upstream = make_case(24, (2, 5, 6), channels_last=True, device=device)
    counts = [bench.triton_launches_per_step(inputs[0], inputs[1:], upstream) for _ in range(2)]
    return {"counts": counts}


def run_checks(device: str) -> dict[str, Any]:
    """Every check, each caught on its own so one failure does not hide the others."""
    checks = {name: (lambda spec=spec: check_case(spec, device)) for name, spec in CASES.items()}
    checks["bench_launches"] = lambda: check_bench_launches(device)
    checks["opcheck"] = lambda: check_opcheck(device)
    checks["module"] = lambda: check_module(device, None)
    checks["compile_aot_eager"] = lambda: check_module(device, "aot_eager")
    checks["empty_batch"] = lambda: check_empty_batch(device)
    results = {}
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            results[name] = check()
        except Exception:  # reported by the test that reads this entry
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - started, 2)
    return results


if __name__ == "__main__":  # the interpreter subprocess of test_cbam_triton.py's `interpreter_results`
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (set before Python starts)")
    print(RESULT_PREFIX + json.dumps(run_checks("cpu")))

"""Fused Triton CBAM (hpc_drseg.kernels.cbam_triton) against the eager reference of models/cbam.py run in
float64: forward and all four gradients, fp32 tight and bf16/fp16 loose, NCHW and channels_last, ragged blocks, max
ties, custom-op checks (opcheck, fake tensors, torch.compile), the CBAM module hook; and the benchmark's CPU path.

Triton picks its interpreter when triton is first imported, which this pytest process did long ago (torch's
flop_counter imports it). So the CPU checks run in one subprocess started with TRITON_INTERPRET=1 (this file, run as a
script) and the tests assert on its results; the GPU-marked tests run the same checks in-process on CUDA.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from hpc_drseg.kernels import bench, cbam_triton  # noqa: E402
from hpc_drseg.models import CBAM  # noqa: E402
from hpc_drseg.models import cbam as cbam_module  # noqa: E402
from hpc_drseg.models.cbam import cbam_eager  # noqa: E402

RESULT_PREFIX = "CBAM-CHECKS "
GRAD_NAMES = ("x", "w_fc1", "w_fc2", "w_spatial")
# ‖triton − float64 reference‖ / ‖reference‖. bf16: the interpreter rounds fp32 → bf16 toward zero (≈3.4e-3 here,
# eager ≈2e-3); compiled Triton rounds to nearest, as eager does.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}

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
    inputs = [x.to(device, dt).contiguous(memory_format=fmt)] + [t.to(device, dt) for t in weights]
    return inputs, upstream.to(device, dt)


def run_with_grads(fn, inputs: list[torch.Tensor], upstream: torch.Tensor) -> tuple[torch.Tensor, tuple]:  # noqa: ANN001
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, upstream.to(out.dtype))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖; 0 when both are zero (a dead ReLU gives the MLP weights no gradient), inf when only b is."""
    diff, norm = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


@contextlib.contextmanager
def launch_overrides(programs: int | None, max_tile: int | None) -> Iterator[None]:
    """Smaller tiles / more programs than the defaults pick for tiny maps, so split and chunk paths run."""
    saved = cbam_triton._target_programs, cbam_triton.MAX_TILE
    if programs is not None:
        cbam_triton._target_programs = lambda device: programs
    if max_tile is not None:
        cbam_triton.MAX_TILE = max_tile
    try:
        yield
    finally:
        cbam_triton._target_programs, cbam_triton.MAX_TILE = saved


def launch_shape(x: torch.Tensor) -> dict[str, int]:
    b, c, h, w = x.shape
    cfg = cbam_triton.launch_config(b, c, h * w, cbam_triton._target_programs(x.device))
    pool, pixels, chunks = cfg.grids(b, c, h * w)
    return {
        "block_c": cfg.block_c,
        "block_hw": cfg.block_hw,
        "c_blocks": pool[1],
        "hw_blocks": pixels[0],
        "pool_splits": pool[2],
        "c_chunks": chunks[2],
    }


def check_case(spec: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Relative errors of the fused op's output and gradients against cbam_eager in float64, plus layout facts."""
    spec = dict(spec)
    overrides = spec.pop("programs", None), spec.pop("max_tile", None)
    inputs, upstream = make_case(**spec, device=device)
    with launch_overrides(*overrides):
        # fused first: its fresh buffers cannot inherit the reference's values from freed memory
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
        "launch": launch,
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


def run_checks(device: str) -> dict[str, Any]:
    """Every check, each caught on its own so one failure does not hide the others."""
    checks = {name: (lambda spec=spec: check_case(spec, device)) for name, spec in CASES.items()}
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


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, Any]:
    """Runs run_checks("cpu") in a fresh interpreter with TRITON_INTERPRET=1 (≈30 s on 2 busy cores)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        pytest.fail(f"interpreter subprocess failed (exit {proc.returncode}):\n{output}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def result_of(results: dict[str, Any], name: str) -> dict[str, Any]:
    result = results[name]
    assert "error" not in result, f"{name} raised:\n{result['error']}"
    return result


def assert_parity(name: str, result: dict[str, Any], dtype: str) -> None:
    tol = TOLERANCE[dtype]
    too_far = {key: err for key, err in result["errors"].items() if not err < tol}  # NaN fails too
    assert not too_far, f"{name}: ‖triton − float64 reference‖/‖reference‖ above {tol}: {too_far}"


# -------------------------------------------------------------------------------- interpreter (CPU) parity tests
@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_eager(interpreter_results, name):
    result = result_of(interpreter_results, name)
    assert all(norm > 0 for norm in result["reference_norms"].values()), f"uninformative case: {result}"
    assert_parity(name, result, CASES[name].get("dtype", "float32"))
    assert result["dtypes_kept"], "output and gradients must keep the inputs' dtypes"
    assert result["layout_kept"], "output must keep x's memory format"


def test_interpreter_cases_cover_ragged_blocks_and_splits(interpreter_results):
    ragged = result_of(interpreter_results, "fp32_nchw")["launch"]
    c, (_, h, w) = RAGGED["channels"], RAGGED["shape"]
    assert ragged["c_blocks"] > 1 and c % ragged["block_c"] != 0, ragged
    assert ragged["hw_blocks"] > 1 and (h * w) % ragged["block_hw"] != 0, ragged
    split = result_of(interpreter_results, "fp32_split_nchw")["launch"]
    assert split["pool_splits"] > 1 and split["c_chunks"] > 1, split


def test_interpreter_opcheck(interpreter_results):
    result = result_of(interpreter_results, "opcheck")
    statuses = {key: value for key, value in result.items() if key != "seconds"}
    assert statuses and all(status == "SUCCESS" for status in statuses.values()), result


@pytest.mark.parametrize("name", ["module", "compile_aot_eager"])
def test_interpreter_module_hook(interpreter_results, name):
    """models/cbam.py really runs the kernel (no fallback), also under torch.compile(fullgraph=True) and autocast."""
    result = result_of(interpreter_results, name)
    assert result["active_impl"] == "triton" and not result["fallback_warnings"], result
    assert_parity(name, result, "float32")
    assert result["autocast_dtype"] == "torch.float32"  # x's dtype out, whatever autocast says
    assert result["same_state_dict_keys"]


def test_interpreter_empty_batch(interpreter_results):
    result = result_of(interpreter_results, "empty_batch")
    assert (result["shape"], result["grad_shape"]) == ([0, 16, 4, 5], [0, 16, 4, 5])


# ---------------------------------------------------------------------------------------- in-process, no kernel
def test_launch_config_invariants():
    for c, h, w in bench.PAPER_SHAPES + ((40, 9, 11), (8, 5, 7), (1, 1, 1), (48, 1024, 1024)):
        for batch in (1, 4, 16):
            for programs in (1, 64, 4 * 132):
                cfg = cbam_triton.launch_config(batch, c, h * w, programs)
                pool, pixels, chunks = cfg.grids(batch, c, h * w)
                for block in (cfg.block_c, cfg.block_hw):
                    assert block & (block - 1) == 0, cfg  # powers of two
                assert cfg.block_c * cfg.block_hw <= cbam_triton.MAX_TILE, cfg
                assert cfg.pool_chunk % cfg.block_hw == 0 and cfg.c_chunk % cfg.block_c == 0, cfg
                # every pixel and channel covered, no program left without work
                assert (pool[2] - 1) * cfg.pool_chunk < h * w <= pool[2] * cfg.pool_chunk, cfg
                assert (chunks[2] - 1) * cfg.c_chunk < c <= chunks[2] * cfg.c_chunk, cfg
                assert (pixels[0] - 1) * cfg.block_hw < h * w <= pixels[0] * cfg.block_hw, cfg
                assert max(pool[1:] + pixels[1:] + chunks[1:]) <= 65535, cfg  # CUDA's limit on grid axes 1 and 2


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda x, w1, w2, ws: (x[0], w1, w2, ws), "4-D"),
        (lambda x, w1, w2, ws: (x.double(), w1, w2, ws), "float64"),
        (lambda x, w1, w2, ws: (x, w1[:, :-1], w2, ws), "w_fc1"),
        (lambda x, w1, w2, ws: (x, w1, w2, ws[..., :-1, :-1]), "odd kernel size"),
        (lambda x, w1, w2, ws: (x[:, :, :0], w1, w2, ws), "non-empty"),
    ],
)
def test_bad_inputs_raise_value_error(change, match):
    inputs, _ = make_case(16, (1, 4, 5))
    with pytest.raises(ValueError, match=match):
        cbam_triton.cbam_forward(*change(*inputs))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fake_impl_matches_real_layout(channels_last):
    """torch.compile sees shapes, dtypes and strides from the fake impl only: they must be the real ones."""
    inputs, _ = make_case(16, (2, 4, 5), dtype="bfloat16", channels_last=channels_last)
    with FakeTensorMode() as mode:
        out, chan, plane = cbam_triton.cbam_fused(*[mode.from_tensor(t) for t in inputs])
    assert out.shape == inputs[0].shape and out.dtype == torch.bfloat16
    assert out.stride() == inputs[0].stride()
    assert (chan.shape, plane.shape) == ((4, 2, 16), (2, 4, 4, 5))
    assert chan.dtype == plane.dtype == torch.float32


def test_interpreter_set_too_late_falls_back_with_warning(monkeypatch):
    """TRITON_INTERPRET set after triton was imported cannot take effect: CBAM warns once and runs eager."""
    if cbam_triton._KERNELS_INTERPRETED:
        pytest.skip("this pytest process itself runs under TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cbam_module, "_warned_reasons", set())
    module = CBAM(16, impl="triton")
    x = torch.randn(1, 16, 5, 5)
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
        out = module(x)
    assert cbam_module.active_impl("triton", x) == "eager"
    torch.testing.assert_close(out, cbam_eager(x, *[p.detach() for p in module.parameters()]))


# ------------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_cpu_path_times_eager_and_skips_triton():
    rows = bench.benchmark_cbam(
        shapes=[(8, 6, 6)],
        batch_sizes=[2],
        dtype="fp32",
        channels_last=False,
        impls=("eager", "triton"),
        warmup=1,
        iters=2,
        input_sets=2,
        train_batch=2,
        train_image_px=32,
        train_steps=1,
        train_warmup=0,
        train_overrides=["model.backbone=resnet18"],
        device="cpu",
        log=lambda _: None,
    )
    kinds = [(row["kind"], row.get("impl")) for row in rows]
    assert kinds == [
        ("copy", None),
        ("cbam", "eager"),
        ("cbam", "triton"),
        ("train_step", "eager"),
        ("train_step", "triton"),
    ]
    copy, eager, fused, train_eager, train_fused = rows
    assert copy["gbps"] > 0 and eager["fwd_ms"] > 0 and eager["fwd_bwd_ms"] > 0
    # 5 passes over x (2·8·6·6 fp32 = 2304 bytes) over the measured time
    assert eager["fwd_bwd_gbps"] == pytest.approx(5 * 2304 / eager["fwd_bwd_ms"] / 1e6)
    assert fused["note"].startswith("skipped") and "fwd_ms" not in fused
    assert train_eager["img_per_s"] > 0 and train_fused["note"].startswith("skipped")
    table = bench.format_cbam_table(rows)
    assert "| 2 | 8×6×6 | float32 | NCHW | eager |" in table and "impl=triton" in table


def test_benchmark_arguments():
    assert bench.parse_shapes("256x16x16, 48X128x128") == [(256, 16, 16), (48, 128, 128)]
    with pytest.raises(ValueError, match="--shapes"):
        bench.parse_shapes("256x16")
    with pytest.raises(ValueError, match="unknown impls"):
        bench.benchmark_cbam(impls=("cuda",), device="cpu", train_step=False)


# ------------------------------------------------------------------------------------------------------------ GPU
GPU_CASES = {
    **CASES,
    "bf16_os32_aspp": {"channels": 256, "shape": (4, 16, 16), "dtype": "bfloat16", "channels_last": True},
    "bf16_low_level": {"channels": 48, "shape": (2, 128, 128), "dtype": "bfloat16", "channels_last": True},
    "fp32_os16_aspp_nchw": {"channels": 256, "shape": (2, 32, 32)},
    "ties_bf16_low_level": {"channels": 48, "shape": (2, 64, 64), "dtype": "bfloat16", "ties": True},
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_matches_eager(name):
    result = check_case(GPU_CASES[name], device="cuda")
    assert_parity(name, result, GPU_CASES[name].get("dtype", "float32"))
    assert result["dtypes_kept"] and result["layout_kept"]


@pytest.mark.gpu
@needs_cuda
def test_gpu_opcheck_and_compiled_module():
    opcheck = check_opcheck("cuda")
    assert all(status == "SUCCESS" for status in opcheck.values()), opcheck
    for backend in (None, "inductor"):
        result = check_module("cuda", backend)
        assert result["active_impl"] == "triton" and not result["fallback_warnings"], result
        assert_parity(f"module, compile backend {backend}", result, "float32")


if __name__ == "__main__":  # the interpreter subprocess of `interpreter_results`
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (set before Python starts)")
    print(RESULT_PREFIX + json.dumps(run_checks("cpu")))

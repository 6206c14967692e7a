"""Fused Triton CBAM (hpc_drseg.kernels.cbam_triton) against the eager reference of models/cbam.py run in
float64: forward and all four gradients, fp32 tight and bf16/fp16 loose, NCHW and channels_last inputs and weights,
ragged blocks, max ties, 8 launches per forward+backward, op checks (opcheck, fake tensors, torch.compile, the
triton_op trace), the CBAM module hook, and the package without triton.

The CPU parity checks (cbam_checks.py) run in one subprocess started with TRITON_INTERPRET=1 and the tests assert on
its results; the GPU-marked tests run the same checks in-process on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cbam_checks.py, beside this file

from cbam_checks import (  # noqa: E402
    CASES,
    KERNEL_NAMES,
    RAGGED,
    RESULT_PREFIX,
    TOLERANCE,
    check_case,
    check_module,
    check_opcheck,
    make_case,
)

from hpc_drseg.kernels import bench, cbam_launch, cbam_triton  # noqa: E402
from hpc_drseg.models import CBAM  # noqa: E402
from hpc_drseg.models import cbam as cbam_module  # noqa: E402
from hpc_drseg.models.cbam import cbam_eager  # noqa: E402

CHECKS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cbam_checks.py")


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, Any]:
    """Runs run_checks("cpu") in a fresh interpreter with TRITON_INTERPRET=1 (≈30 s on 2 busy cores)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, CHECKS_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
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
    assert result["weight_strides_kept"], "weight gradients must have the weights' strides (no copy on accumulation)"
    # one launch of each of the 8 kernels per forward+backward, nothing else
    assert result["launches"] == dict.fromkeys(KERNEL_NAMES, 1), result["launches"]


def test_interpreter_launch_count_of_the_benchmark(interpreter_results):
    counts = result_of(interpreter_results, "bench_launches")["counts"]
    assert counts == [cbam_triton.LAUNCHES_PER_STEP] * 2 and cbam_triton.LAUNCHES_PER_STEP <= 8, counts


def test_interpreter_cases_cover_ragged_blocks_and_splits(interpreter_results):
    ragged = result_of(interpreter_results, "fp32_nchw")["launch"]
    c, (_, h, w) = RAGGED["channels"], RAGGED["shape"]
    assert ragged["c_blocks"] > 1 and c % ragged["block_c"] != 0, ragged
    assert ragged["hw_blocks"] > 1 and (h * w) % ragged["block_hw"] != 0, ragged
    split = result_of(interpreter_results, "fp32_split_nchw")["launch"]
    assert split["pool_splits"] > 1 and split["c_chunks"] > 1, split
    # backward programs that each loop over several pixel blocks (their dL/dgate partials are summed in place), and
    # several of them per image
    assert ragged["grad_blocks_per_program"] > 1 and split["grad_programs"] > 1, (ragged, split)


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
        out, chan, plane, chan_idx, plane_idx = cbam_triton.cbam_fused(*[mode.from_tensor(t) for t in inputs])
    assert out.shape == inputs[0].shape and out.dtype == torch.bfloat16
    assert out.stride() == inputs[0].stride()
    assert (chan.shape, plane.shape) == ((4, 2, 16), (2, 4, 4, 5))
    assert chan.dtype == plane.dtype == torch.float32
    assert (chan_idx.shape, plane_idx.shape) == (
        (2, 16),
        (2, 4, 5),
    ) and chan_idx.dtype == plane_idx.dtype == torch.int32
    with mode:
        stats = (chan, plane, chan_idx, plane_idx)
        grads = cbam_triton.cbam_fused_backward(out, *[mode.from_tensor(t) for t in inputs], *stats)
    assert [(g.shape, g.dtype, g.stride()) for g in grads] == [(t.shape, t.dtype, t.stride()) for t in inputs]


def test_triton_op_finds_all_eight_kernels():
    """triton_op keys torch.compile's cache on the kernels it finds in the op's source: all of them."""
    if cbam_launch.KERNELS_INTERPRETED:
        pytest.skip("this pytest process itself runs under TRITON_INTERPRET=1 (the op is a plain custom_op there)")
    from torch._library.triton import get_triton_kernels_for_op

    found = [
        k.__name__
        for op in ("cbam_fused", "cbam_fused_backward")
        for k in get_triton_kernels_for_op(f"hpc_drseg::{op}")
    ]
    assert sorted(found) == sorted(KERNEL_NAMES)


def test_torch_compile_traces_into_the_kernels():
    """Under torch.compile the op is decomposed into its Triton kernels (what lets Inductor schedule them): the joint
    forward+backward graph AOTAutograd hands to the partitioner holds exactly 8 kernel nodes and no opaque op.
    (Running that graph needs a GPU: the trace stops at the partitioner.)"""
    if cbam_launch.KERNELS_INTERPRETED:
        pytest.skip("this pytest process itself runs under TRITON_INTERPRET=1 (the op is a plain custom_op there)")
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    class Traced(Exception):
        pass

    def partition(joint, *_args, **_kwargs):  # noqa: ANN001, ANN202
        graphs.append(joint)
        raise Traced

    inputs, _ = make_case(16, (2, 4, 5), channels_last=True)
    inputs = [t.requires_grad_(True) for t in inputs]
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=None, partition_fn=partition)
    # the op itself, not cbam_forward: that refuses CPU tensors outside the interpreter before anything is traced
    compiled = torch.compile(lambda *a: cbam_triton.cbam_fused(*a)[0], backend=backend, fullgraph=True)
    with pytest.raises(Exception, match="Traced"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no GPU driver here: mutation analysis falls back to "all arguments"
        compiled(*inputs)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("triton_kernel_wrapper" in t for t in targets) == 8, targets
    assert not any("hpc_drseg" in t for t in targets), targets


def test_package_imports_and_falls_back_without_triton():
    """With triton absent the package, the benchmark module and a CBAM(impl='triton') still work (eager, warned)."""
    code = (
        "import sys, warnings; sys.modules['triton'] = None\n"
        "import torch, hpc_drseg, hpc_drseg.kernels, hpc_drseg.kernels.bench\n"
        "from hpc_drseg.models import CBAM\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    out = CBAM(16, impl='triton')(torch.randn(1, 16, 4, 4))\n"
        "print(tuple(out.shape), [str(w.message) for w in caught])\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(1, 16, 4, 4)" in proc.stdout and "falls back to eager" in proc.stdout, proc.stdout


def test_interpreter_set_too_late_falls_back_with_warning(monkeypatch):
    """TRITON_INTERPRET set after triton was imported cannot take effect: CBAM warns once and runs eager."""
    if cbam_launch.KERNELS_INTERPRETED:
        pytest.skip("this pytest process itself runs under TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cbam_module, "_warned_reasons", set())
    module = CBAM(16, impl="triton")
    x = torch.randn(1, 16, 5, 5)
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
        out = module(x)
    assert cbam_module.active_impl("triton", x) == "eager"
    torch.testing.assert_close(out, cbam_eager(x, *[p.detach() for p in module.parameters()]))


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


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(16, 256, 16, 16), (16, 48, 128, 128)])
def test_gpu_kernels_per_forward_backward(shape):
    """At the paper's two CBAM sites: at most 8 GPU kernels (torch.profiler) per forward+backward, as launched."""
    b, c, h, w = shape
    inputs, upstream = make_case(
        c, (b, h, w), dtype="bfloat16", weight_dtype="float32", channels_last=True, device="cuda"
    )
    inputs = [t.requires_grad_(True) for t in inputs]

    def step() -> None:
        torch.autograd.grad(cbam_triton.cbam_forward(*inputs), inputs, upstream)

    with cbam_launch.count_launches() as launches:
        step()
    assert sum(launches.values()) == cbam_triton.LAUNCHES_PER_STEP
    kernels = bench.count_kernels(step, torch.device("cuda"))
    assert kernels is not None and kernels <= 8, kernels

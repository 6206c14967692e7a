"""The fused CBAM's kernels compile for an H100/H200 (sm_90: Triton IR → PTX → cubin with the bundled ptxas) with
exactly the arguments, block sizes and warps the launcher picks at the paper's two CBAM sites: catches what the CPU
interpreter cannot (type rules of compiled Triton, register spills), without a GPU. Launches are recorded, not run."""

from __future__ import annotations

import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hpc_drseg.kernels import cbam_launch  # noqa: E402

H200_SMS = 132
POINTER_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32"}
SITES = {"aspp_os32": (16, 256, 16, 16), "low_level": (16, 48, 128, 128)}


def recorded_launches(shape: tuple[int, int, int, int], monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """(kernel, grid, kwargs) of one forward+backward on meta tensors (bf16 channels_last x, fp32 weights of a
    channels_last model, as in training) with an H200's launch sizes."""
    calls: list[tuple] = []
    monkeypatch.setattr(
        cbam_launch._Launcher, "_launch", lambda self, grid, **kw: calls.append((self.kernel, grid, kw))
    )
    monkeypatch.setattr(cbam_launch, "target_programs", lambda device: cbam_launch.PROGRAMS_PER_SM * H200_SMS)
    b, c, h, w = shape
    meta = {"device": "meta"}
    x = torch.empty(shape, dtype=torch.bfloat16, **meta).contiguous(memory_format=torch.channels_last)
    hidden = max(1, c // 16)
    weights = [torch.empty(hidden, c, 1, 1, **meta), torch.empty(c, hidden, 1, 1, **meta)]
    weights.append(torch.empty(1, 2, 7, 7, **meta).contiguous(memory_format=torch.channels_last))
    out, *stats = cbam_launch.forward_passes(x, *weights)
    cbam_launch.backward_passes(out, x, *weights, *stats)
    return calls


def compile_for_sm90(kernel: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    constexprs, signature = {}, {}
    for param in kernel.params:
        value = kwargs[param.name]
        if param.is_constexpr:
            constexprs[param.name] = value
            signature[param.name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + POINTER_TYPES[value.dtype]
        else:
            assert isinstance(value, int) and abs(value) < 2**31, (param.name, value)
            signature[param.name] = "i32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton's notice about its fp-fusion default
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": num_warps},
        )
    return compiled.asm


def spilled_bytes(ptx: str, tmp_path: Path) -> int | None:
    """Bytes of registers ptxas spills for this PTX on sm_90a (its -v report), None if Triton's ptxas is not found."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except (ImportError, AttributeError, TypeError, RuntimeError):
        return None
    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    report = subprocess.run(
        [ptxas, "--gpu-name", "sm_90a", "-v", str(source), "-o", str(tmp_path / "kernel.cubin")],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))


@pytest.mark.parametrize("site", list(SITES))
def test_kernels_compile_for_sm90_as_launched(site, monkeypatch, tmp_path):
    if cbam_launch.KERNELS_INTERPRETED:
        pytest.skip("this pytest process runs under TRITON_INTERPRET=1: the kernels are interpreted here")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    calls = recorded_launches(SITES[site], monkeypatch)
    assert len(calls) == 8
    for kernel, grid, kwargs in calls:
        assert max(grid[1:], default=1) <= 65535, (kernel.__name__, grid)
        asm = compile_for_sm90(kernel, kwargs)
        assert asm.get("cubin"), kernel.__name__  # ptxas assembled it
        # register spills would turn these streaming kernels' tiles into local-memory traffic
        assert spilled_bytes(asm["ptx"], tmp_path) in (0, None), kernel.__name__

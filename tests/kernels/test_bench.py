"""`drseg bench cbam` (hpc_drseg.kernels.bench) on CPU: eager host-clock timing, triton rows skipped, no kernel count;
the launch count of the fused op itself is checked in the interpreter by test_cbam_triton.py, the CUDA-graph timing
and profiler count by the GPU-marked tests below."""

from __future__ import annotations

import pytest
import torch

from hpc_drseg.kernels import bench


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
    assert eager["kernels_fwd_bwd"] is None and eager["timing"] == "host clock, eager"  # no GPU kernels on CPU
    assert fused["note"].startswith("skipped") and "fwd_ms" not in fused
    assert train_eager["img_per_s"] > 0 and train_fused["note"].startswith("skipped")
    table = bench.format_cbam_table(rows)
    assert "| 2 | 8×6×6 | float32 | NCHW | eager |" in table and "impl=triton" in table
    assert "| kernels fwd+bwd | timing |" in table and "| — | host clock, eager |" in table


def test_benchmark_arguments():
    assert bench.parse_shapes("256x16x16, 48X128x128") == [(256, 16, 16), (48, 128, 128)]
    with pytest.raises(ValueError, match="--shapes"):
        bench.parse_shapes("256x16")
    with pytest.raises(ValueError, match="unknown impls"):
        bench.benchmark_cbam(impls=("cuda",), device="cpu", train_step=False)


def test_count_kernels_is_not_applicable_on_cpu():
    calls = []
    assert bench.count_kernels(lambda: calls.append(1), torch.device("cpu")) is None
    assert not calls  # nothing run for nothing


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_gpu_benchmark_replays_graphs_and_counts_kernels():
    rows = bench.benchmark_cbam(
        shapes=[(256, 16, 16)], batch_sizes=[16], impls=("eager", "triton"), warmup=2, iters=5, train_step=False
    )
    by_impl = {row["impl"]: row for row in rows if row["kind"] == "cbam"}
    for row in by_impl.values():
        assert row["timing"] == "cuda-graph replay" and row["fwd_bwd_ms"] > 0, row
    assert 0 < by_impl["triton"]["kernels_fwd_bwd"] <= 8, by_impl["triton"]
    assert by_impl["eager"]["kernels_fwd_bwd"] > by_impl["triton"]["kernels_fwd_bwd"], by_impl

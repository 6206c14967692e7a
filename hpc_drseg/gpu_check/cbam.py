"""Part 5 of `drseg bench gpu`: one CBAM block at both of the paper's sites (after ASPP, 256×16×16, and after the
low-level projection, 48×128×128, at 512² input), eager vs torch.compile vs the fused Triton kernel, through the
kernels bench (hpc_drseg/kernels/bench.py), with GPU kernels per forward+backward where that bench counts them."""

from __future__ import annotations

from typing import Any

import torch

from hpc_drseg.gpu_check.context import Context

IMPLS = ("eager", "compile", "triton")


def _row(row: dict[str, Any]) -> dict[str, Any]:
    out = {"kind": "cbam" if row.get("kind") == "cbam" else f"cbam_{row.get('kind')}"}
    out.update({key: value for key, value in row.items() if key != "kind"})
    note = str(row.get("note") or "")
    if note.startswith("skipped"):
        out["skipped"] = note.removeprefix("skipped: ")
    return out


def run(ctx: Context) -> None:
    from hpc_drseg.kernels.bench import benchmark_cbam

    device = "cuda" if torch.cuda.is_available() and not ctx.dry_run else "cpu"
    impls = IMPLS
    if ctx.dry_run:
        # inductor on a 2-core CPU takes minutes per graph; triton rows are skipped by the bench itself off CUDA
        impls = ("eager", "triton")
        for shape in ctx.sizes.cbam_shapes:
            ctx.emit(
                {
                    "kind": "cbam",
                    "impl": "compile",
                    "batch": ctx.sizes.cbam_batch,
                    "shape": list(shape),
                    "skipped": "dry run: inductor takes minutes per graph on a CPU",
                }
            )
    rows = benchmark_cbam(
        shapes=ctx.sizes.cbam_shapes,
        batch_sizes=(ctx.sizes.cbam_batch,),
        dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        channels_last=True,
        impls=impls,
        iters=ctx.sizes.cbam_iters,
        warmup=3 if ctx.dry_run else 10,
        train_step=False,
        device=device,
        log=lambda line: print(line, flush=True),
    )
    for row in rows:
        ctx.emit(_row(row))

"""The data of `drseg bench gpu`: a synthetic DDR tree (train and valid splits, as many images as DDR's lesion set on
a GPU run) sharded at the run's image side into WORK/shards, for the throughput, loader, full-run and sync parts."""

from __future__ import annotations

import os
import time

from hpc_drseg.gpu_check.context import Context

SYNTH_MIN_PX = 96


def run(ctx: Context) -> None:
    from hpc_drseg.data.shards import write_shards
    from hpc_drseg.data.synth import write_synthetic_ddr

    workers = max(1, len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    # photos about the training side, so sharding is a small resize (the generator draws nothing under 96 px)
    size_px = max(ctx.sizes.image_px, SYNTH_MIN_PX)
    ddr = write_synthetic_ddr(
        ctx.work / "ddr", dict(ctx.sizes.synth_counts), size_px=size_px, progress=False, workers=workers
    )
    synth_s = time.perf_counter() - started
    write_shards(ddr, ctx.shards, image_px=ctx.sizes.image_px, progress=False, workers=workers)
    ctx.emit(
        {
            "kind": "data",
            "images": dict(ctx.sizes.synth_counts),
            "image_px": ctx.sizes.image_px,
            "synth_s": synth_s,
            "shard_s": time.perf_counter() - started - synth_s,
        }
    )

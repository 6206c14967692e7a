"""`drseg bench data|masks|metrics|train|cbam|gpu`: benchmarks that print (or, for gpu, record) figures."""

from __future__ import annotations

import argparse

from hpc_drseg.cli.common import add_command, add_config_args, int_list, setup_logging
from hpc_drseg.config import load_config
from hpc_drseg.config.choices import AUGMENT_PRESETS


def cmd_bench_data(args: argparse.Namespace) -> int:
    from hpc_drseg.data.bench import benchmark_data, format_table

    workers = int_list("--workers", args.workers)
    rows = benchmark_data(args.shards, workers, args.seconds, image_px=args.image_px, preset=args.preset)
    print(format_table(rows))
    return 0


def cmd_bench_masks(args: argparse.Namespace) -> int:
    from hpc_drseg.data.bench import format_mask_resize_table, mask_resize_table

    print(format_mask_resize_table(mask_resize_table(args.ddr_root, args.image_px)))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from hpc_drseg.train.bench import benchmark_train

    setup_logging()
    benchmark_train(load_config(args.config, args.overrides), steps=args.steps, warmup=args.warmup)
    return 0


def cmd_bench_cbam(args: argparse.Namespace) -> int:
    from hpc_drseg.kernels.bench import PAPER_BATCH_SIZES, PAPER_SHAPES, benchmark_cbam, format_cbam_table, parse_shapes

    rows = benchmark_cbam(
        shapes=parse_shapes(args.shapes) if args.shapes else PAPER_SHAPES,
        batch_sizes=int_list("--batch-sizes", args.batch_sizes) if args.batch_sizes else PAPER_BATCH_SIZES,
        dtype=args.dtype,
        channels_last=not args.nchw,
        impls=args.impls.split(","),
        iters=args.iters,
        train_step=not args.no_train_step,
        train_image_px=args.image_px,
        train_steps=args.steps,
        train_warmup=args.warmup,
        train_overrides=args.overrides,
    )
    print(format_cbam_table(rows))
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from hpc_drseg.gpu_check import PART_NAMES, run_gpu_check

    parts = tuple(args.parts.split(",")) if args.parts else PART_NAMES
    return run_gpu_check(args.out, deadline_s=args.deadline_s, dry_run=args.dry_run, parts=parts)


def cmd_bench_metrics(args: argparse.Namespace) -> int:
    from hpc_drseg.metrics import bench

    print(bench.format_agreement_table(bench.agreement_table(score_bits=args.score_bits)))
    rows = bench.benchmark_ap(
        images=args.images, side_px=args.side_px, score_bits=args.score_bits, repeats=args.repeats
    )
    print(bench.format_ap_table(rows))
    return 0


def _add_step_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures (data loading, training step, CBAM)")
    kinds = p.add_subparsers(dest="what", required=True, metavar="WHAT")

    data = add_command(kinds, "data", cmd_bench_data, help="augmented samples/s per loader worker count")
    data.add_argument("--shards", default=None, help="shard folder (default: synthetic shards made on the fly)")
    data.add_argument("--workers", default="1,2", help="comma-separated loader worker counts (default 1,2)")
    data.add_argument("--seconds", type=float, default=10.0, help="measuring time per setting (default 10)")
    data.add_argument("--image-px", type=int, default=512, help="side of the augment-only measurement (default 512)")
    data.add_argument("--preset", default="paper", choices=AUGMENT_PRESETS, help="augmentation preset")

    masks = add_command(
        kinds, "masks", cmd_bench_masks, help="lesion area and microaneurysms kept by each --mask-resize rule"
    )
    masks.add_argument("--ddr-root", required=True, help="DDR tree (real or from drseg synth) to measure")
    masks.add_argument("--image-px", type=int, default=512, help="side the masks are resized to (default 512)")

    metrics = add_command(kinds, "metrics", cmd_bench_metrics, help="streaming AP of the standard protocol vs sklearn")
    metrics.add_argument("--images", type=int, default=4, help="native-size images per batch (default 4)")
    metrics.add_argument("--side-px", type=int, default=1024, help="image side (default 1024)")
    metrics.add_argument("--score-bits", type=int, default=10, help="eval.score_bits (default 10)")
    metrics.add_argument("--repeats", type=int, default=3, help="best of this many streaming runs (default 3)")

    train = add_command(kinds, "train", cmd_bench_train, help="training step img/s, TFLOP/s, peak memory")
    add_config_args(train)
    _add_step_args(train)

    cbam = add_command(kinds, "cbam", cmd_bench_cbam, help="fused Triton CBAM vs eager and compiled, and a train step")
    cbam.add_argument("--shapes", default=None, help="CxHxW list, e.g. 256x16x16,48x128x128 (default: paper's)")
    cbam.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default 4,16)")
    cbam.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="input dtype (default bf16)")
    cbam.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    cbam.add_argument("--impls", default="eager,compile,triton", help="implementations to time")
    cbam.add_argument("--iters", type=int, default=50, help="timed iterations per setting (default 50)")
    cbam.add_argument("--no-train-step", action="store_true", help="skip the full training-step comparison")
    cbam.add_argument("--image-px", type=int, default=512, help="side of the training-step comparison (default 512)")
    _add_step_args(cbam)
    cbam.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of the training step")
    _add_bench_gpu(kinds)


def _add_bench_gpu(kinds: argparse._SubParsersAction) -> None:
    from hpc_drseg.gpu_check.plan import DEFAULT_DEADLINE_S, PART_NAMES  # standard library only: cheap to import

    gpu = add_command(
        kinds, "gpu", cmd_bench_gpu, help="every GPU figure in one run under one deadline -> OUT/results.jsonl"
    )
    gpu.add_argument("--out", required=True, help="folder for results.jsonl, summary.txt and parts.log")
    gpu.add_argument(
        "--deadline-s",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help=f"seconds the whole check may take (default {DEFAULT_DEADLINE_S:.0f})",
    )
    gpu.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU; GPU-only parts recorded as skipped")
    gpu.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PART_NAMES)} (default: all)")

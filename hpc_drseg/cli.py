"""`drseg` command line: parse, load config, call. The only module that reads sys.argv.

One small builder per command; `bench`, `config` and `sweep` have sub-commands. Heavy modules (torch, webdataset,
albumentations) are imported inside each command, so `drseg --help` and config validation stay instant. A user error
(DrsegError) is printed as one line with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hpc_drseg import __version__
from hpc_drseg.config import describe_fields, dump_config, load_config
from hpc_drseg.config.choices import (
    AUGMENT_PRESETS,
    CHECKPOINT_CHOICES,
    EVAL_PROTOCOLS,
    EXECUTOR_KINDS,
    IMAGE_CODECS,
    MASK_RESIZE_RULES,
)
from hpc_drseg.constants import SPLITS
from hpc_drseg.errors import DrsegError, InputError

EPILOG = "Overrides are dotted key=value pairs, e.g. optim.lr=3e-4 model.cbam.sites=[aspp]; see `drseg config keys`."
DDR_COUNTS = (383, 149, 225)  # images per split of DDR's lesion-segmentation subset, in SPLITS order
SWEEP_ACTIONS = ("run", "status", "collect")
Handler = Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------------------------------ helpers
def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging() -> None:
    # Only the main process talks; the others log warnings and errors.
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")


def _int_list(option: str, text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4]; anything else is an error naming the option."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise InputError(f"{option}: got {text!r}; give comma-separated integers, e.g. 1,2") from None
    return values


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML file of partial overrides (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _command(sub: argparse._SubParsersAction, name: str, handler: Handler, **kwargs) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, epilog=EPILOG, **kwargs)
    parser.set_defaults(func=handler)
    return parser


# ------------------------------------------------------------------------------------------------------- data
def cmd_synth(args: argparse.Namespace) -> int:
    from hpc_drseg.data.synth import DDR_COUNTS, write_synthetic_ddr
    from hpc_drseg.data.synth_idrid import IDRID_COUNTS, write_synthetic_idrid

    idrid = args.layout == "idrid"
    write, defaults = (write_synthetic_idrid, IDRID_COUNTS) if idrid else (write_synthetic_ddr, DDR_COUNTS)
    given = {split: getattr(args, split) for split in SPLITS if getattr(args, split) is not None}
    counts = {**{split: n for split, n in defaults.items() if split not in given}, **given}
    out = write(
        args.out,
        counts=counts,
        size_px=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        workers=args.workers,
    )
    print(f"synthetic {'IDRiD' if idrid else 'DDR'} tree written to {out} ({sum(counts.values())} images)")
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "synth", cmd_synth, help="write synthetic DDR-like data in the official layout")
    p.add_argument("--out", required=True, help="output folder (gets lesion_segmentation/{train,valid,test}/…)")
    p.add_argument(
        "--layout",
        default="ddr",
        choices=("ddr", "idrid"),
        help="ddr (default) or idrid: IDRiD's 'A. Segmentation/…' tree, 0/255 .tif masks, absent files for absent "
        "lesions, 54/27 train/test images by default, no valid set",
    )
    for split, default in zip(SPLITS, DDR_COUNTS):
        p.add_argument(f"--{split}", type=int, default=None, help=f"{split} images (default {default}, as DDR)")
    p.add_argument("--size", type=int, default=1024, help="nominal image side in px; sides vary ±15%% (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _shard_source(args: argparse.Namespace):
    """The dataset reader of `drseg shard`: --ddr-root DIR (the DDR form) or --layout L --root DIR."""
    from hpc_drseg.data.layouts import DEFAULT_VALID_FRACTION, build_reader

    if (args.ddr_root is None) == (args.root is None):
        raise InputError("give either --ddr-root DIR (a DDR tree) or --layout LAYOUT --root DIR")
    if args.ddr_root is not None and args.layout not in (None, "ddr"):
        raise InputError(f"--ddr-root reads the DDR layout; for --layout {args.layout} give the folder as --root")
    layout = args.layout or "ddr"
    only = {"idrid": ("valid_fraction", "split_seed"), "folders": ("mask_pattern", "split", "dataset_name")}
    for other, options in only.items():
        given = [f"--{o.replace('_', '-')}" for o in options if getattr(args, o) is not None]
        if given and layout != other:
            raise InputError(f"{', '.join(given)}: only for --layout {other} (got --layout {layout})")
    valid_fraction = DEFAULT_VALID_FRACTION if args.valid_fraction is None else args.valid_fraction
    return build_reader(
        layout,
        args.ddr_root if args.ddr_root is not None else args.root,
        allow_missing_masks=args.allow_missing_masks,
        valid_fraction=valid_fraction,
        split_seed=args.split_seed or 0,
        mask_pattern=args.mask_pattern,
        split=args.split,
        dataset=args.dataset_name,
    )


def cmd_shard(args: argparse.Namespace) -> int:
    from hpc_drseg.data.shards import write_shards

    manifest = write_shards(
        _shard_source(args),
        args.out,
        image_px=args.image_px,
        overwrite=args.overwrite,
        allow_missing_masks=args.allow_missing_masks,
        workers=args.workers,
        progress=not args.quiet,
        image_codec=args.image_codec,
        mask_resize=args.mask_resize,
    )
    for split, info in manifest["splits"].items():
        lesions = " ".join(f"{k}={v}" for k, v in info["lesion_images"].items())
        print(f"{split:>5}: {info['images']:4d} images in {len(info['shards'])} shards; images with lesion: {lesions}")
    print(
        f"dataset {manifest['dataset']} (layout {manifest['layout']}); masks resized by rule "
        f"'{manifest['mask_resize']}'; shards written to {args.out} (manifest.json)"
    )
    return 0


def _add_shard(sub: argparse._SubParsersAction) -> None:
    from hpc_drseg.data.layouts import DEFAULT_VALID_FRACTION, LAYOUTS

    p = _command(sub, "shard", cmd_shard, help="convert a DDR, IDRiD or folder dataset into WebDataset shards")
    p.add_argument("--ddr-root", default=None, help="DDR: folder holding lesion_segmentation/ (or that folder itself)")
    p.add_argument("--layout", default=None, choices=LAYOUTS, help="layout of --root (docs/datasets.md)")
    p.add_argument("--root", default=None, help="dataset folder of --layout (ddr, idrid: 'A. Segmentation' or above)")
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=None,
        help=f"idrid: share of training images made the valid split (default {DEFAULT_VALID_FRACTION}; 0 = none)",
    )
    p.add_argument("--split-seed", type=int, default=None, help="idrid: seed of the valid split's draw (default 0)")
    p.add_argument("--mask-pattern", default=None, help="folders: mask file name, default '{stem}.png'")
    p.add_argument("--split", default=None, choices=SPLITS, help="folders: split of a single images/ (default test)")
    p.add_argument("--dataset-name", default=None, help="folders: name in manifest and reports (default: folder name)")
    p.add_argument("--out", required=True, help="shard folder to create (tars + manifest.json)")
    p.add_argument("--image-px", type=int, default=512, help="training image side (default 512, the paper's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    p.add_argument("--allow-missing-masks", action="store_true", help="treat a missing mask file as all-zero")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    p.add_argument(
        "--image-codec",
        default=IMAGE_CODECS[0],
        choices=IMAGE_CODECS,
        help="training images as PNG (default, 2.4x smaller) or raw .npy (decode ~40x cheaper; for CPU-bound nodes)",
    )
    p.add_argument(
        "--mask-resize",
        default=MASK_RESIZE_RULES[0],
        choices=MASK_RESIZE_RULES,
        help="how masks shrink to --image-px: nearest (default, the paper code's; lesion area kept on average), area "
        "(lesion where it covers >= half a target pixel), any (lesion where any source pixel is: keeps every "
        "microaneurysm but inflates lesion area, MA x2-3); compare them with `drseg bench masks`",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ------------------------------------------------------------------------------------------------ config, info
def cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    load_config(args.config, args.overrides)
    print(f"ok: {args.config or 'defaults'} is a valid configuration")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    for key, default, doc in describe_fields():
        print(f"{key:<32} {default:<28} {doc}")
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show, check or list configuration keys", epilog=EPILOG)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_config_args(_command(actions, "show", cmd_config_show, help="print the resolved configuration as YAML"))
    _add_config_args(_command(actions, "check", cmd_config_check, help="validate a configuration"))
    _command(actions, "keys", cmd_config_keys, help="list every key with its default and meaning")


def cmd_info(args: argparse.Namespace) -> int:
    from hpc_drseg.models import describe_model

    cfg = load_config(args.config, args.overrides)
    info = describe_model(cfg.model, cfg.data.image_px)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<28} {value}")
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "info", cmd_info, help="parameters, training FLOPs and output shape of the configured model")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")


# ------------------------------------------------------------------------------- train, eval, report, predict
def cmd_train(args: argparse.Namespace) -> int:
    from hpc_drseg.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    _setup_logging()
    result = train(
        cfg, allow_config_change=args.allow_config_change, allow_world_size_change=args.allow_world_size_change
    )
    print(f"{result.run_dir}: {result.reason} (epoch {result.progress.epoch}, step {result.progress.global_step})")
    return result.exit_code


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "train", cmd_train, help="train a model (resumes an existing run directory)")
    _add_config_args(p)
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config changes what the run computes (e.g. optim.lr); the change is recorded "
        "in RUN/config_changes.jsonl and config.yaml is rewritten",
    )
    p.add_argument(
        "--allow-world-size-change",
        action="store_true",
        help="resume with another number of ranks than the checkpoint was written by: goes on from the next epoch "
        "boundary and is no longer bit-exact",
    )


def _eval_checkpoint_file(args: argparse.Namespace) -> Path:
    """The checkpoint of the `--out` form: --checkpoint FILE, or best/last/auto of --run."""
    from hpc_drseg.evaluate import resolve_checkpoint

    if args.shards is None:
        raise InputError("drseg eval --out DIR needs --shards DIR (the shard folder to score, e.g. IDRiD's)")
    if args.run is not None:
        if args.checkpoint not in (None, *CHECKPOINT_CHOICES):
            choices = list(CHECKPOINT_CHOICES)
            raise InputError(f"--checkpoint {args.checkpoint}: with --run give one of {choices}, or drop --run")
        return resolve_checkpoint(Path(args.run), args.checkpoint or "auto")
    if args.checkpoint in (None, *CHECKPOINT_CHOICES):
        raise InputError("give --run RUN, or --checkpoint FILE --shards DIR --out DIR")
    return Path(args.checkpoint)


def cmd_eval(args: argparse.Namespace) -> int:
    from hpc_drseg.evaluate import evaluate_checkpoint, evaluate_run
    from hpc_drseg.report import write_run_report

    _setup_logging()
    if args.out is not None:
        checkpoint = _eval_checkpoint_file(args)
        report_dir = Path(args.out)
        result = evaluate_checkpoint(checkpoint, args.shards, report_dir, args.split, args.protocol, args.overrides)
    elif args.run is None or args.shards is not None or args.checkpoint not in (None, *CHECKPOINT_CHOICES):
        raise InputError(
            "give --run RUN [--checkpoint best|last], or --checkpoint FILE (or --run RUN) --shards DIR "
            "--out DIR to score a checkpoint on any shard set"
        )
    else:
        report_dir, which = Path(args.run), args.checkpoint or "auto"
        result = evaluate_run(args.run, split=args.split, protocol=args.protocol, which=which, overrides=args.overrides)
    if _is_main_process():
        print(f"dataset {result['dataset']}, split {args.split}, checkpoint {result['checkpoint']}")
        for name, metrics in result["protocols"].items():
            print(f"{name:>8} protocol: mAP {_fmt(metrics['mAP'])}  mIoU {_fmt(metrics['mIoU'])}")
        print(f"report: {write_run_report(report_dir)}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "eval",
        cmd_eval,
        help="score a run, or any checkpoint on any shard set, with the paper and standard protocols; write a report",
    )
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        default=None,
        help="run directory made by drseg train (under torchrun use --run-dir: torchrun reads --run as --run-path)",
    )
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--protocol", default="both", choices=EVAL_PROTOCOLS, help="default both")
    p.add_argument(
        "--checkpoint",
        default=None,
        help=f"with --run: one of {', '.join(CHECKPOINT_CHOICES)} (default auto: best, else last); or a checkpoint "
        "file, scored with --shards and --out",
    )
    p.add_argument("--shards", default=None, help="with --out: the shard folder to score (any dataset)")
    p.add_argument(
        "--out", default=None, help="score the checkpoint on --shards into this folder (eval json, config, report)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the run's config (e.g. data.*)")


def cmd_report(args: argparse.Namespace) -> int:
    from hpc_drseg.compare import compare_datasets, compare_runs
    from hpc_drseg.report import write_run_report

    if args.datasets:
        print(compare_datasets([Path(r) for r in args.runs], Path(args.out) if args.out else None, split=args.split))
    elif len(args.runs) == 1 and args.out is None:
        print(f"report: {write_run_report(Path(args.runs[0]))}")
    else:
        print(compare_runs([Path(r) for r in args.runs], Path(args.out) if args.out else None, split=args.split))
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "report", cmd_report, help="Table I report of one run, or several runs or datasets side by side")
    p.add_argument("runs", nargs="+", help="run directories or drseg eval --out folders (with eval_*.json)")
    p.add_argument("--out", default=None, help="write the side-by-side table here (.md, and .csv beside it)")
    p.add_argument(
        "--datasets",
        action="store_true",
        help="set the evaluations side by side per dataset (per-lesion AP/IoU columns per dataset), e.g. DDR-test "
        "and IDRiD-test of one checkpoint",
    )
    p.add_argument("--split", default="test", help="split to compare (default test)")


def cmd_predict(args: argparse.Namespace) -> int:
    from hpc_drseg.predict import predict

    result = predict(
        Path(args.checkpoint),
        Path(args.input),
        Path(args.out),
        save_probs=args.save_probs,
        threshold=args.threshold,
        device=args.device,
    )
    print(f"{len(result['images'])} image(s) -> {args.out} (lesions.json); {len(result['errors'])} error(s)")
    return 1 if result["errors"] else 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "predict", cmd_predict, help="overlays and per-lesion counts/areas for fundus images")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (RUN/checkpoints/best.pt)")
    p.add_argument("--input", required=True, help="an image (JPEG/PNG/TIFF) or a folder of them")
    p.add_argument("--out", required=True, help="output folder (overlays, lesions.json)")
    p.add_argument("--save-probs", action="store_true", help="also write float16 probability maps (.npz)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def cmd_export(args: argparse.Namespace) -> int:
    from hpc_drseg.export import OnnxMismatchError, export_model, format_checks

    try:
        result = export_model(args.checkpoint, args.out, args.format, overwrite=args.overwrite, check=not args.no_check)
    except OnnxMismatchError as exc:  # not a user error (exit 2) but a failed check: the figure, exit 1
        print(f"drseg export: error: {exc}", file=sys.stderr)
        return 1
    print(f"{result.format}: {result.out} (description: {result.sidecar})")
    if result.checks:
        print(f"onnxruntime vs PyTorch: max |Δlogit| {format_checks(result.checks)}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from hpc_drseg.export import EXPORT_FORMATS

    p = _command(sub, "export", cmd_export, help="a checkpoint as safetensors or ONNX, with a JSON description")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (RUN/checkpoints/best.pt)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="safetensors (weights) or onnx (graph)")
    p.add_argument("--out", required=True, help="file to write (*.safetensors / *.onnx); OUT.json is written beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never the checkpoint)")
    p.add_argument("--no-check", action="store_true", help="onnx: skip the ONNX Runtime vs PyTorch comparison")


# ------------------------------------------------------------------------------------------------------ bench
def cmd_bench_data(args: argparse.Namespace) -> int:
    from hpc_drseg.data.bench import benchmark_data, format_table

    workers = _int_list("--workers", args.workers)
    rows = benchmark_data(args.shards, workers, args.seconds, image_px=args.image_px, preset=args.preset)
    print(format_table(rows))
    return 0


def cmd_bench_masks(args: argparse.Namespace) -> int:
    from hpc_drseg.data.bench import format_mask_resize_table, mask_resize_table

    print(format_mask_resize_table(mask_resize_table(args.ddr_root, args.image_px)))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from hpc_drseg.train.bench import benchmark_train

    _setup_logging()
    benchmark_train(load_config(args.config, args.overrides), steps=args.steps, warmup=args.warmup)
    return 0


def cmd_bench_cbam(args: argparse.Namespace) -> int:
    from hpc_drseg.kernels.bench import PAPER_BATCH_SIZES, PAPER_SHAPES, benchmark_cbam, format_cbam_table, parse_shapes

    rows = benchmark_cbam(
        shapes=parse_shapes(args.shapes) if args.shapes else PAPER_SHAPES,
        batch_sizes=_int_list("--batch-sizes", args.batch_sizes) if args.batch_sizes else PAPER_BATCH_SIZES,
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


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures (data loading, training step, CBAM)")
    kinds = p.add_subparsers(dest="what", required=True, metavar="WHAT")

    data = _command(kinds, "data", cmd_bench_data, help="augmented samples/s per loader worker count")
    data.add_argument("--shards", default=None, help="shard folder (default: synthetic shards made on the fly)")
    data.add_argument("--workers", default="1,2", help="comma-separated loader worker counts (default 1,2)")
    data.add_argument("--seconds", type=float, default=10.0, help="measuring time per setting (default 10)")
    data.add_argument("--image-px", type=int, default=512, help="side of the augment-only measurement (default 512)")
    data.add_argument("--preset", default="paper", choices=AUGMENT_PRESETS, help="augmentation preset")

    masks = _command(
        kinds, "masks", cmd_bench_masks, help="lesion area and microaneurysms kept by each --mask-resize rule"
    )
    masks.add_argument("--ddr-root", required=True, help="DDR tree (real or from drseg synth) to measure")
    masks.add_argument("--image-px", type=int, default=512, help="side the masks are resized to (default 512)")

    metrics = _command(kinds, "metrics", cmd_bench_metrics, help="streaming AP of the standard protocol vs sklearn")
    metrics.add_argument("--images", type=int, default=4, help="native-size images per batch (default 4)")
    metrics.add_argument("--side-px", type=int, default=1024, help="image side (default 1024)")
    metrics.add_argument("--score-bits", type=int, default=10, help="eval.score_bits (default 10)")
    metrics.add_argument("--repeats", type=int, default=3, help="best of this many streaming runs (default 3)")

    train = _command(kinds, "train", cmd_bench_train, help="training step img/s, TFLOP/s, peak memory")
    _add_config_args(train)
    _add_step_args(train)

    cbam = _command(kinds, "cbam", cmd_bench_cbam, help="fused Triton CBAM vs eager and compiled, and a train step")
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

    gpu = _command(
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


# ------------------------------------------------------------------------------------------------------ sweeps
def cmd_sweep_run(args: argparse.Namespace) -> int:
    from hpc_drseg import sweep

    if not args.config:
        raise InputError("drseg sweep run needs --config SWEEP.yaml (e.g. configs/sweep_loss_weights.yaml)")
    _setup_logging()
    result = sweep.run_sweep(
        args.config,
        args.overrides,
        executor=args.executor,
        sweep_dir=args.sweep_dir,
        resume=args.resume,
        wait=args.wait,
    )
    print(sweep.format_run(result))
    if result.get("summary"):
        print(Path(result["summary"]).read_text(), end="")
    elif result.get("submitted"):
        print(f"follow it with: drseg sweep status {result['sweep_dir']}")
    return 0


def _sweep_dir(args: argparse.Namespace) -> str:
    if not args.sweep_dir:
        raise InputError(f"usage: drseg sweep {args.action} SWEEP_DIR (got no folder)")
    return args.sweep_dir


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from hpc_drseg import sweep

    rows = sweep.sweep_status(_sweep_dir(args))
    print(json.dumps(rows, indent=2) if args.json else sweep.format_status(rows))
    return 0


def cmd_sweep_collect(args: argparse.Namespace) -> int:
    from hpc_drseg import sweep

    paths = sweep.collect_sweep(_sweep_dir(args), rank_by=args.rank_by)
    print(paths["md"].read_text(), end="")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="grid/random sweeps × seeds as one submitit job array; status; summary",
        description="drseg sweep [run] --config SWEEP.yaml [key=value …] | drseg sweep status SWEEP_DIR | "
        "drseg sweep collect SWEEP_DIR [--rank-by METRIC]",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = _command(actions, "run", cmd_sweep_run, help="validate every trial, write the sweep folder, submit")
    run.add_argument("--config", "-c", help="sweep spec YAML (see configs/sweep_*.yaml)")
    run.add_argument("--executor", choices=EXECUTOR_KINDS, help="override executor.kind")
    run.add_argument(
        "--sweep-dir", default=None, help="output folder (default: the spec's sweep_dir, else sweeps/NAME)"
    )
    run.add_argument("--resume", action="store_true", help="rerun the failed / never-submitted trials of the sweep")
    run.add_argument("--wait", action="store_true", help="slurm: wait for the array to finish, then collect")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="sweep-spec overrides")

    status = _command(actions, "status", cmd_sweep_status, help="per-trial state (PENDING/RUNNING/COMPLETED/FAILED)")
    status.add_argument("sweep_dir", nargs="?", metavar="SWEEP_DIR", help="the sweep folder")
    status.add_argument("--json", action="store_true", help="print JSON")

    collect = _command(actions, "collect", cmd_sweep_collect, help="summary.md/.csv (mean ± std over seeds), plots")
    collect.add_argument("sweep_dir", nargs="?", metavar="SWEEP_DIR", help="the sweep folder")
    collect.add_argument("--rank-by", default=None, help="summary column to rank by (default: eval.rank_by)")


# ------------------------------------------------------------------------------------------------------- parsing
def exit_process_if_distributed(status: int) -> int:
    """A rank of a multi-process run that has finished its work leaves at once with `status`. Interpreter teardown
    would destroy the communication threads of the process group (gloo, NCCL) in no set order, and one still joinable
    aborts the process ("terminate called without an active exception", SIGABRT) — a finished run must never end
    non-zero for teardown reasons. Everything worth keeping is written and flushed before this point."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return status
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drseg", description="Diabetic-retinopathy lesion segmentation on GPU clusters.", epilog=EPILOG
    )
    parser.add_argument("--version", action="version", version=f"hpc_drseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_shard, _add_config, _add_info, _add_train, _add_eval, _add_report, _add_predict):
        add(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_sweep(sub)
    return parser


def _with_default_sweep_action(argv: list[str]) -> list[str]:
    """`drseg sweep --config F` means `drseg sweep run --config F`, as the sweep command always allowed."""
    if len(argv) >= 2 and argv[0] == "sweep" and argv[1] not in (*SWEEP_ACTIONS, "-h", "--help"):
        return ["sweep", "run", *argv[1:]]
    return argv


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = _with_default_sweep_action(list(sys.argv[1:] if argv is None else argv))
    # Overrides may come before or after options (`--config F a=1 --json b=2`); argparse stops collecting a
    # positional list at the first option, so the stragglers are picked up here.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return exit_process_if_distributed(args.func(args))
    except DrsegError as exc:
        print(f"drseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None or os.environ.get("DRSEG_TRACEBACK"):
            raise
        # The file system refused (a read-only or deleted run folder, permissions): say where, in one line.
        path = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
        print(
            f"drseg {args.command}: error: {exc.strerror or exc}: {path} (DRSEG_TRACEBACK=1 shows where)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"drseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

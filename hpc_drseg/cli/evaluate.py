"""`drseg eval` (a run, or any checkpoint on any shard set), `drseg report`, `drseg predict` and `drseg export`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpc_drseg.cli.common import add_command, fmt_metric, is_main_process, setup_logging
from hpc_drseg.config.choices import CHECKPOINT_CHOICES, EVAL_PROTOCOLS
from hpc_drseg.errors import InputError


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

    setup_logging()
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
    if is_main_process():
        print(f"dataset {result['dataset']}, split {args.split}, checkpoint {result['checkpoint']}")
        for name, metrics in result["protocols"].items():
            print(f"{name:>8} protocol: mAP {fmt_metric(metrics['mAP'])}  mIoU {fmt_metric(metrics['mIoU'])}")
        print(f"report: {write_run_report(report_dir)}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = add_command(
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


def add_report(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "report", cmd_report, help="Table I report of one run, or several runs or datasets side by side"
    )
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


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "predict", cmd_predict, help="overlays and per-lesion counts/areas for fundus images")
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


def add_export(sub: argparse._SubParsersAction) -> None:
    from hpc_drseg.export import EXPORT_FORMATS

    p = add_command(sub, "export", cmd_export, help="a checkpoint as safetensors or ONNX, with a JSON description")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (RUN/checkpoints/best.pt)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="safetensors (weights) or onnx (graph)")
    p.add_argument("--out", required=True, help="file to write (*.safetensors / *.onnx); OUT.json is written beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never the checkpoint)")
    p.add_argument("--no-check", action="store_true", help="onnx: skip the ONNX Runtime vs PyTorch comparison")

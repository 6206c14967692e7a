"""`drseg` command line: parse, load config, call. The only module that reads sys.argv.

Heavy modules (torch, webdataset, albumentations) are imported inside each command, so `drseg --help` and config
validation stay instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hpc_drseg import __version__
from hpc_drseg.config import ConfigError, describe_fields, dump_config, load_config
from hpc_drseg.constants import IMAGE_CODECS, SPLITS

EPILOG = "Overrides are dotted key=value pairs, e.g. optim.lr=3e-4 model.cbam.sites=[aspp]; see `drseg config keys`."


# ------------------------------------------------------------------------------------------------------ commands
def cmd_synth(args: argparse.Namespace) -> int:
    from hpc_drseg.data.synth import write_synthetic_ddr

    counts = {"train": args.train, "valid": args.valid, "test": args.test}
    out = write_synthetic_ddr(
        args.out,
        counts=counts,
        size_px=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        workers=args.workers,
    )
    print(f"synthetic DDR tree written to {out} ({sum(counts.values())} images)")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from hpc_drseg.data.shards import write_shards

    manifest = write_shards(
        args.ddr_root,
        args.out,
        image_px=args.image_px,
        overwrite=args.overwrite,
        allow_missing_masks=args.allow_missing_masks,
        workers=args.workers,
        progress=not args.quiet,
        image_codec=args.image_codec,
    )
    for split, info in manifest["splits"].items():
        lesions = " ".join(f"{k}={v}" for k, v in info["lesion_images"].items())
        print(f"{split:>5}: {info['images']:4d} images in {len(info['shards'])} shards; images with lesion: {lesions}")
    print(f"shards written to {args.out} (manifest.json)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "keys":
        for key, default, doc in describe_fields():
            print(f"{key:<32} {default:<28} {doc}")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.action == "show":
        print(dump_config(cfg), end="")
    else:
        print(f"ok: {args.config or 'defaults'} is a valid configuration")
    return 0


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


def cmd_train(args: argparse.Namespace) -> int:
    from hpc_drseg.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    _setup_logging()
    result = train(cfg)
    print(f"{result.run_dir}: {result.reason} (epoch {result.progress.epoch}, step {result.progress.global_step})")
    return result.exit_code


def cmd_eval(args: argparse.Namespace) -> int:
    from hpc_drseg.evaluate import evaluate_run
    from hpc_drseg.report import write_run_report

    _setup_logging()
    result = evaluate_run(args.run, split=args.split, protocol=args.protocol, which=args.checkpoint,
                          overrides=args.overrides)  # fmt: skip
    if _is_main_process():
        for name, metrics in result["protocols"].items():
            print(f"{name:>8} protocol: mAP {_fmt(metrics['mAP'])}  mIoU {_fmt(metrics['mIoU'])}")
        print(f"report: {write_run_report(Path(args.run))}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hpc_drseg.report import compare_runs, write_run_report

    if len(args.runs) == 1 and args.out is None:
        print(f"report: {write_run_report(Path(args.runs[0]))}")
    else:
        print(compare_runs([Path(r) for r in args.runs], Path(args.out) if args.out else None, split=args.split))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from hpc_drseg.predict import predict

    result = predict(Path(args.checkpoint), Path(args.input), Path(args.out), save_probs=args.save_probs,
                     threshold=args.threshold, device=args.device)  # fmt: skip
    print(f"{len(result['images'])} image(s) -> {args.out} (lesions.json); {len(result['errors'])} error(s)")
    return 1 if result["errors"] else 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging() -> None:
    import logging
    import os

    # Only the main process talks; the others log warnings and errors.
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")


def _bench_cbam(args: argparse.Namespace) -> int:
    from hpc_drseg.kernels.bench import PAPER_BATCH_SIZES, PAPER_SHAPES, benchmark_cbam, format_cbam_table, parse_shapes

    rows = benchmark_cbam(
        parse_shapes(args.shapes) if args.shapes else PAPER_SHAPES,
        [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else PAPER_BATCH_SIZES,
        args.dtype, not args.nchw, args.impls.split(","), iters=args.iters,
        train_step=not args.no_train_step, train_image_px=args.image_px, train_steps=args.steps,
        train_warmup=args.warmup, train_overrides=args.overrides,
    )  # fmt: skip
    print(format_cbam_table(rows))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "data":
        from hpc_drseg.data.bench import benchmark_data, format_table

        workers = [int(w) for w in args.workers.split(",")]
        rows = benchmark_data(args.shards, workers, args.seconds, image_px=args.image_px, preset=args.preset)
        print(format_table(rows))
        return 0
    if args.what == "cbam":
        return _bench_cbam(args)
    if args.what == "train":
        from hpc_drseg.train.bench import benchmark_train

        _setup_logging()
        benchmark_train(load_config(args.config, args.overrides), steps=args.steps, warmup=args.warmup)
        return 0
    raise ValueError(f"unknown benchmark {args.what!r}")


# -------------------------------------------------------------------------------------------------------- sweeps
SWEEP_ACTIONS = ("run", "status", "collect")


def cmd_sweep(args: argparse.Namespace) -> int:
    from hpc_drseg import sweep

    words = list(args.overrides)
    action = words.pop(0) if words and words[0] in SWEEP_ACTIONS else "run"
    if action == "run":
        if not args.config:
            raise ValueError("drseg sweep run needs --config SWEEP.yaml (e.g. configs/sweep_loss_weights.yaml)")
        _setup_logging()
        result = sweep.run_sweep(args.config, words, executor=args.executor, sweep_dir=args.sweep_dir,
                                 resume=args.resume, wait=args.wait)  # fmt: skip
        print(sweep.format_run(result))
        if result.get("summary"):
            print(Path(result["summary"]).read_text(), end="")
        elif result.get("submitted"):
            print(f"follow it with: drseg sweep status {result['sweep_dir']}")
        return 0
    if len(words) != 1 or "=" in words[0]:
        raise ValueError(f"usage: drseg sweep {action} SWEEP_DIR (got {words or 'no folder'})")
    if action == "status":
        rows = sweep.sweep_status(words[0])
        print(json.dumps(rows, indent=2) if args.json else sweep.format_status(rows))
        return 0
    paths = sweep.collect_sweep(words[0], rank_by=args.rank_by)
    print(paths["md"].read_text(), end="")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="grid/random sweeps × seeds as one submitit job array; status; summary",
        description="drseg sweep [run] --config SWEEP.yaml [--executor slurm|local|debug] [key=value …] | "
        "drseg sweep status SWEEP_DIR | drseg sweep collect SWEEP_DIR [--rank-by METRIC]",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="[run|status|collect] [SWEEP_DIR] [key=value]",
        help="action (default run), the sweep folder (status, collect), sweep-spec overrides (run)",
    )
    p.add_argument("--config", "-c", help="sweep spec YAML (see configs/sweep_*.yaml)")
    p.add_argument("--executor", choices=("slurm", "local", "debug"), help="override executor.kind")
    p.add_argument("--sweep-dir", default=None, help="output folder (default: sweep_dir of the spec, else sweeps/NAME)")
    p.add_argument("--resume", action="store_true", help="rerun the failed / never-submitted trials of SWEEP_DIR")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the array to finish, then collect")
    p.add_argument("--rank-by", default=None, help="collect: summary column to rank by (default: eval.rank_by)")
    p.add_argument("--json", action="store_true", help="status: print JSON")
    p.set_defaults(func=cmd_sweep)


# ------------------------------------------------------------------------------------------------------- parsing
def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML file of partial overrides (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drseg", description="Diabetic-retinopathy lesion segmentation on GPU clusters.", epilog=EPILOG
    )
    parser.add_argument("--version", action="version", version=f"hpc_drseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write synthetic DDR-like data in the official layout")
    p.add_argument("--out", required=True, help="output folder (gets lesion_segmentation/{train,valid,test}/…)")
    for split, default in zip(SPLITS, (383, 149, 225)):
        p.add_argument(f"--{split}", type=int, default=default, help=f"{split} images (default {default}, as DDR)")
    p.add_argument("--size", type=int, default=1024, help="nominal image side in px; sides vary ±15%% (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("shard", help="convert a DDR tree (real or synthetic) into WebDataset shards")
    p.add_argument("--ddr-root", required=True, help="folder holding lesion_segmentation/ (or that folder itself)")
    p.add_argument("--out", required=True, help="shard folder to create (tars + manifest.json)")
    p.add_argument("--image-px", type=int, default=512, help="training image side (default 512, the paper's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    p.add_argument("--allow-missing-masks", action="store_true", help="treat a missing mask file as all-zero")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument(
        "--image-codec", default=IMAGE_CODECS[0], choices=IMAGE_CODECS,
        help="training images as PNG (default, 2.4x smaller) or raw .npy (decode ~40x cheaper; for CPU-bound nodes)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("config", help="show, check or list configuration keys")
    p.add_argument("action", choices=("show", "check", "keys"), help="show resolved YAML, check it, or list all keys")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("info", help="parameters, training FLOPs and output shape of the configured model")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a model (resumes an existing run directory)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a run with the paper and standard protocols, then write its report")
    p.add_argument(
        "--run", "--run-dir", dest="run", required=True,
        help="run directory made by drseg train (under torchrun use --run-dir: torchrun reads --run as --run-path)",
    )  # fmt: skip
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--protocol", default="both", choices=("paper", "standard", "both"), help="default both")
    p.add_argument("--checkpoint", default="auto", choices=("auto", "best", "last"), help="default: best, else last")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the run's config (e.g. data.*)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="Table I report of one run, or several runs side by side")
    p.add_argument("runs", nargs="+", help="run directories (with eval_*.json from drseg eval)")
    p.add_argument("--out", default=None, help="write the side-by-side table here (.md, and .csv beside it)")
    p.add_argument("--split", default="test", help="split to compare (default test)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="overlays and per-lesion counts/areas for fundus images")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (RUN/checkpoints/best.pt)")
    p.add_argument("--input", required=True, help="an image (JPEG/PNG/TIFF) or a folder of them")
    p.add_argument("--out", required=True, help="output folder (overlays, lesions.json)")
    p.add_argument("--save-probs", action="store_true", help="also write float16 probability maps (.npz)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="benchmarks that print figures (data loading, …)")
    p.add_argument("what", choices=("data", "train", "cbam"),
                   help="data: loader samples/s; train: training step img/s; cbam: fused vs eager CBAM")  # fmt: skip
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed training steps (train benchmark, default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (train benchmark, default 3)")
    p.add_argument("--shapes", default=None, help="cbam: CxHxW list, e.g. 256x16x16,48x128x128 (default: paper's)")
    p.add_argument("--batch-sizes", default=None, help="cbam: comma-separated batch sizes (default 4,16)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="cbam: input dtype")
    p.add_argument("--nchw", action="store_true", help="cbam: NCHW instead of channels_last")
    p.add_argument("--impls", default="eager,compile,triton", help="cbam: implementations to time")
    p.add_argument("--iters", type=int, default=50, help="cbam: timed iterations per setting")
    p.add_argument("--no-train-step", action="store_true", help="cbam: skip the full training-step comparison")
    p.add_argument("--shards", default=None, help="shard folder (data benchmark)")
    p.add_argument("--workers", default="1,2", help="comma-separated loader worker counts (default 1,2)")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per setting (default 10)")
    p.add_argument("--image-px", type=int, default=512, help="data: augment-only side; cbam: train-step side")
    p.add_argument("--preset", default="paper", choices=("paper", "light", "none"), help="augmentation preset")
    p.set_defaults(func=cmd_bench)
    _add_sweep_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    # Overrides may come before or after options (`--config F a=1 --json b=2`); argparse stops collecting a
    # positional list at the first option, so the stragglers are picked up here.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"drseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

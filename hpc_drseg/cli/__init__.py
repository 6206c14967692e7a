"""`drseg` command line: parse, load config, call. The only package that reads sys.argv.

One small builder per command, grouped by topic: data (synth, shard), train (config, info, train), evaluate (eval,
report, predict, export), bench and sweep; `bench`, `config` and `sweep` have sub-commands. Heavy modules (torch,
webdataset, albumentations) are imported inside each command, so `drseg --help` and config validation stay instant.
A user error (DrsegError) is printed as one line with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from hpc_drseg import __version__
from hpc_drseg.cli import bench, data, evaluate, sweep, train
from hpc_drseg.cli.common import EPILOG
from hpc_drseg.errors import DrsegError

__all__ = ["build_parser", "exit_process_if_distributed", "main", "parse_args"]


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
    # The order of `drseg --help`'s command list.
    for add in (
        data.add_synth,
        data.add_shard,
        train.add_config,
        train.add_info,
        train.add_train,
        evaluate.add_eval,
        evaluate.add_report,
        evaluate.add_predict,
        evaluate.add_export,
        bench.add_bench,
        sweep.add_sweep,
    ):
        add(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sweep.with_default_sweep_action(list(sys.argv[1:] if argv is None else argv))
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

"""`drseg sweep run|status|collect`: grid/random sweeps × seeds as one submitit job array, their state, their summary.

`drseg sweep --config F …` (no action) means `drseg sweep run --config F …`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpc_drseg.cli.common import add_command, setup_logging
from hpc_drseg.config.choices import EXECUTOR_KINDS
from hpc_drseg.errors import InputError

SWEEP_ACTIONS = ("run", "status", "collect")


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from hpc_drseg import sweep

    if not args.config:
        raise InputError("drseg sweep run needs --config SWEEP.yaml (e.g. configs/sweep_loss_weights.yaml)")
    setup_logging()
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


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="grid/random sweeps × seeds as one submitit job array; status; summary",
        description="drseg sweep [run] --config SWEEP.yaml [key=value …] | drseg sweep status SWEEP_DIR | "
        "drseg sweep collect SWEEP_DIR [--rank-by METRIC]",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = add_command(actions, "run", cmd_sweep_run, help="validate every trial, write the sweep folder, submit")
    run.add_argument("--config", "-c", help="sweep spec YAML (see configs/sweep_*.yaml)")
    run.add_argument("--executor", choices=EXECUTOR_KINDS, help="override executor.kind")
    run.add_argument(
        "--sweep-dir", default=None, help="output folder (default: the spec's sweep_dir, else sweeps/NAME)"
    )
    run.add_argument("--resume", action="store_true", help="rerun the failed / never-submitted trials of the sweep")
    run.add_argument("--wait", action="store_true", help="slurm: wait for the array to finish, then collect")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="sweep-spec overrides")

    status = add_command(actions, "status", cmd_sweep_status, help="per-trial state (PENDING/RUNNING/COMPLETED/FAILED)")
    status.add_argument("sweep_dir", nargs="?", metavar="SWEEP_DIR", help="the sweep folder")
    status.add_argument("--json", action="store_true", help="print JSON")

    collect = add_command(actions, "collect", cmd_sweep_collect, help="summary.md/.csv (mean ± std over seeds), plots")
    collect.add_argument("sweep_dir", nargs="?", metavar="SWEEP_DIR", help="the sweep folder")
    collect.add_argument("--rank-by", default=None, help="summary column to rank by (default: eval.rank_by)")


def with_default_sweep_action(argv: list[str]) -> list[str]:
    """`drseg sweep --config F` means `drseg sweep run --config F`, as the sweep command always allowed."""
    if len(argv) >= 2 and argv[0] == "sweep" and argv[1] not in (*SWEEP_ACTIONS, "-h", "--help"):
        return ["sweep", "run", *argv[1:]]
    return argv

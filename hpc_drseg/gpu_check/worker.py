"""One part of `drseg bench gpu` in a process of its own (the driver starts it and kills it at its time limit, so a
hang, a CUDA error or a global mode such as sync debugging cannot reach the other parts):

    python -m hpc_drseg.gpu_check.worker PART --results FILE --work DIR --until UNIX_TIME [--dry-run]

Exit status 0: done; 3: skipped (reason in WORK/PART.status.json); 1: failed (traceback on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from hpc_drseg.gpu_check.context import Context, PartSkipped
from hpc_drseg.gpu_check.plan import PART_NAMES, sizes_for

EXIT_SKIPPED = 3
# part name -> module holding its `run(ctx)`
MODULES = {
    "environment": "environment",
    "gpu_tests": "gpu_tests",
    "data": "data",
    "throughput": "throughput",
    "loader": "throughput",
    "cbam": "cbam",
    "full_run": "full_run",
    "sync_debug": "sync_debug",
}
RUNNERS = {"loader": "run_loader"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc_drseg.gpu_check.worker")
    parser.add_argument("part", choices=PART_NAMES)
    parser.add_argument("--results", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--until", type=float, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    ctx = Context(args.part, Path(args.results), Path(args.work), args.dry_run, sizes_for(args.dry_run), args.until)
    try:
        module = importlib.import_module(f"hpc_drseg.gpu_check.{MODULES[args.part]}")
        getattr(module, RUNNERS.get(args.part, "run"))(ctx)
    except PartSkipped as exc:
        ctx.write_status("skipped", str(exc))
        return EXIT_SKIPPED
    except ModuleNotFoundError as exc:
        reason = f"missing import {exc.name!r} (carry the wheels: bash launch/gpu_wheels.sh)"
        ctx.write_status("skipped", reason)
        return EXIT_SKIPPED
    except Exception as exc:  # a failed part is a figure for the report, not a crash of the run: record, go on
        traceback.print_exc()
        ctx.write_status("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

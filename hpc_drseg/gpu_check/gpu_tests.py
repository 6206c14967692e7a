"""Part 2 of `drseg bench gpu`: the repository's GPU-marked tests (`pytest -m gpu -x -q`), with their counts."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from hpc_drseg.gpu_check.context import Context, PartSkipped

LIMIT_S = 120.0
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def parse_counts(output: str) -> dict[str, int]:
    """Counts from pytest's closing line ('3 passed, 1 skipped, 950 deselected in 12.3s'); errors under "error"."""
    closing = [line for line in output.splitlines() if re.search(r"\bin [\d.]+s\b", line) and _COUNT.search(line)]
    if not closing:
        return {}
    counts: dict[str, int] = {}
    for number, word in _COUNT.findall(closing[-1]):
        counts["error" if word.startswith("error") else word] = int(number)
    return counts


def run(ctx: Context) -> None:
    import torch

    if ctx.dry_run or not torch.cuda.is_available():
        raise PartSkipped("needs CUDA: the GPU-marked tests skip without it")
    tests = ctx.repo_file("tests")
    if not tests.is_dir():
        raise PartSkipped(f"no tests/ folder at {tests}: run from a checkout of the repository")
    limit = min(LIMIT_S, ctx.left_s() - 10)  # time to report before the driver's own limit
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider", str(tests)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=tests.parent, capture_output=True, text=True, timeout=limit)
        output, returncode, timed_out = done.stdout + done.stderr, done.returncode, False
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        returncode, timed_out = None, True
    print(output, flush=True)
    counts = parse_counts(output)
    ctx.emit(
        {
            "kind": "gpu_tests",
            "command": " ".join(command[1:]),
            "returncode": returncode,
            "timed_out": timed_out,
            "limit_s": limit,
            "seconds": time.perf_counter() - started,
            **{key: counts.get(key, 0) for key in ("passed", "failed", "skipped", "error", "deselected")},
            "passed_all": returncode == 0 and not counts.get("failed") and not counts.get("error"),
            "closing_line": next((line for line in reversed(output.splitlines()) if line.strip()), ""),
        }
    )

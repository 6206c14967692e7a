"""DIR/results.jsonl, one JSON object per line, each flushed and fsynced as it is written (a run killed at any moment
keeps every row it measured), and the summary table printed at the end. Standard library only."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS_NAME = "results.jsonl"
PHASES = ("startup", "train", "validation", "checkpoint")


def _plain(value: Any) -> Any:
    """JSON has no NaN/inf, and tuples read back as lists anyway: write what reads back the same."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Appends one line and makes it durable before returning (O_APPEND: one write per line, never interleaved)."""
    line = json.dumps(_plain(row), sort_keys=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every complete row (none before the first is written); a last line cut short by a kill is left out."""
    rows: list[dict[str, Any]] = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _num(value: Any, spec: str = ".4g") -> str:
    return "—" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def _part_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| part | status | seconds | note |", "|---|---|---:|---|"]
    for row in rows:
        if row.get("kind") == "part":
            note = row.get("reason", "")
            lines.append(f"| {row['part']} | {row['status']} | {_num(row.get('seconds'), '.1f')} | {note} |")
    return lines


def _throughput_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| setting | project img/s | baseline img/s | ratio | compile s (project / baseline) |"]
    lines.append("|---|---:|---:|---:|---|")
    for row in rows:
        if row.get("kind") == "throughput":
            compile_s = ""
            if row.get("project_compile_s") is not None:
                compile_s = f"{_num(row['project_compile_s'], '.1f')} / {_num(row.get('baseline_compile_s'), '.1f')}"
            rates = f"{_num(row.get('project_img_s'), '.1f')} | {_num(row.get('baseline_img_s'), '.1f')}"
            skipped = f" (skipped: {row['skipped']})" if row.get("skipped") else ""
            lines.append(f"| {row['setting']}{skipped} | {rates} | {_num(row.get('ratio'), '.3f')} | {compile_s} |")
    return lines


def _other_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        kind = row.get("kind")
        if kind == "environment":
            lines.append(
                f"environment: {row.get('device')}; torch {row.get('torch')}, triton {row.get('triton')}, "
                f"python {row.get('python')}; matmul {_num(row.get('matmul_tflops'), '.1f')} TFLOP/s "
                f"({row.get('matmul_dtype')}), copy {_num(row.get('copy_gbps'), '.1f')} GB/s, nproc {row.get('nproc')}"
            )
        elif kind == "loader":
            synthetic = _num(row.get("synthetic_img_s"), ".1f")
            lines.append(
                f"loader {row['setting']}: {_num(row.get('loader_img_s'), '.1f')} img/s vs {synthetic} on synthetic "
                f"on-device batches (ratio {_num(row.get('ratio'), '.3f')})"
            )
        elif kind == "cbam":
            lines.append(
                f"cbam {row.get('shape')} batch {row.get('batch')} {row.get('impl')}: "
                f"fwd+bwd {_num(row.get('fwd_bwd_ms'), '.4f')} ms, kernels {_num(row.get('kernels_fwd_bwd'))}"
                + (f" (skipped: {row['skipped']})" if row.get("skipped") else "")
            )
        elif kind == "full_run":
            phases = ", ".join(f"{name} {_num(row.get(f'{name}_s'), '.1f')}" for name in PHASES)
            goal = f"goal ≤ {_num(row.get('goal_s'), '.0f')} s: {'met' if row.get('goal_met') else 'NOT met'}"
            lines.append(
                f"full run {row.get('epochs')} epochs: {_num(row.get('wall_s'), '.1f')} s ({phases}); "
                f"100 epochs ≈ {_num(row.get('extrapolated_100_epochs_s'), '.0f')} s ({goal})"
            )
        elif kind in ("gpu_tests", "sync_debug"):
            detail = {k: v for k, v in row.items() if k not in ("kind", "part")}
            lines.append(f"{kind}: {json.dumps(detail)[:300]}")
    return lines


def format_summary(rows: Iterable[dict[str, Any]]) -> str:
    """Plain-text summary: one line per part (status, seconds, reason), the throughput table, then the other figures."""
    rows = list(rows)
    throughput = _throughput_lines(rows) if any(row.get("kind") == "throughput" for row in rows) else []
    return "\n".join([*_part_lines(rows), "", *throughput, "", *_other_lines(rows)]).replace("\n\n\n", "\n\n")

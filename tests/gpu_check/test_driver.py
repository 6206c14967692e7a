"""`drseg bench gpu`: the dry run on CPU writes every part's rows (>= 4 project-vs-baseline ratios, the environment,
skipped parts with their reasons) and the summary; the deadline, a missing import and a part's time limit are each
recorded rather than crashing the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_drseg.gpu_check.driver import Run, _after, part_limit, run_worker, skip_reason
from hpc_drseg.gpu_check.gpu_tests import parse_counts
from hpc_drseg.gpu_check.plan import PART_NAMES, PARTS, Part
from hpc_drseg.gpu_check.results import append_row, read_rows

REPO = Path(__file__).resolve().parents[2]
DRY_RUN_LIMIT_S = 300  # measured ~75 s on a loaded 2-core machine; the limit only stops a hang


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu") / "out"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [sys.executable, "-m", "hpc_drseg", "bench", "gpu", "--dry-run", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=DRY_RUN_LIMIT_S)
    return done, out


def test_dry_run_writes_every_part(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_rows(out / "results.jsonl")
    status = {row["part"]: row for row in rows if row.get("kind") == "part"}
    assert list(status) == list(PART_NAMES), status
    assert {name for name, row in status.items() if row["status"] == "skipped"} == {"gpu_tests", "sync_debug"}
    assert all(row["reason"] == "dry run: needs CUDA" for row in status.values() if row["status"] == "skipped")

    ratios = [row for row in rows if row.get("kind") == "throughput" and row.get("ratio")]
    assert len(ratios) >= 4, ratios
    for row in ratios:
        assert row["ratio"] == pytest.approx(row["project_img_s"] / row["baseline_img_s"])
    assert ratios[-1]["compile"] and ratios[-1]["project_compile_s"] is not None

    (env,) = [row for row in rows if row.get("kind") == "environment"]
    assert env["matmul_tflops"] > 0 and env["copy_gbps"] > 0 and env["nproc"] >= 1 and env["torch"]
    assert set(env["imports"]) >= {"albumentations", "webdataset", "submitit", "deepspeed"}

    assert {row["where"] for row in rows if row.get("kind") == "loader"} == {"workers", "device"}
    cbam = [row for row in rows if row.get("kind") == "cbam"]
    assert {row["impl"] for row in cbam if "fwd_bwd_ms" in row} == {"eager"}
    assert all(row["skipped"] for row in cbam if row["impl"] in ("compile", "triton"))
    (full,) = [row for row in rows if row.get("kind") == "full_run"]
    assert full["epochs"] == 3 and len(full["history"]) == 3 and full["extrapolated_100_epochs_s"] > full["wall_s"]
    assert full["train_s"] > 0 and full["validation_s"] > 0 and full["checkpoint_s"] > 0

    summary = (out / "summary.txt").read_text()
    assert "compiled bf16 channels-last batch 4" in summary and summary.strip() in done.stdout


def _run(tmp_path: Path, deadline_s: float = 100.0) -> Run:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Run(tmp_path, deadline_s, dry_run=True, log=lambda line: None)


def test_a_part_is_skipped_with_the_reason(tmp_path):
    run = _run(tmp_path)
    assert "missing import no_such_module_xyz" in skip_reason(run, Part("x", 10, 1, needs=("no_such_module_xyz",)))
    run.until = time.time() + 5
    assert skip_reason(run, Part("x", 100, 30)).startswith("deadline: 5 s left")
    run.no_data = "no synthetic data: the data part failed"
    assert skip_reason(run, Part("x", 100, 1, needs_data=True)) == run.no_data
    assert skip_reason(run, next(p for p in PARTS if p.gpu_only)) == "dry run: needs CUDA"


@pytest.mark.parametrize("reported", [False, None], ids=["no-cuda", "no-environment-row"])
def test_a_full_run_without_cuda_skips_every_part_after_the_environment(tmp_path, reported):
    run = _run(tmp_path)
    run.dry_run = False
    if reported is not None:
        append_row(run.results, {"kind": "environment", "cuda_available": reported})
    environment, throughput = (next(p for p in PARTS if p.name == name) for name in ("environment", "throughput"))
    _after(run, environment, "ok" if reported is not None else "timed_out", "")
    reason = skip_reason(run, throughput)
    assert reason == run.no_cuda and ("--dry-run" in reason if reported is not None else "timed_out" in reason)


def test_a_part_leaves_the_later_parts_their_least_time(tmp_path):
    run = _run(tmp_path, deadline_s=200)
    later = [Part("b", 100, 50), Part("gpu", 100, 70, gpu_only=True)]  # skipped in a dry run: reserves nothing
    assert part_limit(run, Part("a", 300, 10), later) == pytest.approx(150, abs=1)
    assert part_limit(run, Part("a", 60, 10), later) == 60


def test_a_part_past_its_limit_is_killed_and_recorded(tmp_path):
    run = _run(tmp_path / "out")
    started = time.perf_counter()
    status, reason = run_worker(run, next(p for p in PARTS if p.name == "environment"), tmp_path, limit_s=0.5)
    assert (status, time.perf_counter() - started < 15) == ("timed_out", True)
    assert "limit of 0 s" in reason or "limit of 1 s" in reason


def test_cli_rejects_an_unknown_part_and_a_bad_deadline(tmp_path, capsys):
    from hpc_drseg.cli import main

    assert main(["bench", "gpu", "--out", str(tmp_path), "--parts", "environment,nope"]) == 2
    assert "--parts: unknown ['nope']" in capsys.readouterr().err
    assert main(["bench", "gpu", "--out", str(tmp_path), "--deadline-s", "0"]) == 2


@pytest.mark.parametrize(
    ("closing", "expected"),
    [
        ("==== 5 passed, 2 skipped, 900 deselected in 31.20s ====", {"passed": 5, "skipped": 2, "deselected": 900}),
        ("1 failed, 3 passed, 1 error in 4.0s", {"failed": 1, "passed": 3, "error": 1}),
        ("no tests ran in 0.1s", {}),
    ],
)
def test_pytest_counts_are_read_from_the_closing_line(closing, expected):
    assert parse_counts("collected 907 items\n" + closing + "\n") == expected


def test_rows_survive_a_cut_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"kind": "run"}) + "\n" + '{"kind": "throughput", "ratio"')
    assert read_rows(path) == [{"kind": "run"}]

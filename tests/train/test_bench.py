"""`drseg bench train` runs the real trainer for a few steps and reports consistent figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_drseg.config import load_config
from hpc_drseg.train.bench import benchmark_train

DEBUG_YAML = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"


@pytest.mark.parametrize("with_shards", [True, False], ids=["configured-shards", "synthetic-fallback"])
def test_bench_train_reports_figures(shards_dir, tmp_path, with_shards):
    shards = shards_dir if with_shards else tmp_path / "no-shards-here"
    cfg = load_config(DEBUG_YAML, [f"data.shards={shards}", "eval.score_bits=8"])
    lines: list[str] = []
    result = benchmark_train(cfg, steps=2, warmup=1, log=lines.append)
    assert result["device"] == "cpu" and result["processes"] == 1 and result["cbam_impl"] == "eager"
    for key in ("step_s_no_loader", "step_s_with_loader", "tflops_no_loader", "peak_memory_gb"):
        assert result[key] > 0, key
    assert result["img_per_s_no_loader"] == pytest.approx(2 / result["step_s_no_loader"])
    assert ("synthetic" in result["data"]) is not with_shards
    assert "img_per_s_with_loader" in lines[0]

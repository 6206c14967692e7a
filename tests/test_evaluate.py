"""`drseg eval`: the paper protocol's batches, and so its figures, are the same for any number of loader workers and
processes (each rank scores a contiguous share of whole batches); the standard protocol's summed counts likewise.
eval_<split>.json counts the images scored; the checkpoint must be a run checkpoint of the config's architecture."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_drseg.config import load_config
from hpc_drseg.evaluate import evaluate_run
from hpc_drseg.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
# The fixture's test split has 4 images in shards of 2: batches of 3 straddle a shard boundary ([3, 1]), which a
# loader that batched within each worker's or rank's shards would turn into [2, 2].
BATCHES_OF_3 = ["eval.batch_size=3", "eval.score_bits=8"]


@pytest.fixture(scope="module")
def trained_run(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    overrides = [f"data.shards={shards_dir}", f"train.run_dir={run_dir}", "train.max_epochs=1"]
    overrides.append("train.steps_per_epoch=3")
    assert train(load_config(REPO / "configs" / "debug.yaml", overrides)).exit_code == 0
    return run_dir


def _scores(result: dict) -> dict:
    protocols = result["protocols"]
    return {name: {key: protocols[name][key] for key in ("AP", "IoU", "mAP", "mIoU")} for name in protocols}


def _assert_close(a: dict, b: dict, rel: float = 1e-9) -> None:
    """Equal up to the order in which per-batch values were summed (rel 1e-9), or, across processes with other thread
    counts, up to the float rounding of the model's convolutions (rel 1e-4; other batches change figures by ≫ 1 %)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_close(a[key], b[key], rel)
        else:  # NaN (None once written to JSON): a lesion absent from the split has no standard AP
            x, y = (math.nan if v is None else v for v in (a[key], b[key]))
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rel, abs=1e-12), key


def test_paper_protocol_does_not_depend_on_loader_workers(trained_run: Path) -> None:
    one = evaluate_run(trained_run, overrides=[*BATCHES_OF_3, "data.num_workers=0"])
    two = evaluate_run(trained_run, overrides=[*BATCHES_OF_3, "data.num_workers=2"])
    _assert_close(_scores(one), _scores(two))
    # The check can fail: other batches give other paper figures.
    pairs = evaluate_run(trained_run, protocol="paper", overrides=["eval.batch_size=2", "data.num_workers=0"])
    assert _scores(pairs)["paper"] != _scores(one)["paper"]


@pytest.mark.slow
def test_two_process_eval_matches_one_process(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    one = evaluate_run(run_dir, overrides=[*BATCHES_OF_3, "data.num_workers=0"])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    command = [*launcher, "-m", "hpc_drseg", "eval", "--run-dir", str(run_dir), *BATCHES_OF_3, "data.num_workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    two = json.loads((run_dir / "eval_test.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    _assert_close(_scores(one), _scores(two), rel=1e-4)


def test_eval_records_the_images_scored(trained_run: Path) -> None:
    result = evaluate_run(trained_run, split="valid", protocol="paper", overrides=["data.num_workers=0"])
    assert result["images"] == 4
    assert json.loads((trained_run / "eval_valid.json").read_text())["images"] == 4


def test_eval_refuses_a_config_of_another_architecture(trained_run: Path) -> None:
    with pytest.raises(ValueError, match=r"holds another architecture .*\(model\.backbone: resnet18 → resnet34;"):
        evaluate_run(trained_run, overrides=["model.backbone=resnet34"])


def test_eval_loads_checkpoints_with_compile_wrapped_keys(trained_run: Path, tmp_path: Path) -> None:
    """Checkpoints of compiled models written before the keys were cleaned hold `_orig_mod.` prefixes."""
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    for path in (run_dir / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        state["model"] = {f"_orig_mod.{key}": value for key, value in state["model"].items()}
        torch.save(state, path)
    old = evaluate_run(run_dir, split="valid", protocol="paper", overrides=["data.num_workers=0"])
    new = evaluate_run(trained_run, split="valid", protocol="paper", overrides=["data.num_workers=0"])
    assert _scores(old) == _scores(new)


def test_eval_of_a_file_that_is_no_run_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    best = run_dir / "checkpoints" / "best.pt"
    torch.save(torch.load(best, weights_only=True)["model"], best)
    with pytest.raises(ValueError, match=r"best\.pt is not a hpc_drseg checkpoint: it holds a bare state dict"):
        evaluate_run(run_dir)


# ------------------------------------------------------------------------------------- cross-dataset evaluation
@pytest.fixture(scope="module")
def idrid_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic IDRiD tree (2 train, 3 test images) sharded at the debug config's 128 px with drseg shard."""
    from hpc_drseg.cli import main
    from hpc_drseg.data.synth_idrid import write_synthetic_idrid

    root = tmp_path_factory.mktemp("idrid")
    tree = write_synthetic_idrid(root / "IDRiD", {"train": 2, "test": 3}, size_px=160, progress=False, workers=1)
    argv = ["shard", "--layout", "idrid", "--root", str(tree), "--out", str(root / "shards"), "--image-px", "128"]
    assert main([*argv, "--workers", "1", "--quiet"]) == 0
    return root / "shards"


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path → (size, mtime_ns) of everything below `folder` (checkpoints are too large to compare bytes)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_ddr_checkpoint_scored_on_idrid_and_set_beside_ddr(
    trained_run: Path, idrid_shards: Path, shards_dir: Path, tmp_path: Path, capsys
) -> None:
    from hpc_drseg.cli import main

    checkpoint = trained_run / "checkpoints" / "last.pt"
    idrid_out, ddr_out = tmp_path / "idrid-test", tmp_path / "ddr-test"
    inputs = {folder: _listing(folder) for folder in (trained_run, idrid_shards, shards_dir)}
    common = ["--split", "test", "data.num_workers=0"]
    assert (
        main(["eval", "--checkpoint", str(checkpoint), "--shards", str(idrid_shards), "--out", str(idrid_out)] + common)
        == 0
    )
    assert "dataset IDRiD, split test" in capsys.readouterr().out
    result = json.loads((idrid_out / "eval_test.json").read_text())
    assert (result["dataset"], result["trained_on"], result["images"], result["run"]) == ("IDRiD", "DDR", 3, None)
    assert set(result["protocols"]) == {"paper", "standard"} and result["checkpoint"] == str(checkpoint)
    report = (idrid_out / "report.md").read_text()
    assert report.startswith("# Evaluation report: debug on IDRiD")
    assert f"of dataset **IDRiD**: checkpoint `{checkpoint}`" in report and "trained on DDR" in report
    # The same checkpoint on DDR's test split, chosen through its run (--run RUN --checkpoint last with --out).
    ddr = [
        "eval",
        "--run",
        str(trained_run),
        "--checkpoint",
        "last",
        "--shards",
        str(shards_dir),
        "--out",
        str(ddr_out),
    ]
    assert main(ddr + common) == 0
    assert json.loads((ddr_out / "eval_test.json").read_text())["dataset"] == "DDR"
    table = tmp_path / "datasets.md"
    assert main(["report", "--datasets", str(ddr_out), str(idrid_out), "--out", str(table)]) == 0
    text = table.read_text()
    assert "| lesion | DDR test AP | DDR test IoU | IDRiD test AP | IDRiD test IoU |" in text
    mean_row = next(line for line in text.split("### standard")[1].splitlines() if line.startswith("| mean |"))
    assert mean_row.split("|")[4].strip() == f"{result['protocols']['standard']['mAP']:.4f}"
    assert (tmp_path / "datasets.csv").is_file()
    assert {folder: _listing(folder) for folder in inputs} == inputs  # the run and the shards are only read
    print(text)  # the DDR-vs-IDRiD table (synthetic data), shown with -s


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("inside shards", "lies inside the input --shards"),
        ("run folder", "is a run folder or holds the checkpoint"),
        ("no shards", "needs --shards DIR"),
        ("no out", "give --run RUN"),
    ],
)
def test_eval_of_a_checkpoint_refuses_bad_outputs(
    trained_run: Path, idrid_shards: Path, tmp_path: Path, capsys, where: str, message: str
) -> None:
    from hpc_drseg.cli import main

    checkpoint = str(trained_run / "checkpoints" / "last.pt")
    out = {"inside shards": idrid_shards / "eval", "run folder": trained_run}.get(where, tmp_path / "out")
    argv = ["eval", "--checkpoint", checkpoint, "--shards", str(idrid_shards), "--out", str(out)]
    if where == "no shards":
        argv = argv[:3] + argv[5:]
    if where == "no out":
        argv = argv[:5]
    before = sorted(p.name for p in trained_run.iterdir())
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (idrid_shards / "eval").exists() and sorted(p.name for p in trained_run.iterdir()) == before

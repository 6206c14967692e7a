"""hpc_drseg.report on hand-written run folders: Table I layout for both protocols, paper reference column, CSV,
plots that are real PNGs, several runs side by side, and the error for a run that was never evaluated.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import pytest

from hpc_drseg.compare import compare_runs
from hpc_drseg.config import load_config, save_config
from hpc_drseg.constants import LESIONS
from hpc_drseg.report import PAPER_TABLE_I, PROTOCOL_TITLES, write_run_report

# Distinct hand-picked numbers, so that each one found in the report can only come from its own cell.
PAPER_AP = {"MA": 0.0111, "EX": 0.5222, "SE": 0.3333, "HE": 0.2444}
PAPER_IOU = {"MA": 0.0155, "EX": 0.3166, "SE": 0.1777, "HE": 0.1888}
STD_AP = {"MA": 0.0999, "EX": 0.6101, "SE": None, "HE": 0.3202}  # SE absent from the split → null
STD_AUPR = {"MA": 0.0888, "EX": 0.6003, "SE": None, "HE": 0.3104}
STD_IOU = {"MA": 0.0505, "EX": 0.4006, "SE": 0.0, "HE": 0.2107}
STD_DICE = {"MA": 0.0961, "EX": 0.5719, "SE": 0.0, "HE": 0.3481}


def mean(values: dict) -> float:
    present = [v for v in values.values() if v is not None]
    return sum(present) / len(present)


def eval_json(scale: float = 1.0) -> dict:
    def scaled(values: dict) -> dict:
        return {k: None if v is None else round(v * scale, 4) for k, v in values.items()}

    paper = {"AP": scaled(PAPER_AP), "IoU": scaled(PAPER_IOU)}
    standard = {"AP": scaled(STD_AP), "AUPR11": scaled(STD_AUPR), "IoU": scaled(STD_IOU), "Dice": scaled(STD_DICE)}
    for block in (paper, standard):
        block.update({f"m{metric}": mean(values) for metric, values in list(block.items())})
    thresholds = [i / 100 for i in range(101)]
    curves = {}
    for i, lesion in enumerate(LESIONS):
        recall = [None if lesion == "SE" else 1.0 - t**0.5 for t in thresholds]
        precision = [0.01 + (0.9 - 0.1 * i) * t for t in thresholds]
        curves[lesion] = {"precision": precision, "recall": recall}
    return {
        "run": "x",
        "checkpoint": "x/checkpoints/best.pt",
        "epoch": 7,
        "split": "test",
        "processes": 1,
        "protocols": {"paper": paper, "standard": standard},
        "pr_curves": curves,
    }


def metrics_csv(epochs: int = 3) -> str:
    terms = ("dice", "bce", "focal", "boundary", "total")
    validation = ["val/loss", "val/mAP", "val/mIoU", "val/mDice", "val/mAUPR11", "val/paper_mAP", "val/paper_mIoU"]
    per_lesion = [*(f"val/AP_{x}" for x in LESIONS), *(f"val/IoU_{x}" for x in LESIONS)]
    header = [
        "epoch",
        "step",
        "lr",
        *(f"train/{t}" for t in terms),
        *validation,
        *per_lesion,
        "epoch_time_s",
        "img_per_s",
    ]
    rows = [",".join(header)]
    for e in range(epochs):
        values = [e, 10 * (e + 1), 1e-4 / 2**e] + [1.0 / (e + 1)] * len(terms) + [0.9 - 0.1 * e]
        values += [0.1 * (e + 1)] * 6 + [0.05 * (e + 1)] * 8 + [60.0, 12.5]
        if e == 1:
            values[header.index("val/AP_SE")] = "nan"  # how csv.DictWriter writes float("nan")
        rows.append(",".join(str(v) for v in values))
    return "\n".join(rows) + "\n"


def make_run(root: Path, name: str, model: str, scale: float = 1.0, with_csv: bool = True) -> Path:
    run = root / name
    run.mkdir()
    cfg = load_config(None, [f"name={name}", f"model.name={model}"])
    save_config(cfg, run / "config.yaml")
    (run / "eval_test.json").write_text(json.dumps(eval_json(scale), indent=2))
    if with_csv:
        (run / "metrics.csv").write_text(metrics_csv())
    return run


def table_cells(markdown: str, title: str) -> dict[str, list[str]]:
    """{row label: cells} of the markdown table following the heading that contains `title`."""
    block = markdown.split(title, 1)[1]
    rows = {}
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_run_report_table_i_layout(tmp_path):
    run = make_run(tmp_path, "unet-a", "unet")
    path = write_run_report(run)
    assert path == run / "report.md"
    text = path.read_text()

    paper = table_cells(text, "paper protocol (Table I, biased)")
    labels = [f"AP {x}" for x in LESIONS] + ["mAP"] + [f"IoU {x}" for x in LESIONS] + ["mIoU"]
    assert list(paper) == labels
    assert "paper Table I (U-Net, test)" in text
    for lesion in LESIONS:
        assert paper[f"AP {lesion}"] == [f"{PAPER_AP[lesion]:.4f}", f"{PAPER_TABLE_I['unet']['AP'][lesion]:.4f}"]
        assert paper[f"IoU {lesion}"][0] == f"{PAPER_IOU[lesion]:.4f}"
    assert paper["mAP"] == [f"{mean(PAPER_AP):.4f}", "0.2391"]  # U-Net's mAP in the paper
    assert paper["mIoU"] == [f"{mean(PAPER_IOU):.4f}", "0.1757"]

    standard = table_cells(text, "standard protocol (native resolution, whole split)")
    assert list(standard)[:5] == [f"AP {x}" for x in LESIONS] + ["mAP"]
    assert {"AUPR11 MA", "mAUPR11", "Dice HE", "mDice", "mIoU"} <= set(standard)
    assert standard["AP SE"] == ["n/a"] and standard["AUPR11 SE"] == ["n/a"]
    assert standard["mAP"] == [f"{mean(STD_AP):.4f}"]
    assert standard["Dice EX"] == ["0.5719"]
    assert "best val/mAP (max): 0.3000 at epoch 2" in text


def test_run_report_csv_and_plots(tmp_path):
    run = make_run(tmp_path, "att", "attention_deeplab")
    write_run_report(run)
    with (run / "report.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0].keys() == {"protocol", "metric", "this run (test)", "paper Table I (Attention-DeepLab, test)"}
    by_key = {(r["protocol"], r["metric"]): r for r in rows}
    assert len(rows) == 10 + 20  # paper: 2 metrics × 5 rows; standard: 4 metrics × 5 rows
    assert float(by_key["paper", "AP HE"]["this run (test)"]) == PAPER_AP["HE"]
    assert float(by_key["paper", "mAP"]["paper Table I (Attention-DeepLab, test)"]) == 0.3326
    assert by_key["standard", "AP SE"]["this run (test)"] == ""  # null stays empty in the CSV
    assert by_key["standard", "mIoU"]["paper Table I (Attention-DeepLab, test)"] == ""
    for name in ("pr_curves.png", "training_curves.png"):
        image = cv2.imread(str(run / "plots" / name))
        assert image is not None and image.shape[0] > 200 and image.shape[1] > 400
        assert image.std() > 10  # something was drawn, not a blank canvas
        assert f"](plots/{name})" in (run / "report.md").read_text()
    assert not list(run.glob(".*.tmp")) and not list((run / "plots").glob(".*.tmp"))


def test_run_report_without_metrics_csv_and_standard(tmp_path):
    run = make_run(tmp_path, "dl", "deeplabv3plus", with_csv=False)
    content = json.loads((run / "eval_test.json").read_text())
    del content["protocols"]["standard"], content["pr_curves"]
    (run / "eval_test.json").write_text(json.dumps(content))
    text = write_run_report(run).read_text()
    assert "paper Table I (DeepLab-V3+, test)" in text and PROTOCOL_TITLES["standard"] not in text
    assert "training curves: not drawn (no metrics.csv)" in text
    assert not (run / "plots" / "pr_curves.png").exists()


def test_missing_eval_json_says_run_eval_first(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=r"drseg eval --run .*fresh"):
        write_run_report(run)
    other = make_run(tmp_path, "ok", "unet")
    with pytest.raises(FileNotFoundError, match=r"eval_test.json not found; run `drseg eval --run"):
        compare_runs([other, run], None)


def test_corrupt_eval_json_names_the_file(tmp_path):
    run = make_run(tmp_path, "bad", "unet")
    (run / "eval_test.json").write_text("{not json")
    with pytest.raises(ValueError, match="eval_test.json is not readable JSON"):
        write_run_report(run)


def test_compare_runs_side_by_side(tmp_path):
    a = make_run(tmp_path, "run-a", "attention_deeplab")
    b = make_run(tmp_path, "run-b", "unet", scale=0.5)
    out = tmp_path / "cmp" / "table.md"
    text = compare_runs([a, b], out)
    assert out.read_text() == text
    paper = table_cells(text, "paper protocol (Table I, biased)")
    header = next(line for line in text.splitlines() if "run-a" in line)
    assert header.index("run-a (Attention-DeepLab)") < header.index("run-b (U-Net)")
    assert "paper Table I (Attention-DeepLab, test)" in header and "paper Table I (U-Net, test)" in header
    ex_a, ex_b = PAPER_AP["EX"], round(PAPER_AP["EX"] * 0.5, 4)
    assert paper["AP EX"] == [f"**{ex_a:.4f}**", f"{ex_b:.4f}", "0.3960", "0.3578"]
    standard = table_cells(text, "standard protocol")
    assert standard["AP SE"] == ["n/a", "n/a"]
    with pytest.raises(ValueError, match="given twice"):
        compare_runs([a, b, a], None)
    with (tmp_path / "cmp" / "table.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["protocol", "metric", "run-a (Attention-DeepLab)", "run-b (U-Net)"]
    mean_row = next(r for r in rows if r[:2] == ["paper", "mAP"])
    assert math.isclose(float(mean_row[3]), mean({k: round(v * 0.5, 4) for k, v in PAPER_AP.items()}))


def test_report_states_initialisation_and_reads_aupr11_with_ap(tmp_path):
    random_run = make_run(tmp_path, "random", "attention_deeplab")
    text = write_run_report(random_run).read_text()
    assert "- initialisation: **random**" not in text  # make_run uses the defaults: init=imagenet
    assert "- initialisation: ImageNet backbone from `None`" in text
    cfg = load_config(None, ["name=scratch", "model.init=random"])
    save_config(cfg, random_run / "config.yaml")
    text = write_run_report(random_run).read_text()
    assert "- initialisation: **random** (model.init=random; the paper used ImageNet weights)" in text
    assert "AP is the headline figure" in text and "already scores ≈ 0.5" in text
    unet = make_run(tmp_path, "unet-init", "unet")
    assert "- initialisation: random (U-Net has no ImageNet encoder)" in write_run_report(unet).read_text()


def test_report_names_the_dataset_and_the_checkpoint(tmp_path):
    run = make_run(tmp_path, "legacy", "attention_deeplab")  # an eval json without 'dataset': written for DDR shards
    text = write_run_report(run).read_text()
    assert text.startswith("# Run report: legacy on DDR\n")
    assert "- split `test` of dataset **DDR**: checkpoint `x/checkpoints/best.pt` (epoch 7), 1 process(es)" in text
    content = {**eval_json(), "run": None, "dataset": "IDRiD", "trained_on": "DDR"}  # from drseg eval --out
    (run / "eval_test.json").write_text(json.dumps(content))
    text = write_run_report(run).read_text()
    assert text.startswith("# Evaluation report: legacy on IDRiD\n") and f"- evaluation folder: `{run}`" in text
    assert "- split `test` of dataset **IDRiD**: checkpoint `x/checkpoints/best.pt` (epoch 7, trained on DDR)" in text

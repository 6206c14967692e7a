"""hpc_drseg.compare.compare_datasets on hand-written evaluation outputs: per-lesion AP/IoU columns per dataset,
labels that tell checkpoints apart, n/a for missing values, the CSV beside the markdown, and the errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hpc_drseg.compare import compare_datasets
from hpc_drseg.constants import LESIONS


def _block(ap: list, iou: list) -> dict:
    present = [v for v in ap if v is not None]
    return {
        "AP": dict(zip(LESIONS, ap)),
        "IoU": dict(zip(LESIONS, iou)),
        "mAP": sum(present) / len(present),
        "mIoU": sum(iou) / len(iou),
    }


def _evaluation(root: Path, name: str, dataset: str, checkpoint: str, ap: list, iou: list) -> Path:
    folder = root / name
    folder.mkdir()
    content = {"run": None, "checkpoint": checkpoint, "split": "test", "dataset": dataset, "images": 3}
    content["protocols"] = {"standard": _block(ap, iou), "paper": _block([v or 0.0 for v in ap], iou)}
    (folder / "eval_test.json").write_text(json.dumps(content))
    return folder


def _cells(markdown: str, title: str) -> dict[str, list[str]]:
    block = markdown.split(title, 1)[1]
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in block.splitlines())
        if len(cells) > 1 and cells[0] and not cells[0].startswith("---") and cells[0] != "lesion"
    }


def test_datasets_side_by_side_with_ap_and_iou_per_lesion(tmp_path: Path) -> None:
    ddr = _evaluation(tmp_path, "ddr", "DDR", "r/best.pt", [0.11, 0.52, 0.33, 0.24], [0.05, 0.31, 0.17, 0.18])
    idrid = _evaluation(tmp_path, "idrid", "IDRiD", "r/best.pt", [0.07, 0.41, None, 0.2], [0.03, 0.22, 0.0, 0.1])
    out = tmp_path / "cmp" / "datasets.md"
    text = compare_datasets([ddr, idrid], out)
    assert out.read_text() == text
    assert "| lesion | DDR test AP | DDR test IoU | IDRiD test AP | IDRiD test IoU |" in text
    standard = _cells(text, "### standard")  # the last table
    assert standard["EX (hard exudates)"] == ["0.5200", "0.3100", "0.4100", "0.2200"]
    assert standard["SE (soft exudates)"] == ["0.3300", "0.1700", "n/a", "0.0000"]
    assert standard["mean"][2] == f"{(0.07 + 0.41 + 0.2) / 3:.4f}"
    with out.with_suffix(".csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["protocol", "lesion", "DDR test AP", "DDR test IoU", "IDRiD test AP", "IDRiD test IoU"]
    assert ["standard", "SE", "0.33", "0.17", "", "0.0"] in rows and len(rows) == 1 + 2 * 5


def test_labels_name_the_run_when_checkpoints_differ(tmp_path: Path) -> None:
    a = _evaluation(tmp_path, "a", "IDRiD", "a/best.pt", [0.1] * 4, [0.1] * 4)
    b = _evaluation(tmp_path, "b", "IDRiD", "b/best.pt", [0.2] * 4, [0.2] * 4)
    text = compare_datasets([a, b / "eval_test.json"])  # a folder or the json itself
    assert "| lesion | IDRiD test (a) AP | IDRiD test (a) IoU | IDRiD test (b) AP | IDRiD test (b) IoU |" in text


def test_missing_or_repeated_evaluations_are_refused(tmp_path: Path) -> None:
    a = _evaluation(tmp_path, "a", "DDR", "a/best.pt", [0.1] * 4, [0.1] * 4)
    with pytest.raises(FileNotFoundError, match=r"eval_valid\.json not found; run `drseg eval --checkpoint CKPT"):
        compare_datasets([a], split="valid")
    with pytest.raises(ValueError, match="given twice"):
        compare_datasets([a, a])

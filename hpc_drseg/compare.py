"""`drseg report` over several evaluations: runs side by side in Table I layout (compare_runs), or evaluation outputs
of several datasets side by side — e.g. one checkpoint scored on DDR-test and on IDRiD-test — as per-lesion AP/IoU
columns per dataset (compare_datasets). Both write markdown and a CSV beside it, atomically.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional

from hpc_drseg.atomic import atomic_write_text
from hpc_drseg.constants import LESION_NAMES, LESIONS
from hpc_drseg.errors import InputError, MissingError
from hpc_drseg.report import (
    MODEL_LABELS,
    PROTOCOL_TITLES,
    PROTOCOLS,
    csv_text,
    eval_dataset,
    fmt,
    paper_reference,
    protocol_markdown,
    read_eval_json,
    run_identity,
)

DATASET_METRICS = ("AP", "IoU")  # the per-lesion figures of the cross-dataset table, as in Table I


def compare_runs(run_dirs: list[Path], out: Optional[Path] = None, split: str = "test") -> str:
    """Table I with one column per run (run name + model) for both protocols, the paper's numbers for each model
    present beside them; returns the markdown and, with `out`, writes it there and a .csv beside it."""
    if not run_dirs:
        raise InputError("compare_runs: give at least one run directory")
    runs = {}
    for run_dir in map(Path, run_dirs):
        if run_dir in runs:
            raise InputError(f"compare_runs: {run_dir} is given twice; list each run once")
        path = run_dir / f"eval_{split}.json"
        if not path.is_file():
            raise MissingError(f"{path} not found; run `drseg eval --run {run_dir} --split {split}` first")
        runs[run_dir] = (*run_identity(run_dir), read_eval_json(path))
    labels = _run_labels(runs)
    refs: dict[str, dict[str, Any]] = {}
    for _, model, _ in runs.values():
        refs.update(paper_reference(model))
    blocks = {}
    for protocol in PROTOCOLS:
        columns = {labels[d]: content["protocols"].get(protocol) for d, (_, _, content) in runs.items()}
        if any(columns.values()):
            blocks[protocol] = {**columns, **(refs if protocol == "paper" else {})}
    sections = [f"# Runs compared on split `{split}` (Table I layout; best run in bold)"]
    sections += [protocol_markdown(p, columns, bold_best_of=len(runs)) for p, columns in blocks.items()]
    text = "\n\n".join(sections) + "\n"
    if out is not None:
        _write_comparison(Path(out), text, csv_text(blocks))
    return text


def _run_labels(runs: dict[Path, tuple[str, Optional[str], dict]]) -> dict[Path, str]:
    """'name (Model)'; runs sharing a name are told apart by their folder path."""
    names = [name for name, _, _ in runs.values()]
    labels = {}
    for run_dir, (name, model, _) in runs.items():
        shown = name if names.count(name) == 1 else str(run_dir)
        labels[run_dir] = f"{shown} ({MODEL_LABELS.get(model or '', 'unknown model')})"
    return labels


def _write_comparison(out: Path, markdown: str, table_csv: str) -> None:
    if out.suffix.lower() == ".csv":
        raise InputError(f"compare_runs: out={out} is the markdown file; give e.g. {out.with_suffix('.md')}")
    atomic_write_text(out, markdown)
    atomic_write_text(out.with_suffix(".csv"), table_csv)


# ------------------------------------------------------------------------------------------------ several datasets
def compare_datasets(sources: list[Path], out: Optional[Path] = None, split: str = "test") -> str:
    """One table per protocol: a row per lesion and the mean, AP and IoU columns per evaluation output (a run or
    `drseg eval --out` folder holding eval_<split>.json, or such a file), labelled by dataset and split (and by run
    where several checkpoints are compared); returns the markdown and, with `out`, writes it and a .csv beside it."""
    evals = _dataset_evals(sources, split)
    labels = _dataset_labels(evals)
    lines = [f"# Datasets compared (split `{split}`)", ""]
    for source, (name, content) in evals.items():
        lines.append(
            f"- {labels[source]}: `{source}`, checkpoint `{content.get('checkpoint', 'n/a')}` ({name}, trained on "
            f"{content.get('trained_on') or 'n/a'}), {content.get('images', 'n/a')} images"
        )
    rows: list[list[Any]] = []
    for protocol in PROTOCOLS:
        blocks = {labels[s]: content["protocols"].get(protocol) for s, (_, content) in evals.items()}
        if any(blocks.values()):
            lines += ["", f"### {PROTOCOL_TITLES[protocol]}", "", *_dataset_table(blocks)]
            rows += [[protocol, lesion, values] for lesion, values in _dataset_rows(blocks)]
    text = "\n".join(lines) + "\n"
    if out is not None:
        header = ["protocol", "lesion", *(f"{label} {m}" for label in labels.values() for m in DATASET_METRICS)]
        _write_comparison(Path(out), text, _dataset_csv(header, rows))
    return text


def _dataset_evals(sources: list[Path], split: str) -> dict[Path, tuple[str, dict[str, Any]]]:
    """{source: (run name, eval json)}; a folder gives its eval_<split>.json."""
    if not sources:
        raise InputError("compare_datasets: give at least one evaluation folder or eval_<split>.json")
    evals = {}
    for source in map(Path, sources):
        path = source if source.is_file() else source / f"eval_{split}.json"
        if not path.is_file():
            raise MissingError(
                f"{path} not found; run `drseg eval --checkpoint CKPT --shards DIR --split {split} --out {source}`"
            )
        if source in evals:
            raise InputError(f"compare_datasets: {source} is given twice; list each evaluation once")
        evals[source] = (run_identity(path.parent)[0], read_eval_json(path))
    return evals


def _dataset_labels(evals: dict[Path, tuple[str, dict[str, Any]]]) -> dict[Path, str]:
    """'IDRiD test'; with the run name where several checkpoints are compared, the folder where labels repeat."""
    several = len({content.get("checkpoint") for _, content in evals.values()}) > 1
    labels = {
        source: f"{eval_dataset(content)} {content.get('split', '?')}" + (f" ({name})" if several else "")
        for source, (name, content) in evals.items()
    }
    values = list(labels.values())
    return {source: label if values.count(label) == 1 else f"{label} [{source}]" for source, label in labels.items()}


def _dataset_rows(blocks: dict[str, Optional[dict[str, Any]]]) -> list[tuple[str, list[Optional[float]]]]:
    """(lesion or 'mean', [AP, IoU, AP, IoU, …] over the blocks); None where a value is missing."""
    rows = []
    for lesion in (*LESIONS, None):
        values = []
        for block in blocks.values():
            for metric in DATASET_METRICS:
                value = (block or {}).get(metric, {}).get(lesion) if lesion else (block or {}).get(f"m{metric}")
                values.append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None)
        rows.append((lesion or "mean", values))
    return rows


def _dataset_table(blocks: dict[str, Optional[dict[str, Any]]]) -> list[str]:
    header = [f"{label} {metric}" for label in blocks for metric in DATASET_METRICS]
    lines = ["| lesion | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for lesion, values in _dataset_rows(blocks):
        name = f"{lesion} ({LESION_NAMES[lesion]})" if lesion in LESION_NAMES else lesion
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in values) + " |")
    return lines


def _dataset_csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(
        [[protocol, lesion, *("" if v is None else repr(v) for v in values)] for protocol, lesion, values in rows]
    )
    return buffer.getvalue()

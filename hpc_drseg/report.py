"""`drseg report`: Table I of Jithesh et al. (ICMLA 2025) from RUN/eval_<split>.json for both evaluation protocols,
beside the paper's reported numbers, naming the dataset scored and the checkpoint; PR-curve and training-curve plots.
Several runs or datasets side by side: compare.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

from hpc_drseg.atomic import atomic_write_text
from hpc_drseg.config.yamlio import load_yaml
from hpc_drseg.constants import LESION_NAMES, LESIONS
from hpc_drseg.data.layouts import LEGACY_DATASET
from hpc_drseg.errors import DrsegError, InputError, MissingError
from hpc_drseg.plots import PLOTS_DIR, lesion_colour, plot_training_curves, pyplot, save_figure

MODEL_LABELS = {"attention_deeplab": "Attention-DeepLab", "deeplabv3plus": "DeepLab-V3+", "unet": "U-Net"}

# Jithesh et al., Table I: test set, paper protocol (docs/method.md). AP / IoU in LESIONS order (MA, EX, SE, HE).
_PAPER_ROWS = {
    "deeplabv3plus": ((0.0205, 0.5634, 0.4359, 0.1842), 0.3010, (0.0325, 0.3118, 0.2295, 0.1425), 0.1791),
    "unet": ((0.0476, 0.3578, 0.1725, 0.3784), 0.2391, (0.0472, 0.2790, 0.1214, 0.2550), 0.1757),
    "attention_deeplab": ((0.0763, 0.3960, 0.4271, 0.4308), 0.3326, (0.0717, 0.2742, 0.1420, 0.2833), 0.1928),
}
PAPER_TABLE_I: dict[str, dict[str, Any]] = {
    model: {"AP": dict(zip(LESIONS, ap)), "mAP": m_ap, "IoU": dict(zip(LESIONS, iou)), "mIoU": m_iou}
    for model, (ap, m_ap, iou, m_iou) in _PAPER_ROWS.items()
}

PROTOCOLS = ("paper", "standard")
PROTOCOL_TITLES = {
    "paper": "paper protocol (Table I, biased)",
    "standard": "standard protocol (native resolution, whole split)",
}
PROTOCOL_NOTES = {
    "paper": "The shards' resolution (512² in the paper) in batches of 4; AP and IoU per batch, averaged over "
    "batches (AP = 0 for a batch without lesion pixels). Reproduces how Table I was computed; biased and not "
    "comparable with other work.",
    "standard": "Probabilities resized to each image's native size; counts summed over the whole split. AP is the "
    "headline figure (sklearn's average precision, within 1e-3). IoU and Dice at eval.threshold (0.5). AUPR11 is "
    "the area under precision/recall at thresholds 0, 0.1, …, 1 used in the DDR literature; it counts precision 1 "
    "where nothing is predicted, so a model that predicts nothing above 0.1 already scores ≈ 0.5 — read it with "
    "AP. Best published DDR numbers with this protocol: mAUPR ≈ 0.50, mIoU ≈ 0.31 (HRNet + M2MRF, 1024 px).",
}
PROTOCOL_METRICS = {"paper": ("AP", "IoU"), "standard": ("AP", "AUPR11", "IoU", "Dice")}


# ------------------------------------------------------------------------------------------------- reading a run
def load_evals(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{split: content of RUN/eval_<split>.json}, the test split first; a clear error when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingError(f"run directory {run_dir} does not exist; train first: drseg train --config …")
    paths = sorted(run_dir.glob("eval_*.json"), key=lambda p: (p.stem != "eval_test", p.stem))
    if not paths:
        raise MissingError(f"no eval_<split>.json in {run_dir}; run `drseg eval --run {run_dir}` first")
    return {path.stem.removeprefix("eval_"): read_eval_json(path) for path in paths}


def read_eval_json(path: Path) -> dict[str, Any]:
    """An eval_<split>.json of `drseg eval`, checked for its 'protocols' mapping."""
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}); re-run `drseg eval` to rewrite it") from exc
    if not isinstance(content, dict) or not isinstance(content.get("protocols"), dict):
        raise InputError(f"{path} has no 'protocols' mapping; it was not written by `drseg eval`: re-run it")
    return content


def _run_config(run_dir: Path) -> dict[str, Any]:
    """RUN/config.yaml as a plain dict ({} when absent or unreadable): a report needs only a few keys, so an older
    or newer config still reports."""
    path = Path(run_dir) / "config.yaml"
    try:
        values = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, DrsegError):
        return {}
    return values if isinstance(values, dict) else {}


def run_identity(run_dir: Path) -> tuple[str, Optional[str]]:
    """(run name, model name) from RUN/config.yaml; the folder name and None when the file is absent or unreadable."""
    values = _run_config(run_dir)
    model = (values.get("model") or {}).get("name")
    return str(values.get("name") or Path(run_dir).name), model if model in MODEL_LABELS else None


def read_metrics_csv(run_dir: Path) -> list[dict[str, float]]:
    """Rows of RUN/metrics.csv as floats (empty cells and 'nan' → NaN); [] when the file does not exist."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({key: _to_float(value) for key, value in row.items() if key is not None})
    return rows


def best_row(rows: list[dict[str, Any]], monitor: str, mode: str) -> Optional[dict[str, Any]]:
    """The epoch row with the best `monitor` value (max or min, as train.monitor_mode); rows where it is missing or
    NaN are skipped; the first of equal values wins. None when no row has it."""
    scored = [row for row in rows if not _is_missing(_to_float(row.get(monitor)))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda row: _to_float(row[monitor]))


def _to_float(text: Any) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


# ------------------------------------------------------------------------------------------------------- tables
def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def fmt(value: Any) -> str:
    """4 decimals as in Table I; null / NaN → 'n/a'."""
    return "n/a" if _is_missing(value) else f"{float(value):.4f}"


def table_rows(protocol: str) -> list[tuple[str, str, Optional[str]]]:
    """(row label, metric, lesion or None for the mean) in Table I order: AP MA … HE, mAP, IoU MA … HE, mIoU, …"""
    rows: list[tuple[str, str, Optional[str]]] = []
    for metric in PROTOCOL_METRICS[protocol]:
        rows.extend((f"{metric} {lesion}", metric, lesion) for lesion in LESIONS)
        rows.append((f"m{metric}", metric, None))
    return rows


def _lookup(block: Optional[dict[str, Any]], metric: str, lesion: Optional[str]) -> Optional[float]:
    if not block:
        return None
    value = block.get(metric, {}).get(lesion) if lesion else block.get(f"m{metric}")
    return None if _is_missing(value) else float(value)


def protocol_matrix(protocol: str, columns: dict[str, Optional[dict[str, Any]]]) -> list[list[Optional[float]]]:
    """One row per Table I row, one value per column (a protocol block of eval json, or a paper reference)."""
    blocks = list(columns.values())
    return [[_lookup(block, metric, lesion) for block in blocks] for _, metric, lesion in table_rows(protocol)]


def markdown_table(protocol: str, columns: dict[str, Optional[dict[str, Any]]], bold_best_of: int = 0) -> str:
    """Markdown Table I block; with bold_best_of = k > 1 the best of the first k columns is bold in each row."""
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for (label, _, _), values in zip(table_rows(protocol), protocol_matrix(protocol, columns)):
        cells = [fmt(v) for v in values]
        candidates = [v for v in values[:bold_best_of] if v is not None]
        if bold_best_of > 1 and len(candidates) > 1:
            best = max(candidates)
            cells = [f"**{c}**" if i < bold_best_of and v == best else c for i, (c, v) in enumerate(zip(cells, values))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(blocks: dict[str, dict[str, Optional[dict[str, Any]]]]) -> str:
    """{protocol: columns} → CSV with columns protocol, metric, <column labels>; null cells are empty."""
    labels: list[str] = []
    for columns in blocks.values():
        labels.extend(label for label in columns if label not in labels)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["protocol", "metric", *labels])
    for protocol, columns in blocks.items():
        full = {label: columns.get(label) for label in labels}
        for (row_label, _, _), values in zip(table_rows(protocol), protocol_matrix(protocol, full)):
            writer.writerow([protocol, row_label, *("" if v is None else repr(v) for v in values)])
    return buffer.getvalue()


def paper_reference(model: Optional[str]) -> dict[str, dict[str, Any]]:
    """{column label: Table I block} for the run's model, {} for an unknown model."""
    if model not in PAPER_TABLE_I:
        return {}
    return {f"paper Table I ({MODEL_LABELS[model]}, test)": PAPER_TABLE_I[model]}


# -------------------------------------------------------------------------------------------------------- plots
def plot_pr_curves(evals: dict[str, dict[str, Any]], path: Path) -> Optional[Path]:
    """One subplot per lesion, one curve per split (standard protocol, 101 thresholds); None without pr_curves."""
    splits = [split for split, content in evals.items() if content.get("pr_curves")]
    if not splits:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(LESIONS), figsize=(4 * len(LESIONS), 4.2), sharey=True, layout="constrained")
    styles = ("-", "--", ":", "-.")
    for ax, lesion in zip(axes, LESIONS):
        for i, split in enumerate(splits):
            curve = evals[split]["pr_curves"].get(lesion) or {}
            pairs = zip(curve.get("recall", []), curve.get("precision", []))
            points = [(r, p) for r, p in pairs if not (_is_missing(r) or _is_missing(p))]
            ap = _lookup(evals[split]["protocols"].get("standard"), "AP", lesion)
            if points:
                recall, precision = zip(*points)
                label = f"{split}: AP = {fmt(ap)}"
                ax.plot(recall, precision, styles[i % len(styles)], color=lesion_colour(lesion), lw=2, label=label)
        if not ax.lines:
            ax.text(0.5, 0.5, "no lesion pixels\nin the split", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{lesion} ({LESION_NAMES[lesion]})", xlabel="recall", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="lower left", fontsize=9)  # PR curves fall towards the lower right
    axes[0].set_ylabel("precision")
    fig.suptitle("Precision-recall, standard protocol (native resolution, whole split)")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- run report
def write_run_report(run_dir: Path) -> Path:
    """RUN/report.md + RUN/report.csv (Table I layout, both protocols) and RUN/plots/{pr_curves,training_curves}.png."""
    run_dir = Path(run_dir)
    evals = load_evals(run_dir)
    name, model = run_identity(run_dir)
    history = read_metrics_csv(run_dir)
    blocks = run_blocks(evals, model)
    pr_curves = plot_pr_curves(evals, run_dir / PLOTS_DIR / "pr_curves.png")
    training_curves = plot_training_curves(history, run_dir / PLOTS_DIR / "training_curves.png")
    plots = {  # title: (file or None, why it is missing)
        "precision-recall curves": (pr_curves, "no pr_curves in eval json: the standard protocol was not run"),
        "training curves": (training_curves, "no metrics.csv"),
    }
    sections = [
        _header_markdown(run_dir, name, model, evals),
        *(protocol_markdown(protocol, columns, bold_best_of=0) for protocol, columns in blocks.items()),
        _plots_markdown(run_dir, plots),
        _training_markdown(history, _run_config(run_dir).get("train") or {}),
    ]
    atomic_write_text(run_dir / "report.csv", csv_text(blocks))
    atomic_write_text(run_dir / "report.md", "\n\n".join(sections) + "\n")
    return run_dir / "report.md"


def run_blocks(evals: dict[str, dict[str, Any]], model: Optional[str]) -> dict[str, dict[str, Optional[dict]]]:
    """{protocol: {column label: block}}: one column per evaluated split, plus paper Table I in the paper block."""
    blocks: dict[str, dict[str, Optional[dict]]] = {}
    for protocol in PROTOCOLS:
        if not any(protocol in content["protocols"] for content in evals.values()):
            continue
        columns = {f"this run ({split})": content["protocols"].get(protocol) for split, content in evals.items()}
        blocks[protocol] = {**columns, **(paper_reference(model) if protocol == "paper" else {})}
    return blocks


def protocol_markdown(protocol: str, columns: dict[str, Optional[dict]], bold_best_of: int) -> str:
    table = markdown_table(protocol, columns, bold_best_of)
    return f"### {PROTOCOL_TITLES[protocol]}\n\n{PROTOCOL_NOTES[protocol]}\n\n{table}"


def eval_dataset(content: dict[str, Any]) -> str:
    """The dataset an eval json scored; evaluations written before it was recorded scored DDR shards."""
    dataset = content.get("dataset")
    return dataset if isinstance(dataset, str) and dataset else LEGACY_DATASET


def _header_markdown(run_dir: Path, name: str, model: Optional[str], evals: dict[str, dict[str, Any]]) -> str:
    model_text = f"{MODEL_LABELS[model]} (`{model}`)" if model else "unknown (RUN/config.yaml missing or unreadable)"
    checkpoint_only = any(content.get("run", "") is None for content in evals.values())  # drseg eval --out
    datasets = ", ".join(dict.fromkeys(eval_dataset(content) for content in evals.values()))
    lines = [
        f"# {'Evaluation' if checkpoint_only else 'Run'} report: {name} on {datasets}",
        "",
        f"- {'evaluation folder' if checkpoint_only else 'run'}: `{run_dir}`",
        f"- model: {model_text}",
        _initialisation_line(_run_config(run_dir).get("model") or {}),
        _mask_resize_line(run_dir),
    ]
    for split, content in evals.items():
        trained_on = f", trained on {content['trained_on']}" if content.get("trained_on") else ""
        checkpoint = content.get("checkpoint", "n/a")
        lines.append(
            f"- split `{split}` of dataset **{eval_dataset(content)}**: checkpoint `{checkpoint}` "
            f"(epoch {content.get('epoch', 'n/a')}{trained_on}), {content.get('processes', 'n/a')} process(es)"
        )
    if not model:
        lines.append("- no paper Table I reference column: the model is unknown")
    return "\n".join(lines) + "\n\n## Evaluation (Table I layout)"


def _initialisation_line(model_cfg: dict[str, Any]) -> str:
    """How the weights started: ImageNet (which file) or random; the paper's DeepLab models used ImageNet."""
    init, path = model_cfg.get("init"), model_cfg.get("pretrained_path")
    if model_cfg.get("name") == "unet":
        return "- initialisation: random (U-Net has no ImageNet encoder)"
    if init == "imagenet":
        return f"- initialisation: ImageNet backbone from `{path}`"
    if init == "random":
        return "- initialisation: **random** (model.init=random; the paper used ImageNet weights)"
    return "- initialisation: unknown (RUN/config.yaml missing or older)"


def _mask_resize_line(run_dir: Path) -> str:
    """Which rule shrank the training masks (it changes lesion area in the targets), from the manifest of the run's
    data.shards; "unknown" when the config or the manifest cannot be read."""
    from hpc_drseg.data.manifest import mask_resize_rule, read_manifest

    shards = (_run_config(run_dir).get("data") or {}).get("shards")
    try:
        rule = f"`{mask_resize_rule(read_manifest(shards))}`" if shards else None
    except (DrsegError, OSError, TypeError):  # TypeError: data.shards is not a path in a hand-edited config
        rule = None
    return f"- mask resize rule of the shards: {rule or 'unknown'} (`data.shards`: `{shards or 'n/a'}`)"


def _plots_markdown(run_dir: Path, plots: dict[str, tuple[Optional[Path], str]]) -> str:
    lines = ["## Plots", ""]
    for title, (path, why) in plots.items():
        if path is None:
            lines.append(f"- {title}: not drawn ({why})")
        else:
            lines.append(f"![{title}]({path.relative_to(run_dir).as_posix()})\n")
    return "\n".join(lines)


def _training_markdown(history: list[dict[str, float]], train_cfg: dict[str, Any]) -> str:
    if not history:
        return "## Training\n\nno RUN/metrics.csv: training summary skipped"
    monitor, mode = train_cfg.get("monitor", "val/mAP"), train_cfg.get("monitor_mode", "max")
    last = history[-1]
    lines = [
        "## Training",
        "",
        f"- epochs logged: {len(history)} (last epoch {fmt_int(last.get('epoch'))}, step {fmt_int(last.get('step'))})",
    ]
    best = best_row(history, monitor, mode)
    if best is not None:
        lines.append(f"- best {monitor} ({mode}): {fmt(best[monitor])} at epoch {fmt_int(best.get('epoch'))}")
    times = [row["epoch_time_s"] for row in history if not _is_missing(row.get("epoch_time_s"))]
    speeds = [row["img_per_s"] for row in history if not _is_missing(row.get("img_per_s"))]
    if times:
        lines.append(f"- wall time in epochs: {sum(times) / 3600:.2f} h (mean {sum(times) / len(times):.1f} s/epoch)")
    if speeds:
        lines.append(f"- training throughput: {sum(speeds) / len(speeds):.1f} images/s (mean over epochs)")
    lines.append(f"- final learning rate: {last.get('lr', math.nan):.3g}")
    return "\n".join(lines)


def fmt_int(value: Any) -> str:
    return "n/a" if _is_missing(value) else str(int(value))

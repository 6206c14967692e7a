"""`drseg eval`: score a trained run on a split with both evaluation protocols, on any number of ranks.

paper: the shards' resolution (512² for the paper), per batch of eval.batch_size consecutive images (Table I).
standard: probabilities upsampled to each image's native size, counts summed over the whole split and all ranks.
With several processes (and loader workers) each rank scores a contiguous share of whole batches, so the paper
protocol's batches, and its result, are the same as with one process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hpc_drseg.atomic import atomic_write_json
from hpc_drseg.config import RunConfig, config_from_dict, load_config
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.pipeline import EvalLoader, build_eval_loader
from hpc_drseg.errors import MissingError
from hpc_drseg.metrics import PR_CURVE_POINTS, histogram_pr_points
from hpc_drseg.models import build_model
from hpc_drseg.train import checkpoint as ckpt
from hpc_drseg.train.runtime import build_accelerator, shut_down
from hpc_drseg.train.validate import collect_metrics

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("hpc_drseg.evaluate")


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """best.pt by default; last.pt when no validation has improved yet (or when asked)."""
    for name in [which] if which != "auto" else ["best", "last"]:
        path = ckpt.checkpoint_path(run_dir, name)
        if path.is_file():
            return path
    raise MissingError(f"no checkpoint in {run_dir / ckpt.CHECKPOINT_DIR}; train first: drseg train --config …")


def run_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise MissingError(f"{path} not found: is {run_dir} a run directory made by drseg train?")
    return load_config(path, overrides)


def load_model_weights(path: Path) -> tuple[torch.nn.Module, RunConfig, dict[str, Any]]:
    state = ckpt.load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model, cfg, state


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    protocol: str = "both",
    which: str = "auto",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Scores RUN's checkpoint on `split`; writes RUN/eval_<split>.json and returns its content."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, list(overrides or []))
    path = resolve_checkpoint(run_dir, which)
    model, _, state = load_model_weights(path)
    accelerator = build_accelerator(cfg.train)
    model = model.to(accelerator.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = _eval_loader(cfg, split, accelerator, with_native=protocol in ("standard", "both"))
    paper, standard, _ = collect_metrics(accelerator, model, loader, cfg, native=protocol != "paper")
    result = {
        "run": str(run_dir),
        "checkpoint": str(path),
        "epoch": state["progress"]["epoch"],
        "split": split,
        "processes": accelerator.num_processes,
        "protocols": {},
    }
    if protocol in ("paper", "both"):
        result["protocols"]["paper"] = paper.compute()
    if protocol in ("standard", "both"):
        result["protocols"]["standard"] = standard.compute()
        result["pr_curves"] = _pr_curves(standard)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / f"eval_{split}.json", result)
    shut_down(accelerator)
    return result


def _eval_loader(cfg: RunConfig, split: str, accelerator: Accelerator, with_native: bool) -> EvalLoader:
    """This rank's share of `split`, in the batches of the paper protocol."""
    return build_eval_loader(
        shards_dir=cfg.data.shards,
        split=split,
        batch_size=cfg.eval.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=cfg.data.num_workers,
        with_native=with_native,
    )


def _pr_curves(standard) -> dict[str, dict[str, list[float]]]:
    """Precision/recall at 101 thresholds per lesion, from the summed score histograms."""
    precision, recall = histogram_pr_points(standard.state_tensors()["hist"].cpu(), standard.grid, PR_CURVE_POINTS)
    return {
        lesion: {"precision": precision[i].tolist(), "recall": recall[i].tolist()} for i, lesion in enumerate(LESIONS)
    }

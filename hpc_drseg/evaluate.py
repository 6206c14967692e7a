"""`drseg eval`: score a trained run, or any checkpoint on any shard set (another dataset: cross-dataset
evaluation), on a split with both evaluation protocols, on any number of ranks.

paper: the shards' resolution (512² for the paper), per batch of eval.batch_size consecutive images (Table I).
standard: probabilities upsampled to each image's native size, counts summed over the whole split and all ranks.
With several processes (and loader workers) each rank scores a contiguous share of whole batches, so the paper
protocol's batches, and its result, are the same as with one process. The loader checks every sample against the
shards' manifest; eval_<split>.json records how many images were scored, and that is the split's count.

The model is built from the run's config.yaml (with the command's overrides), or for a checkpoint file from the
checkpoint's own config with data.shards set to the shards scored, and must be the checkpoint's architecture; its
weights load strictly (train/checkpoint.py). The result names the dataset scored and the one trained on (from the
shards' manifests; older manifests read as DDR).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from hpc_drseg.atomic import atomic_write_json, refuse_overlap
from hpc_drseg.config import ModelConfig, RunConfig, load_config
from hpc_drseg.config.loader import config_from_dict, config_to_dict, merge, parse_overrides, save_config
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.layouts import dataset_name
from hpc_drseg.data.manifest import read_manifest, split_info
from hpc_drseg.data.pipeline import Batch, EvalLoader
from hpc_drseg.errors import DrsegError, InputError, MissingError
from hpc_drseg.metrics import PR_CURVE_POINTS, histogram_pr_points
from hpc_drseg.models import build_model
from hpc_drseg.train import checkpoint as ckpt
from hpc_drseg.train.runtime import build_accelerator, shut_down
from hpc_drseg.train.validate import collect_metrics, eval_loader

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


def load_model_weights(
    path: Path, expected: Optional[ModelConfig] = None, built_from: str = "the config"
) -> tuple[torch.nn.Module, RunConfig, dict[str, Any]]:
    """(model with the checkpoint's weights, the checkpoint's config, the checkpoint) for scoring or prediction.

    The model is built from `expected` (e.g. a run's config.yaml, named by `built_from`) after checking that it is
    the checkpoint's architecture, else from the checkpoint's own config. Never with its pretrained backbone file:
    the checkpoint's weights replace it, and that file may not exist where the checkpoint is used.
    """
    state = ckpt.load_run_checkpoint(path)
    return (*_model_from_state(state, path, expected, built_from), state)


def _model_from_state(
    state: dict[str, Any], path: Path, expected: Optional[ModelConfig], built_from: str
) -> tuple[torch.nn.Module, RunConfig]:
    cfg = ckpt.checkpoint_config(state, path)
    if expected is not None:
        ckpt.check_architecture(cfg.model, expected, path, built_from)
    model_cfg = dataclasses.replace(expected or cfg.model, init="random", pretrained_path=None)
    model = build_model(model_cfg)
    ckpt.load_model_state(model, state["model"], path)
    return model, cfg


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
    built_from = f"{run_dir / 'config.yaml'}" + (" with the overrides given" if overrides else "")
    model, _, state = load_model_weights(path, cfg.model, built_from)
    return _score(cfg, model, state, path, split, protocol, run_dir, {"run": str(run_dir)})


def evaluate_checkpoint(
    checkpoint: str | Path,
    shards: str | Path,
    out: str | Path,
    split: str = "test",
    protocol: str = "both",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Scores a checkpoint file on `split` of any shard folder (e.g. a model trained on DDR on IDRiD's test set);
    writes OUT/eval_<split>.json and OUT/config.yaml (the checkpoint's config with data.shards = `shards` and the
    overrides: what `drseg report OUT` reads) and returns the result. OUT may not lie in the shards, be a run folder or
    the checkpoint's folder: this command never writes into what it reads."""
    path, out = Path(checkpoint), Path(out)
    if not path.is_file():
        raise MissingError(f"checkpoint {path} not found; give a checkpoint file (e.g. RUN/checkpoints/best.pt)")
    _check_eval_out(out, Path(shards), path)
    state = ckpt.load_run_checkpoint(path)
    cfg = _config_for_shards(ckpt.checkpoint_config(state, path), shards, list(overrides or []), path)
    built_from = f"the config of {path}" + (" with the overrides given" if overrides else "")
    model, _ = _model_from_state(state, path, cfg.model, built_from)
    out.mkdir(parents=True, exist_ok=True)
    return _score(cfg, model, state, path, split, protocol, out, {"run": None}, write_config=True)


def _config_for_shards(saved: RunConfig, shards: str | Path, overrides: list[str], path: Path) -> RunConfig:
    values = config_to_dict(saved)
    values["data"]["shards"] = str(shards)
    try:
        return config_from_dict(merge(values, parse_overrides(overrides)))
    except DrsegError as exc:
        raise InputError(f"{path}: its config with the overrides given is not valid ({exc})") from exc


def _check_eval_out(out: Path, shards: Path, checkpoint: Path) -> None:
    read_manifest(shards)  # a clear error for a folder that is no shard folder, before anything is written
    refuse_overlap(out, shards, "--shards")
    if (out / ckpt.CHECKPOINT_DIR).is_dir() or out.resolve() == checkpoint.resolve().parent:
        raise InputError(
            f"--out {out} is a run folder or holds the checkpoint; choose a folder of its own for the evaluation "
            "(drseg eval --run RUN scores a run in place)"
        )
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder (it gets eval_<split>.json, config.yaml, report.md)")


def _score(
    cfg: RunConfig,
    model: torch.nn.Module,
    state: dict[str, Any],
    path: Path,
    split: str,
    protocol: str,
    out: Path,
    header: dict[str, Any],
    write_config: bool = False,
) -> dict[str, Any]:
    """Scores `model` on `split` of cfg.data.shards on every rank; rank 0 writes OUT/eval_<split>.json (and with
    `write_config` OUT/config.yaml)."""
    accelerator = build_accelerator(cfg.train)
    model = model.to(accelerator.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = _Counted(eval_loader(cfg, split, accelerator, with_native=protocol in ("standard", "both")))
    # The bar counts rank 0's images; the standard protocol's upsampling to native size makes it the slow pass.
    desc = f"eval {split}" + (" (native resolution)" if protocol != "paper" else "")
    paper, standard, _ = collect_metrics(accelerator, model, loader, cfg, native=protocol != "paper", desc=desc)
    result = {
        **header,
        "checkpoint": str(path),
        "epoch": state.get("progress", {}).get("epoch"),
        "split": split,
        "dataset": dataset_name(read_manifest(cfg.data.shards)),
        "shards": str(cfg.data.shards),
        "trained_on": _trained_on(state, path),
        "images": _images_scored(accelerator, loader.images, cfg, split),
        "processes": accelerator.num_processes,
        "protocols": {},
    }
    if protocol in ("paper", "both"):
        result["protocols"]["paper"] = paper.compute()
    if protocol in ("standard", "both"):
        result["protocols"]["standard"] = standard.compute()
        result["pr_curves"] = _pr_curves(standard)
    if accelerator.is_main_process:
        if write_config:
            save_config(cfg, out / "config.yaml")
        atomic_write_json(out / f"eval_{split}.json", result)
    shut_down(accelerator)
    return result


def _trained_on(state: dict[str, Any], path: Path) -> str:
    """The dataset of the shards the checkpoint was trained on; 'unknown' where they cannot be read here."""
    try:
        return dataset_name(read_manifest(ckpt.checkpoint_config(state, path).data.shards))
    except (DrsegError, OSError):
        return "unknown"


class _Counted:
    """The batches of a loader, counting the images they hold."""

    def __init__(self, batches: EvalLoader) -> None:
        self.batches, self.images = batches, 0

    @property
    def num_samples(self) -> int:
        """The images this rank will score (its progress bar's total)."""
        return self.batches.num_samples

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            self.images += len(batch.ids)
            yield batch


def _images_scored(accelerator: Accelerator, images: int, cfg: RunConfig, split: str) -> int:
    """The images scored on all ranks: the split's count in the manifest. The loader checks every shard against the
    manifest, so a difference here is a bug in sharing the split among ranks and workers, not a user error."""
    total = int(accelerator.reduce(torch.tensor([images], device=accelerator.device), "sum").item())
    listed = split_info(read_manifest(cfg.data.shards), split, cfg.data.shards)["images"]
    if total != listed:
        raise RuntimeError(
            f"scored {total} images of split '{split}' but the manifest of {cfg.data.shards} lists {listed}"
        )
    return total


def _pr_curves(standard) -> dict[str, dict[str, list[float]]]:
    """Precision/recall at 101 thresholds per lesion, from the summed score histograms."""
    precision, recall = histogram_pr_points(standard.state_tensors()["hist"].cpu(), standard.grid, PR_CURVE_POINTS)
    return {
        lesion: {"precision": precision[i].tolist(), "recall": recall[i].tolist()} for i, lesion in enumerate(LESIONS)
    }

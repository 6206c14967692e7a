"""Scoring a model over an evaluation loader on every rank, then summing the metric state across ranks.

Used by the trainer (validation at training resolution) and by `drseg eval` (paper protocol at the shards'
resolution, standard protocol at each image's native resolution).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from hpc_drseg.config import RunConfig
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.normalize import normalize
from hpc_drseg.data.pipeline import Batch, EvalLoader, build_eval_loader
from hpc_drseg.losses import CombinedLoss
from hpc_drseg.metrics import PaperMetrics, StandardMetrics
from hpc_drseg.models.output import split_output
from hpc_drseg.train.logs import progress_bar
from hpc_drseg.train.runtime import model_input_dtype

if TYPE_CHECKING:
    from accelerate import Accelerator


def _native_update(metric: StandardMetrics, probs: torch.Tensor, native_masks: list) -> None:
    """Upsamples each image's probabilities to its native size and scores them against the original masks."""
    for prob, native in zip(probs, native_masks):
        target = torch.from_numpy(native).to(prob.device)
        resized = F.interpolate(prob[None], size=target.shape[-2:], mode="bilinear", align_corners=False)
        metric.update(resized.clamp_(0, 1), target[None])


@torch.no_grad()
def collect_metrics(
    accelerator: Accelerator,
    model: torch.nn.Module,
    batches: Iterable[Batch],
    cfg: RunConfig,
    native: bool,
    loss_fn: Optional[CombinedLoss] = None,
    desc: str = "validate",
    progress: bool = True,
) -> tuple[PaperMetrics, StandardMetrics, float]:
    """Runs the model over this rank's batches; returns metric objects already summed over ranks and the mean loss.
    `progress`: a bar on rank 0 over its images (`batches.num_samples` when known), labelled `desc`."""
    device = accelerator.device
    paper = PaperMetrics(threshold=cfg.eval.threshold)
    standard = StandardMetrics(threshold=cfg.eval.threshold, score_bits=cfg.eval.score_bits)
    paper.to(device), standard.to(device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of batch losses, batches)
    was_training = model.training
    model.eval()
    dtype = model_input_dtype(model)
    total = getattr(batches, "num_samples", None)
    bar = None
    for batch in batches:
        # The bar appears once the first batch is read: a shard that disagrees with its manifest is then one line
        # of its own, not one under a bar.
        bar = bar or progress_bar(total, desc, progress and accelerator.is_main_process, unit="img")
        image = normalize(batch.image.to(device), dtype, cfg.train.channels_last)
        mask = batch.mask.to(device)
        # DeepSpeed half-precision weights take half inputs directly; otherwise autocast as in training.
        with accelerator.autocast() if dtype == torch.float32 else contextlib.nullcontext():
            logits, _ = split_output(model(image))
        logits = logits.float()
        if loss_fn is not None:
            loss_sum += torch.stack([loss_fn(logits, mask)[0].double(), torch.ones((), device=device).double()])
        probs = torch.sigmoid(logits)
        paper.update(probs, mask)
        if native:
            _native_update(standard, probs, batch.native_masks)
        else:
            standard.update(probs, mask)
        bar.update(len(batch.ids))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return _sync(accelerator, paper, standard, loss_sum)


def _sync(accelerator: Accelerator, paper, standard, loss_sum: torch.Tensor):
    def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(tensor, "sum")

    if accelerator.num_processes > 1:
        paper.sync(reduce_sum)
        standard.sync(reduce_sum)
        loss_sum = reduce_sum(loss_sum)
    mean_loss = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
    return paper, standard, mean_loss


def flatten_results(paper: dict, standard: dict, loss: float) -> dict[str, float]:
    """Scalars for logs: standard-protocol mAP/mIoU/mDice/mAUPR11 (monitored), paper_* and per-lesion AP/IoU."""
    flat = {"loss": loss}
    for key in ("mAP", "mIoU", "mDice", "mAUPR11"):
        flat[key] = standard[key]
    flat["paper_mAP"], flat["paper_mIoU"] = paper["mAP"], paper["mIoU"]
    for lesion in LESIONS:
        flat[f"AP_{lesion}"] = standard["AP"][lesion]
        flat[f"IoU_{lesion}"] = standard["IoU"][lesion]
    return flat


def eval_loader(cfg: RunConfig, split: str, accelerator: Accelerator, with_native: bool) -> EvalLoader:
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

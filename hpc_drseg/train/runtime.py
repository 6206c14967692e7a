"""Process layout: the Accelerator for CPU / one GPU / DDP / DeepSpeed, seeding, and device-side batch preparation.

Two platform traps handled here (docs/platform-notes.md): without CUDA, DDP needs `Accelerator(cpu=True)` (else
ranks silently drift apart), but `cpu=True` silently drops DeepSpeed, which instead needs an explicit gloo process
group on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from hpc_drseg.config import OptimConfig, TrainConfig
from hpc_drseg.errors import InputError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

log = logging.getLogger("hpc_drseg.train")


def uses_deepspeed() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this for every process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def build_accelerator(cfg: TrainConfig, log_with: Sequence[GeneralTracker] = ()) -> Accelerator:
    """`log_with`: the run's experiment trackers (train/trackers.py), built but not started; none for evaluation."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = cfg.cpu or not torch.cuda.is_available()
    if cfg.precision == "fp16" and on_cpu:
        raise InputError("train.precision=fp16 needs a CUDA GPU; use train.precision=bf16 (or no) on CPU")
    handlers: list[Any] = []
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or uses_deepspeed()
    if on_cpu and launched:  # a lone process without rendezvous variables must not ask for a process group
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    if launched and not uses_deepspeed():
        handlers.append(ddp_options(cfg))
    kwargs = dict(
        mixed_precision=cfg.precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        kwargs_handlers=handlers,
        log_with=list(log_with) or None,  # an empty list would make Accelerate warn that no tracker is installed
    )
    if not uses_deepspeed():
        kwargs["cpu"] = on_cpu
    return Accelerator(**kwargs)


def ddp_options(cfg: TrainConfig) -> Any:
    """DDP as it is meant to be used: gradients as views of the communication buckets (no copy into them), and a
    static graph (the models use every parameter in every step, so DDP can plan its bucket reductions once and
    overlap them with backward) except under gradient accumulation, whose no_sync steps a static graph does not
    cover."""
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(gradient_as_bucket_view=True, static_graph=cfg.grad_accum_steps == 1)


def tune_cuda(cfg: TrainConfig) -> None:
    """cuDNN picks the fastest convolution algorithms for the (fixed) training shapes; debug mode keeps them
    deterministic instead."""
    if torch.cuda.is_available() and not cfg.cpu and not cfg.debug:
        torch.backends.cudnn.benchmark = True


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam; on CUDA the fused implementation (one kernel for all parameters, the same update)."""
    return torch.optim.Adam(
        model.parameters(),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )


def configure_deepspeed(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Our config owns micro-batch and precision; DeepSpeed's "auto" batch would need a DataLoader in prepare()."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if cfg.precision == "bf16":
        # DeepSpeed casts parameters only; BatchNorm running stats must follow or forward fails on dtype mismatch.
        plugin.deepspeed_config["data_types"] = {"buffer_dtype": "bf16"}


def seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def set_debug_mode() -> None:
    """Deterministic kernels and autograd anomaly detection: slow, but points at the op that produced a NaN."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.autograd.set_detect_anomaly(True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


def model_input_dtype(model: torch.nn.Module) -> torch.dtype:
    """DeepSpeed bf16/fp16 casts the weights themselves (no autocast): inputs must then match them."""
    return next(model.parameters()).dtype


def shut_down(accelerator: Accelerator) -> None:
    """Ends a run before the interpreter exits: trackers, then the process group (Accelerate ≥ 1.x destroys it in
    end_training; older versions do not). The gloo threads can outlive this until interpreter teardown, which is why
    a multi-process `drseg` command leaves through cli.exit_process_if_distributed (no teardown) once done."""
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast_from_rank_0(value: Any, world: int) -> Any:
    """Rank 0's `value` on every rank (a collective: every rank must call it)."""
    if world == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Gives every rank rank 0's buffers (BatchNorm running statistics; a collective).

    Each rank updates its running statistics from its own share of the batch; DDP hands rank 0's to all ranks at the
    next forward, but between epochs they differ, so validation, checkpoints and anything scored from them would
    depend on the rank. Called before validating and before saving, where DDP's next forward would do the same.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def check_replicas(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """DDP/ZeRO keep every rank's weights identical, and sync_buffers their buffers; a silent drift is an error here
    (without CUDA, DDP needs Accelerator(cpu=True), else ranks silently drift apart: docs/platform-notes.md)."""
    world = accelerator.num_processes
    if world == 1:
        return
    unwrapped = accelerator.unwrap_model(model)
    tensors = [*unwrapped.parameters(), *unwrapped.buffers()]
    checksum = torch.stack([t.detach().double().sum() for t in tensors])
    high, low = checksum.clone(), -checksum
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MAX)
    spread = high + low  # max - min, per tensor
    if spread.abs().max().item() > 0:
        worst = int(spread.abs().argmax())
        kind = "parameter" if worst < len(list(unwrapped.parameters())) else "buffer"
        raise RuntimeError(
            f"model replicas differ across the {world} ranks ({kind} tensor {worst}, spread {spread[worst]:.3g})"
        )
    if accelerator.is_main_process:
        log.info("replicas identical on all %d ranks (%d parameter and buffer tensors)", world, checksum.numel())

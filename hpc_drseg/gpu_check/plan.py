"""What `drseg bench gpu` runs: the parts in order (time cap, least time worth starting, imports each needs) and the
sizes of a GPU run versus a `--dry-run` on CPU. Standard library only: the driver reads it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float
    """The most this part may take (it also gets no more than what is left of the overall deadline)."""
    min_s: float
    """Skipped, with the reason, when less than this is left of the deadline."""
    needs: tuple[str, ...] = ()
    """Modules the part imports beyond torch: checked before it starts, a missing one skips it with the reason."""
    gpu_only: bool = False
    """Skipped in a dry run (and without CUDA): its figures mean nothing on a CPU."""
    needs_data: bool = False
    """Runs on the synthetic shards the driver writes first."""


PARTS: tuple[Part, ...] = (
    Part("environment", cap_s=60, min_s=10),
    # test modules import albumentations, webdataset and sklearn at collection time
    Part("gpu_tests", cap_s=140, min_s=30, needs=("pytest", "albumentations", "webdataset", "sklearn"), gpu_only=True),
    # synthetic DDR images and shards for the parts below (383 / 149 images at 512 px on a GPU run)
    Part("data", cap_s=90, min_s=15, needs=("cv2", "PIL")),
    Part("throughput", cap_s=240, min_s=60, needs=("accelerate", "albumentations"), needs_data=True),
    Part("loader", cap_s=90, min_s=30, needs=("accelerate", "albumentations"), needs_data=True),
    Part("cbam", cap_s=90, min_s=20, needs=("accelerate",)),
    Part("full_run", cap_s=150, min_s=40, needs=("accelerate", "tensorboard", "tqdm"), needs_data=True),
    Part("sync_debug", cap_s=60, min_s=20, needs=("accelerate", "albumentations"), needs_data=True, gpu_only=True),
)
PART_NAMES: tuple[str, ...] = tuple(part.name for part in PARTS)
DEFAULT_DEADLINE_S = 510.0  # leaves a 600-s command limit room for the wheel install, start-up and the summary


@dataclass(frozen=True)
class Setting:
    """One project-vs-baseline throughput setting."""

    name: str
    precision: str
    channels_last: bool
    batch_size: int
    compile: bool = False

    def overrides(self) -> list[str]:
        return [
            f"train.precision={self.precision}",
            f"train.channels_last={str(self.channels_last).lower()}",
            f"train.batch_size={self.batch_size}",
            f"train.compile={str(self.compile).lower()}",
        ]


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between a GPU run and a dry run."""

    model_overrides: tuple[str, ...]
    image_px: int
    synth_counts: dict[str, int]
    settings: tuple[Setting, ...]
    warmup_steps: int
    timed_steps: int
    loader_setting: Setting
    loader_steps: int
    cbam_shapes: tuple[tuple[int, int, int], ...]
    cbam_batch: int
    cbam_iters: int
    full_run_overrides: tuple[str, ...]
    full_run_epochs: int
    matmul_n: int
    copy_mib: int
    sync_steps: int
    notes: dict[str, str] = field(default_factory=dict)


# The paper model (configs/attention_deeplab.yaml) from scratch, so no ImageNet weights file is needed.
CONFIG = "configs/attention_deeplab.yaml"
_GPU_SETTINGS = (
    Setting("fp32 batch 4", "no", False, 4),
    Setting("bf16 channels-last batch 16", "bf16", True, 16),
    Setting("bf16 channels-last batch 32", "bf16", True, 32),
    Setting("compiled bf16 channels-last batch 32", "bf16", True, 32, compile=True),  # last: compiling is slow
)
_DRY_SETTINGS = (
    Setting("fp32 batch 2", "no", False, 2),
    Setting("bf16 channels-last batch 2", "bf16", True, 2),
    Setting("bf16 channels-last batch 4", "bf16", True, 4),
    Setting("compiled bf16 channels-last batch 4", "bf16", True, 4, compile=True),
)
# The full run's setting: the fast one, with the paper augmentation applied on the GPU.
_FULL_RUN = ("train.precision=bf16", "train.channels_last=true", "data.augment.where=device")

GPU_SIZES = Sizes(
    model_overrides=("model.init=random",),
    image_px=512,
    synth_counts={"train": 383, "valid": 149},  # DDR's lesion-segmentation train / valid splits
    settings=_GPU_SETTINGS,
    warmup_steps=5,
    timed_steps=20,
    loader_setting=_GPU_SETTINGS[1],
    loader_steps=30,
    cbam_shapes=((256, 16, 16), (48, 128, 128)),  # the two CBAM sites at 512² (after ASPP; low-level projection)
    cbam_batch=16,
    cbam_iters=50,
    full_run_overrides=(*_FULL_RUN, "train.batch_size=16", "eval.batch_size=16"),
    full_run_epochs=3,
    matmul_n=8192,
    copy_mib=256,
    sync_steps=20,
)
DRY_SIZES = Sizes(
    model_overrides=("model.init=random", "model.backbone=resnet18"),
    image_px=64,
    synth_counts={"train": 8, "valid": 4},
    settings=_DRY_SETTINGS,
    warmup_steps=1,
    timed_steps=2,
    loader_setting=_DRY_SETTINGS[1],
    loader_steps=2,
    cbam_shapes=((16, 4, 4), (8, 16, 16)),
    cbam_batch=2,
    cbam_iters=3,
    full_run_overrides=(*_FULL_RUN, "train.batch_size=4", "eval.batch_size=4"),
    full_run_epochs=3,
    matmul_n=256,
    copy_mib=4,
    sync_steps=2,
    notes={
        # inductor needs minutes per graph on a 2-core CPU; the compile path still runs, graphs captured by Dynamo
        "compile": "dry run: torch.compile with Dynamo's eager backend (inductor takes minutes per graph on a CPU)",
    },
)


def sizes_for(dry_run: bool) -> Sizes:
    return DRY_SIZES if dry_run else GPU_SIZES

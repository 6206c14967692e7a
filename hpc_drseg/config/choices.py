"""Every closed choice set of the package, defined once as a Literal; the tuple of its values derives from it.

Config fields are annotated with the Literal (the loader checks values against it), and models, the CLI and the
data writer import the tuple. Standard library only.
"""

from __future__ import annotations

from typing import Literal, get_args

ModelName = Literal["attention_deeplab", "deeplabv3plus", "unet"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)

# Backbone initialisation: ImageNet weights from a local file (the paper), or random (always an explicit choice).
ModelInit = Literal["imagenet", "random"]
MODEL_INITS: tuple[str, ...] = get_args(ModelInit)

BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
BACKBONES: tuple[str, ...] = get_args(BackboneName)

OutputStride = Literal[16, 32]
OUTPUT_STRIDES: tuple[int, ...] = get_args(OutputStride)

# Where Attention-DeepLab inserts CBAM: after ASPP (256 ch) and after the 48-ch low-level projection.
CBAMSite = Literal["aspp", "low_level"]
CBAM_SITES: tuple[str, ...] = get_args(CBAMSite)

# eager PyTorch, torch.compile of it, or the fused Triton kernel (hpc_drseg/kernels/cbam_triton.py)
CBAMImpl = Literal["eager", "compile", "triton"]
CBAM_IMPLS: tuple[str, ...] = get_args(CBAMImpl)

AugmentPreset = Literal["paper", "light", "none"]
AUGMENT_PRESETS: tuple[str, ...] = get_args(AugmentPreset)

# Border fill of the geometric augmentations; the first, reflect_101, is what albumentations 1.x (the paper's code) did.
AugmentBorder = Literal["reflect_101", "constant"]
AUGMENT_BORDERS: tuple[str, ...] = get_args(AugmentBorder)

# Where training images are augmented: in the loader workers (CPU, albumentations) or on the training device (torch).
AugmentWhere = Literal["workers", "device"]
AUGMENT_WHERE: tuple[str, ...] = get_args(AugmentWhere)

BoundaryMode = Literal["paper", "edge_emphasis"]
BOUNDARY_MODES: tuple[str, ...] = get_args(BoundaryMode)

Precision = Literal["no", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# torch.compile modes (reduce-overhead uses CUDA graphs; max-autotune also searches kernel configurations).
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)

# Experiment trackers of train.trackers, each an Accelerate tracker (train/trackers.py: directories, extras).
Tracker = Literal["tensorboard", "mlflow", "wandb"]
TRACKERS: tuple[str, ...] = get_args(Tracker)

MonitorMode = Literal["max", "min"]
MONITOR_MODES: tuple[str, ...] = get_args(MonitorMode)

# Evaluation protocols: the paper's (per batch of 4 at the shards' resolution) and the standard one (native
# resolution, whole split); "both" reports them side by side.
EvalProtocol = Literal["paper", "standard", "both"]
EVAL_PROTOCOLS: tuple[str, ...] = get_args(EvalProtocol)

# Which checkpoint `drseg eval` scores: auto = best.pt, else last.pt.
CheckpointChoice = Literal["auto", "best", "last"]
CHECKPOINT_CHOICES: tuple[str, ...] = get_args(CheckpointChoice)

# How `drseg shard` stores training images; the first is the default (data/shards.py says why there are two).
ImageCodec = Literal["png", "npy"]
IMAGE_CODECS: tuple[str, ...] = get_args(ImageCodec)

# How `drseg shard` shrinks masks; the first is the default (data/shards.py resize_mask defines each rule).
MaskResize = Literal["nearest", "area", "any"]
MASK_RESIZE_RULES: tuple[str, ...] = get_args(MaskResize)

ExecutorKind = Literal["slurm", "local", "debug"]
EXECUTOR_KINDS: tuple[str, ...] = get_args(ExecutorKind)

SweepDistribution = Literal["choice", "uniform", "loguniform"]
SWEEP_DISTRIBUTIONS: tuple[str, ...] = get_args(SweepDistribution)

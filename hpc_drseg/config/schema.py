"""The run configuration's schema: one dataclass tree, every field with a default and a docstring (the string after
it), checks of single fields and cross-field rules in `__post_init__`. Loading lives in loader.py. Standard library
only (no torch), so the CLI validates a config in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hpc_drseg.config.checks import ConfigError, check_positive, check_range, check_unique_choices
from hpc_drseg.config.choices import (
    CBAM_SITES,
    AugmentBorder,
    AugmentPreset,
    AugmentWhere,
    BackboneName,
    BoundaryMode,
    CBAMImpl,
    CBAMSite,
    CompileMode,
    EvalProtocol,
    ModelInit,
    ModelName,
    MonitorMode,
    OutputStride,
    Precision,
    Tracker,
)
from hpc_drseg.constants import LESIONS

# What validation logs each epoch as val/<name> (train/validate.py): the names train.monitor and
# optim.plateau_monitor may watch. Standard protocol at training resolution, paper protocol as paper_*.
VALIDATION_SUMMARIES = ("loss", "mAP", "mIoU", "mDice", "mAUPR11", "paper_mAP", "paper_mIoU")
VALIDATION_PER_LESION = ("AP", "IoU")
VALIDATION_QUANTITIES: tuple[str, ...] = tuple(
    f"val/{name}"
    for name in (*VALIDATION_SUMMARIES, *(f"{m}_{lesion}" for m in VALIDATION_PER_LESION for lesion in LESIONS))
)


def check_validation_quantity(key: str, name: str) -> None:
    if name not in VALIDATION_QUANTITIES:
        raise ConfigError(
            f"{key}: got {name!r}; it must name a validation quantity: {', '.join(VALIDATION_QUANTITIES)}"
        )


def quantity_mode(name: str) -> MonitorMode:
    return "min" if name.endswith("loss") else "max"


# U-Net halves the resolution four times; DeepLab models need multiples of their backbone's output stride.
UNET_INPUT_MULTIPLE = 16


def input_multiple(model_name: str, output_stride: int) -> int:
    """The one rule for input sizes: height and width must be multiples of the model's total downsampling."""
    return UNET_INPUT_MULTIPLE if model_name == "unet" else output_stride


@dataclass
class AugmentConfig:
    preset: AugmentPreset = "paper"
    """'paper': the paper's transforms (docs/method.md); 'light': flips/rotations only; 'none': resize+normalise."""
    strength: float = 1.0
    """Multiplies every transform's probability (0 disables all, 1 = the paper's values)."""
    border: AugmentBorder = "reflect_101"
    """Border fill of geometric transforms, image and mask alike: 'reflect_101' mirrors (paper code), 'constant' = 0."""
    where: AugmentWhere = "workers"
    """Where training images are augmented: 'workers' (loader worker processes on the CPU, albumentations) or 'device'
    (the decoded training set is kept on the training device and augmented there in batches with torch: the same
    transforms, probabilities and ranges, one grid_sample for all geometric ones; for GPUs the CPUs cannot feed;
    docs/input-path.md). Evaluation is unaffected."""

    def __post_init__(self) -> None:
        check_range("data.augment.strength", self.strength, 0.0, 2.0)


@dataclass
class DataConfig:
    shards: str = "data/shards"
    """Shard directory written by `drseg shard` (holds manifest.json)."""
    image_px: int = 512
    """Side of the square training image; must equal the shards' image_px."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "valid"
    """Split used for validation (LR schedule, early stopping, best checkpoint)."""
    test_split: str = "test"
    """Split reported by `drseg eval` by default."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the main process)."""
    subset: int = 0
    """If > 0, use only this many training samples per epoch (debug runs)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-time augmentation (validation and test get resize + normalise only)."""

    def __post_init__(self) -> None:
        check_positive("data.image_px", self.image_px)  # its multiple depends on the model: RunConfig checks it
        check_range("data.num_workers", self.num_workers, 0, 256)
        check_range("data.subset", self.subset, 0, 10_000_000)


@dataclass
class CBAMConfig:
    impl: CBAMImpl = "eager"
    """CBAM computation: eager PyTorch, torch.compile of it, or the fused Triton kernel."""
    reduction: int = 16
    """Channel-MLP reduction ratio r (hidden = max(1, C // r))."""
    kernel_size: int = 7
    """Spatial-attention convolution size (odd)."""
    sites: list[CBAMSite] = field(default_factory=lambda: list(CBAM_SITES))
    """Where Attention-DeepLab inserts CBAM: 'aspp' (after ASPP), 'low_level' (after the 48-ch projection)."""

    def __post_init__(self) -> None:
        check_positive("model.cbam.reduction", self.reduction)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"model.cbam.kernel_size: got {self.kernel_size}; it must be a positive odd number")
        check_unique_choices("model.cbam.sites", self.sites)


@dataclass
class ModelConfig:
    name: ModelName = "attention_deeplab"
    """Architecture: Attention-DeepLab (paper), plain DeepLab-V3+, or U-Net."""
    backbone: BackboneName = "resnet50"
    """ResNet encoder of the DeepLab models (torchvision module names)."""
    init: ModelInit = "imagenet"
    """'imagenet' (the paper) loads model.pretrained_path; 'random' trains from scratch (U-Net always does)."""
    pretrained_path: Optional[str] = None
    """Local torchvision-format ImageNet ResNet state-dict file (model.init=imagenet); never downloaded at run time."""
    output_stride: OutputStride = 32
    """Backbone output stride: 32 = the paper's model (no dilation), 16 = dilated layer4 (usual DeepLab-V3+)."""
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    """Atrous rates of the three 3×3 ASPP branches."""
    aspp_separable: bool = False
    """Depthwise-separable ASPP/decoder convs (as SMP) instead of ordinary 3×3 convs (as the paper's code)."""
    use_aux_head: bool = False
    """Auxiliary FCN head on layer4 (paper code, not text); training only."""
    align_corners: bool = True
    """align_corners of the DeepLab models' bilinear upsampling (paper code: True); U-Net ignores it."""
    cbam: CBAMConfig = field(default_factory=CBAMConfig)
    """CBAM attention blocks (used by attention_deeplab only)."""
    unet_base_width: int = 32
    """U-Net channels at the first level (paper run: 32)."""
    unet_bilinear: bool = True
    """U-Net upsampling by bilinear interpolation (True, paper run) or transposed convolution."""

    def __post_init__(self) -> None:
        if self.init == "random" and self.pretrained_path is not None and self.name != "unet":
            raise ConfigError(
                f"model.pretrained_path={self.pretrained_path} is set but model.init=random; set model.init=imagenet "
                "to load it, or model.pretrained_path=null to train from scratch"
            )
        if len(self.aspp_rates) != 3 or any(r < 1 for r in self.aspp_rates):
            raise ConfigError(f"model.aspp_rates: got {self.aspp_rates}; give three positive rates, e.g. [6, 12, 18]")
        check_positive("model.unet_base_width", self.unet_base_width)

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this (see `input_multiple`)."""
        return input_multiple(self.name, self.output_stride)


@dataclass
class LossWeights:
    dice: float = 1.0
    """Weight of the soft Dice term."""
    bce: float = 0.5
    """Weight of the binary cross-entropy term."""
    focal: float = 1.0
    """Weight of the focal term."""
    boundary: float = 0.5
    """Weight of the boundary term (paper eq. 5-6)."""

    def __post_init__(self) -> None:
        for name in ("dice", "bce", "focal", "boundary"):
            check_range(f"loss.weights.{name}", getattr(self, name), 0.0, 1e6)


@dataclass
class LossConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    """Weights of the four terms: L = dice·Dice + bce·BCE + focal·Focal + boundary·Boundary."""
    focal_alpha: float = 0.25
    """Focal α for positives (negatives get 1 − α)."""
    focal_gamma: float = 2.0
    """Focal focusing exponent γ."""
    boundary_theta: float = 1.5
    """θ in exp(−θ·‖∇T‖) of the boundary term."""
    boundary_mode: BoundaryMode = "paper"
    """'paper' = eq. (5) as written (down-weights pixels at lesion edges); 'edge_emphasis' up-weights them instead."""
    pos_weight: Optional[list[float]] = None
    """Per-lesion BCE positive weights in LESIONS order (paper code: [4, 1, 1.5, 2]); None = off."""
    dice_eps: float = 1e-6
    """Smoothing ε of the Dice term."""
    aux_weight: float = 0.4
    """Weight of the auxiliary head's loss (when model.use_aux_head)."""

    def __post_init__(self) -> None:
        check_range("loss.focal_alpha", self.focal_alpha, 0.0, 1.0)
        check_range("loss.focal_gamma", self.focal_gamma, 0.0, 10.0)
        check_range("loss.boundary_theta", self.boundary_theta, 0.0, 100.0)
        check_range("loss.aux_weight", self.aux_weight, 0.0, 1e6)
        check_range("loss.dice_eps", self.dice_eps, 1e-12, 1.0)
        if self.pos_weight is not None and len(self.pos_weight) != len(LESIONS):
            raise ConfigError(
                f"loss.pos_weight: got {len(self.pos_weight)} values; give {len(LESIONS)}, one per lesion {LESIONS}"
            )
        for lesion, weight in zip(LESIONS, self.pos_weight or ()):
            check_range(f"loss.pos_weight ({lesion})", weight, 0.0, 1e6)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Adam learning rate (paper)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam β1, β2 (paper)."""
    weight_decay: float = 0.0
    """L2 weight decay (paper text: none; paper code: 1e-5)."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau factor (paper)."""
    plateau_patience: int = 5
    """ReduceLROnPlateau patience in epochs (paper)."""
    plateau_monitor: str = "val/loss"
    """Validation quantity ReduceLROnPlateau watches (paper code: val/loss); lowered for losses, raised otherwise."""
    min_lr: float = 0.0
    """Lower bound of the learning rate."""

    def __post_init__(self) -> None:
        check_range("optim.lr", self.lr, 1e-12, 10.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: got {self.betas}; give two numbers in [0, 1), e.g. [0.9, 0.999]")
        check_range("optim.plateau_factor", self.plateau_factor, 1e-6, 1.0)
        check_range("optim.plateau_patience", self.plateau_patience, 0, 10_000)
        check_range("optim.weight_decay", self.weight_decay, 0.0, 10.0)
        check_range("optim.min_lr", self.min_lr, 0.0, self.lr)
        check_validation_quantity("optim.plateau_monitor", self.plateau_monitor)

    @property
    def plateau_mode(self) -> MonitorMode:
        """A loss should go down; every other validation quantity (AP, IoU, Dice) up."""
        return quantity_mode(self.plateau_monitor)


@dataclass
class TrainConfig:
    run_dir: Optional[str] = None
    """Run directory; None = runs/<config file name>. Re-running on an existing one resumes it."""
    seed: int = 0
    """Seeds Python, NumPy, torch and the data order."""
    batch_size: int = 4
    """Images per process per step (paper: 4)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    max_epochs: int = 100
    """Upper bound on epochs (paper: 100)."""
    max_steps: int = 0
    """If > 0, stop after this many optimiser steps."""
    steps_per_epoch: int = 0
    """Optimiser steps per epoch; 0 = training images / global batch."""
    early_stop_patience: int = 15
    """Stop after this many epochs without improvement of monitor (paper: 15); 0 = never."""
    monitor: str = "val/mAP"
    """Validation quantity for best.pt and early stopping (paper code: AP; e.g. val/mAP, val/mIoU, val/loss)."""
    monitor_mode: MonitorMode = "max"
    """Whether train.monitor should go up (max) or down (min)."""
    precision: Precision = "no"
    """Mixed precision (paper: fp32 = 'no')."""
    channels_last: bool = False
    """Use the channels-last memory format (faster with mixed precision on GPUs and recent CPUs)."""
    compile: bool = False
    """Compile the training forward with torch.compile (after DDP/DeepSpeed wrapping; validation runs eagerly)."""
    compile_mode: CompileMode = "default"
    """torch.compile mode when train.compile is on: default, reduce-overhead (CUDA graphs) or max-autotune."""
    sync_bn: bool = False
    """SyncBatchNorm on multi-GPU runs: exact batch statistics over the global batch at ~2 blocking collectives per
    BatchNorm layer per step. Worth it below ~16 images per GPU; off, each GPU normalises with its own batch."""
    debug: bool = False
    """Single-process debug mode: deterministic, anomaly detection, shapes and timings logged, no compile."""
    checkpoint_every_steps: int = 0
    """Also write last.pt every N steps (0 = only at the end of epochs: see checkpoint_every_epochs)."""
    checkpoint_every_epochs: int = 1
    """Write last.pt at the end of every N-th epoch (and always at the last one, and when stopped)."""
    log_every_steps: int = 10
    """Progress-bar and TensorBoard scalar period."""
    trackers: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers (Accelerate's): tensorboard (RUN/tb), mlflow (RUN/mlruns unless MLFLOW_TRACKING_URI is
    set), wandb (online unless WANDB_MODE=offline); mlflow and wandb need their extra (pip install -e '.[mlflow]')."""
    cpu: bool = False
    """Force CPU even when CUDA is present."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "max_epochs", "log_every_steps", "checkpoint_every_epochs"):
            check_positive(f"train.{name}", getattr(self, name))
        for name in ("seed", "max_steps", "steps_per_epoch", "early_stop_patience", "checkpoint_every_steps"):
            check_range(f"train.{name}", getattr(self, name), 0, 10**12)
        check_validation_quantity("train.monitor", self.monitor)
        check_unique_choices("train.trackers", self.trackers)


@dataclass
class EvalConfig:
    protocol: EvalProtocol = "both"
    """Which evaluation protocol(s) to report (docs/method.md)."""
    split: str = "test"
    """Split evaluated by `drseg eval`."""
    batch_size: int = 4
    """Images per batch; the paper protocol averages per batch of 4."""
    threshold: float = 0.5
    """Probability threshold for IoU and Dice."""
    score_bits: int = 10
    """Resolution of the standard protocol's score histograms: 2**-score_bits of p near 0 and of 1 − p near 1."""

    def __post_init__(self) -> None:
        check_positive("eval.batch_size", self.batch_size)
        check_range("eval.threshold", self.threshold, 0.0, 1.0)
        # 10 bits: AP within 1e-3 of the exact value for confident models, 33 MB of histograms; each bit doubles it
        check_range("eval.score_bits", self.score_bits, 6, 14)


@dataclass
class RunConfig:
    name: str = "run"
    """Run name (defaults to the config file's stem)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, loader and augmentation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Combined loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop, precision, checkpoints."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation protocols."""

    def __post_init__(self) -> None:
        multiple = self.model.input_multiple
        if self.data.image_px % multiple:
            raise ConfigError(
                f"data.image_px: got {self.data.image_px}; it must be divisible by {multiple} for "
                f"{self.model.name} (model.output_stride={self.model.output_stride}), e.g. 256, 512, 1024"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir) if self.train.run_dir else Path("runs") / self.name

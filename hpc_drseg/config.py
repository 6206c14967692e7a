"""Typed run configuration: one dataclass tree, partial YAML overrides, dotted command-line overrides, validation.

Precedence: dataclass defaults < YAML file < `key=value` overrides. Standard library + PyYAML only (no torch), so the
CLI can validate a config in milliseconds. Every field has a default and a docstring (the string after it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from hpc_drseg.atomic import atomic_write_text
from hpc_drseg.constants import LESIONS


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it and says how to fix it."""


# ----------------------------------------------------------------------------------------------------------- tree
@dataclass
class AugmentConfig:
    preset: Literal["paper", "light", "none"] = "paper"
    """'paper': every transform of the paper (SPEC.md); 'light': flips/rotations only; 'none': resize+normalise."""
    strength: float = 1.0
    """Multiplies every transform's probability (0 disables all, 1 = the paper's values)."""

    def __post_init__(self) -> None:
        _check_range("data.augment.strength", self.strength, 0.0, 2.0)


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
    shuffle_buffer: int = 64
    """Samples held in the in-memory shuffle buffer of each worker."""
    subset: int = 0
    """If > 0, use only this many training samples per epoch (debug runs)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-time augmentation (validation and test get resize + normalise only)."""

    def __post_init__(self) -> None:
        _check_positive("data.image_px", self.image_px)
        if self.image_px % 32:
            raise ConfigError(f"data.image_px: got {self.image_px}; it must be divisible by 32 (e.g. 256, 512, 1024)")
        _check_range("data.num_workers", self.num_workers, 0, 256)
        _check_range("data.shuffle_buffer", self.shuffle_buffer, 1, 1_000_000)
        _check_range("data.subset", self.subset, 0, 10_000_000)


@dataclass
class CBAMConfig:
    impl: Literal["eager", "compile", "triton"] = "eager"
    """CBAM computation: eager PyTorch, torch.compile of it, or the fused Triton kernel."""
    reduction: int = 16
    """Channel-MLP reduction ratio r (hidden = max(1, C // r))."""
    kernel_size: int = 7
    """Spatial-attention convolution size (odd)."""
    sites: list[str] = field(default_factory=lambda: ["aspp", "low_level"])
    """Where Attention-DeepLab inserts CBAM: 'aspp' (after ASPP), 'low_level' (after the 48-ch projection)."""

    def __post_init__(self) -> None:
        _check_positive("model.cbam.reduction", self.reduction)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"model.cbam.kernel_size: got {self.kernel_size}; it must be a positive odd number")
        _check_choices("model.cbam.sites", self.sites, ("aspp", "low_level"))


@dataclass
class ModelConfig:
    name: Literal["attention_deeplab", "deeplabv3plus", "unet"] = "attention_deeplab"
    """Architecture: Attention-DeepLab (paper), plain DeepLab-V3+, or U-Net."""
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    """ResNet encoder of the DeepLab models (torchvision module names)."""
    pretrained_path: Optional[str] = None
    """Local torchvision-format ImageNet state-dict file for the backbone; None = random init. Never downloaded."""
    output_stride: Literal[16, 32] = 32
    """Backbone output stride: 32 = the paper's model (no dilation), 16 = dilated layer4 (usual DeepLab-V3+)."""
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    """Atrous rates of the three 3×3 ASPP branches."""
    aspp_separable: bool = False
    """Depthwise-separable ASPP/decoder convs (as SMP) instead of ordinary 3×3 convs (as the paper's code)."""
    use_aux_head: bool = False
    """Auxiliary FCN head on layer4 (paper code, not text); training only."""
    cbam: CBAMConfig = field(default_factory=CBAMConfig)
    """CBAM attention blocks (used by attention_deeplab only)."""
    unet_base_width: int = 32
    """U-Net channels at the first level (paper run: 32)."""
    unet_bilinear: bool = True
    """U-Net upsampling by bilinear interpolation (True, paper run) or transposed convolution."""

    def __post_init__(self) -> None:
        if len(self.aspp_rates) != 3 or any(r < 1 for r in self.aspp_rates):
            raise ConfigError(f"model.aspp_rates: got {self.aspp_rates}; give three positive rates, e.g. [6, 12, 18]")
        _check_positive("model.unet_base_width", self.unet_base_width)

    @property
    def stride(self) -> int:
        """Input sides must be divisible by this."""
        return 16 if self.name == "unet" else 32


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
            _check_range(f"loss.weights.{name}", getattr(self, name), 0.0, 1e6)


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
    boundary_mode: Literal["paper", "edge_emphasis"] = "paper"
    """'paper' = eq. (5) as written (down-weights pixels at lesion edges); 'edge_emphasis' up-weights them instead."""
    pos_weight: Optional[list[float]] = None
    """Per-lesion BCE positive weights in LESIONS order (paper code: [4, 1, 1.5, 2]); None = off."""
    dice_eps: float = 1e-6
    """Smoothing ε of the Dice term."""
    aux_weight: float = 0.4
    """Weight of the auxiliary head's loss (when model.use_aux_head)."""

    def __post_init__(self) -> None:
        _check_range("loss.focal_alpha", self.focal_alpha, 0.0, 1.0)
        _check_range("loss.focal_gamma", self.focal_gamma, 0.0, 10.0)
        _check_range("loss.boundary_theta", self.boundary_theta, 0.0, 100.0)
        if self.pos_weight is not None and len(self.pos_weight) != len(LESIONS):
            raise ConfigError(
                f"loss.pos_weight: got {len(self.pos_weight)} values; give {len(LESIONS)}, one per lesion {LESIONS}"
            )


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
    min_lr: float = 0.0
    """Lower bound of the learning rate."""

    def __post_init__(self) -> None:
        _check_range("optim.lr", self.lr, 1e-12, 10.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: got {self.betas}; give two numbers in [0, 1), e.g. [0.9, 0.999]")
        _check_range("optim.plateau_factor", self.plateau_factor, 1e-6, 1.0)


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
    """Validation quantity for early stopping, LR schedule and best.pt (e.g. val/mAP, val/mIoU, val/loss)."""
    monitor_mode: Literal["max", "min"] = "max"
    """Whether the monitored quantity should go up (max) or down (min)."""
    precision: Literal["no", "bf16", "fp16"] = "no"
    """Mixed precision (paper: fp32 = 'no')."""
    channels_last: bool = False
    """Use the channels-last memory format (faster with mixed precision on GPUs and recent CPUs)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    debug: bool = False
    """Single-process debug mode: deterministic, anomaly detection, shapes and timings logged, no compile."""
    checkpoint_every_steps: int = 0
    """Also write last.pt every N steps (0 = only at the end of each epoch)."""
    log_every_steps: int = 10
    """Progress-bar and TensorBoard scalar period."""
    cpu: bool = False
    """Force CPU even when CUDA is present."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "max_epochs", "log_every_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        for name in ("max_steps", "steps_per_epoch", "early_stop_patience", "checkpoint_every_steps"):
            _check_range(f"train.{name}", getattr(self, name), 0, 10**12)


@dataclass
class EvalConfig:
    protocol: Literal["paper", "standard", "both"] = "both"
    """Which evaluation protocol(s) to report (SPEC.md)."""
    split: str = "test"
    """Split evaluated by `drseg eval`."""
    batch_size: int = 4
    """Images per batch; the paper protocol averages per batch of 4."""
    threshold: float = 0.5
    """Probability threshold for IoU and Dice."""
    histogram_bins: int = 10000
    """Score-histogram bins of the standard protocol's AP, a multiple of 100 (finer = closer to exact AP)."""

    def __post_init__(self) -> None:
        _check_positive("eval.batch_size", self.batch_size)
        _check_range("eval.threshold", self.threshold, 0.0, 1.0)
        if not 100 <= self.histogram_bins <= 10_000_000 or self.histogram_bins % 100:
            # PR curves are read at thresholds 0.00, 0.01, …, 1.00, which must fall on bin edges.
            raise ConfigError(f"eval.histogram_bins: got {self.histogram_bins}; use a multiple of 100 (e.g. 10000)")


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
        if self.data.image_px % self.model.stride:
            raise ConfigError(
                f"data.image_px={self.data.image_px} is not divisible by {self.model.name}'s stride "
                f"{self.model.stride}; use a multiple of {self.model.stride}"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir) if self.train.run_dir else Path("runs") / self.name


# ------------------------------------------------------------------------------------------- building from dicts
def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: got {value}; it must be > 0")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}: got {value}; it must be in [{low}, {high}]")


def _check_choices(key: str, values: list[str], choices: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in choices]
    if bad or len(set(values)) != len(values):
        raise ConfigError(f"{key}: got {values}; each entry must be one of {list(choices)}, without repeats")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against the annotation `tp` and converts where lossless (int → float, list → nested)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and isinstance(choices[0], str):
            value = _unyaml_bool(value, choices)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"{key}: got {value!r}; choose one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}; expected a list, e.g. {key}=[1,2]")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected a mapping of {_field_names(tp)}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected {tp.__name__}")
    return value


# YAML 1.1 (PyYAML) reads these words as booleans, so `train.precision=no` or `precision: no` arrives as False.
_YAML_BOOL_WORDS = {True: ("yes", "true", "on"), False: ("no", "false", "off")}


def _unyaml_bool(value: bool, choices: tuple[str, ...]) -> Any:
    """The string choice that YAML turned into `value` (e.g. False -> 'no'); `value` unchanged when none fits."""
    matches = [c for c in choices if c.lower() in _YAML_BOOL_WORDS[value]]
    return matches[0] if len(matches) == 1 else value


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = _field_names(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key '{prefix}{key}'; valid keys here: {', '.join(prefix + k for k in known)}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ of plain ValueError, or a wrong constructor call
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['optim.lr=3e-4', 'model.cbam.sites=[aspp]'] → nested dict; values parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. optim.lr=3e-4)")
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, str) and _looks_like_float(value):
            value = float(value)  # PyYAML 1.1 reads '3e-4' as a string
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[leaf] = value
    return nested


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; see configs/ for the shipped ones")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of {_field_names(RunConfig)}")
    return _fix_yaml_floats(loaded)


def _fix_yaml_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node) and any(c in node for c in "eE."):
        return float(node)
    return node


# ---------------------------------------------------------------------------------------------------- public API
def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Builds and validates a RunConfig from a (partial) nested dict."""
    return _build(RunConfig, values)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Defaults < YAML file at `path` < dotted `overrides`. Raises ConfigError naming the bad key."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path))
        values.setdefault("name", Path(path).stem)
    values = _merge(values, parse_overrides(list(overrides or [])))
    return config_from_dict(values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Writes the resolved config atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    atomic_write_text(path, dump_config(cfg))
    return path


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf field; used by `drseg config --list`."""
    docs = _field_docs(cls)
    rows: list[tuple[str, str, str]] = []
    instance = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if _is_dataclass_type(hints[f.name]):
            rows.extend(describe_fields(hints[f.name], key + "."))
        else:
            rows.append((key, repr(getattr(instance, f.name)), docs.get(f.name, "")))
    return rows


def _field_docs(cls: type) -> dict[str, str]:
    """Reads the string literal written after each field (the attribute-docstring convention)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value).strip()  # type: ignore[union-attr]
    return docs


# ------------------------------------------------------------------------------------------------- sweep specs
# A sweep file (`drseg sweep --config configs/sweep_*.yaml`) names a base run config and the keys to vary; its trials
# are built and run by hpc_drseg/sweep.py. Same rules as the run config: defaults here, YAML < dotted overrides.
@dataclass
class SweepParam:
    key: str = ""
    """Dotted run-config key to sample, e.g. optim.lr."""
    dist: Literal["choice", "uniform", "loguniform"] = "choice"
    """Distribution: 'choice' among `values`, 'uniform' or 'loguniform' in [low, high]."""
    values: list[Any] = field(default_factory=list)
    """Candidates of 'choice'."""
    low: Optional[float] = None
    """Lower bound of 'uniform'/'loguniform' (> 0 for loguniform)."""
    high: Optional[float] = None
    """Upper bound of 'uniform'/'loguniform'."""

    def __post_init__(self) -> None:
        _check_run_key(f"random.params[{self.key or '?'}].key", self.key)
        where = f"random.params[{self.key}]"
        if self.dist == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ConfigError(f"{where}: 'choice' needs a non-empty `values` list and no low/high")
            return
        if self.values or self.low is None or self.high is None or not self.low < self.high:
            raise ConfigError(f"{where}: '{self.dist}' needs low < high and no `values`; got low={self.low}, "
                              f"high={self.high}")  # fmt: skip
        if self.dist == "loguniform" and self.low <= 0:
            raise ConfigError(f"{where}: 'loguniform' needs low > 0; got {self.low}")


@dataclass
class SweepRandomConfig:
    trials: int = 0
    """Random configurations to draw (0 = no random search)."""
    seed: int = 0
    """Seed of the draw (same seed, same configurations)."""
    params: list[SweepParam] = field(default_factory=list)
    """Keys to sample and their distributions."""

    def __post_init__(self) -> None:
        _check_range("random.trials", self.trials, 0, 100_000)
        if self.trials and not self.params:
            raise ConfigError("random.params: random.trials > 0 needs at least one parameter to sample")
        keys = [p.key for p in self.params]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"random.params: a key is listed twice in {keys}")


@dataclass
class SweepExecutorConfig:
    kind: Literal["slurm", "local", "debug"] = "slurm"
    """'slurm' (submitit job array), 'local' (submitit processes on this machine), 'debug' (in-process, sequential)."""
    partition: Optional[str] = None
    """SLURM partition; None = the cluster's default."""
    timeout_min: int = 24 * 60
    """Time limit of one array member in minutes; on timeout it checkpoints and requeues itself."""
    gpus_per_node: int = 1
    """GPUs of one array member (0 = CPU only); trials are spread one per GPU."""
    cpus_per_task: int = 8
    """CPU cores of one array member (data workers of all its trials)."""
    mem_gb: Optional[int] = None
    """Memory of one array member in GB; None = the cluster's default."""
    slurm_array_parallelism: int = 16
    """At most this many array members run at once (also the local executor's limit)."""
    trials_per_gpu: int = 1
    """Trials packed on one GPU; they run concurrently, each in its own process."""
    max_num_timeout: int = 3
    """Requeues after a time-out before a member gives up (preemptions do not count)."""
    signal_delay_s: int = 120
    """SIGUSR2 this many seconds before the time limit, so that running trials can checkpoint."""
    slurm_additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options, e.g. {account: proj, qos: high, constraint: h100}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each member (e.g. 'module load cuda')."""

    def __post_init__(self) -> None:
        for name in ("timeout_min", "slurm_array_parallelism", "trials_per_gpu", "cpus_per_task", "signal_delay_s"):
            _check_positive(f"executor.{name}", getattr(self, name))
        _check_range("executor.gpus_per_node", self.gpus_per_node, 0, 64)
        _check_range("executor.max_num_timeout", self.max_num_timeout, 0, 1000)
        if self.mem_gb is not None:
            _check_positive("executor.mem_gb", self.mem_gb)
        if not isinstance(self.slurm_additional_parameters, dict):
            raise ConfigError(f"executor.slurm_additional_parameters: got {self.slurm_additional_parameters!r}; "
                              "give a mapping of sbatch options, e.g. {account: proj}")  # fmt: skip


@dataclass
class SweepEvalConfig:
    split: str = "test"
    """Split each trial is scored on by `drseg eval` after training."""
    protocol: Literal["paper", "standard", "both"] = "both"
    """Evaluation protocol(s) of that score."""
    checkpoint: Literal["auto", "best", "last"] = "auto"
    """Checkpoint evaluated (auto = best, else last)."""
    rank_by: str = "val/mAP"
    """Summary column that ranks configurations, e.g. val/mAP or test/standard/mAP."""
    rank_mode: Literal["max", "min"] = "max"
    """Whether a higher (max) or lower (min) rank_by is better."""


@dataclass
class SweepConfig:
    name: str = "sweep"
    """Sweep name (defaults to the sweep file's stem); names the SLURM job and the default sweep_dir."""
    base_config: Optional[str] = None
    """Run config every trial starts from (relative: to the sweep file's folder, else the current one)."""
    overrides: list[str] = field(default_factory=list)
    """Fixed key=value overrides of every trial, e.g. [data.shards=/data/shards]."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted key → values; every combination is one configuration."""
    points: list[list[str]] = field(default_factory=list)
    """Extra configurations, each a list of key=value overrides (ablation rows that are not a product)."""
    random: SweepRandomConfig = field(default_factory=SweepRandomConfig)
    """Random search; its configurations are added to the grid's."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Every configuration is trained once per seed (train.seed)."""
    sweep_dir: Optional[str] = None
    """Output folder; None = sweeps/<name>."""
    workdir: Optional[str] = None
    """Working directory of every trial (relative paths in overrides); None = where the sweep is started."""
    executor: SweepExecutorConfig = field(default_factory=SweepExecutorConfig)
    """Where and how the trials run."""
    eval: SweepEvalConfig = field(default_factory=SweepEvalConfig)
    """Scoring of every trial and ranking of the summary."""

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds: got {self.seeds}; give distinct non-negative integers, e.g. [0, 1, 2]")
        for key, values in self.grid.items():
            _check_run_key(f"grid.{key}", key)
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key}: got {values!r}; give a non-empty list of values, e.g. [0.5, 1.0]")
            if len({yaml.safe_dump(v) for v in values}) != len(values):
                raise ConfigError(f"grid.{key}: got {values}; a value is repeated")
        clash = set(self.grid) & {p.key for p in self.random.params}
        if clash:
            raise ConfigError(f"grid and random.params both vary {sorted(clash)}; vary each key in one place")
        if not (self.grid or self.points or self.random.trials):
            raise ConfigError("a sweep needs `grid`, `points` or `random` (with trials > 0); otherwise use drseg train")


def _check_run_key(where: str, key: str) -> None:
    """A swept key must be a dotted run-config key the sweep does not set itself."""
    if not isinstance(key, str) or "." not in key.strip("."):
        raise ConfigError(f"{where}: got {key!r}; give a dotted run-config key, e.g. loss.weights.dice")
    if key in ("train.seed", "train.run_dir"):
        raise ConfigError(f"{where}: the sweep sets {key} itself; list seeds under `seeds` instead")


def _flatten_keys(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'loss': {'weights': {'dice': [..]}}} → {'loss.weights.dice': [..]}: grid keys may be nested or dotted."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten_keys(value, f"{prefix}{key}."))
    return flat


def load_sweep_config(path: str | Path, overrides: Optional[list[str]] = None) -> SweepConfig:
    """Defaults < sweep YAML < dotted overrides (e.g. executor.kind=local seeds=[0,1]); base_config made absolute."""
    path = Path(path)
    values = _read_yaml(path)
    values.setdefault("name", path.stem)
    updates = _fix_yaml_floats(parse_overrides(list(overrides or [])))  # grid.optim.lr=[1e-3]: '1e-3' is a float
    grid = {}
    for source in (values, updates):
        if isinstance(source.get("grid"), dict):
            grid.update(_flatten_keys(source.pop("grid")))
    values = _merge(values, updates)
    if grid:
        values["grid"] = grid
    spec = _build(SweepConfig, values)
    if spec.base_config is not None:
        spec.base_config = str(_find_base_config(Path(spec.base_config), path))
    return spec


def _find_base_config(base: Path, sweep_file: Path) -> Path:
    candidates = [base] if base.is_absolute() else [sweep_file.parent / base, Path.cwd() / base]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"{sweep_file}: base_config {base} not found (looked at "
                            f"{', '.join(str(c) for c in candidates)}); give a path to a run config YAML")  # fmt: skip

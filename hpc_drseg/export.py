"""`drseg export`: a trained checkpoint as files other programs load without the training code.

safetensors: the weights (the model's own state-dict keys) plus a JSON sidecar PATH.json (architecture, lesion order,
normalisation, input size rule, initialisation, provenance). onnx: (B, 3, H, W) normalised image → (B, 4, H, W)
logits, batch, height and width dynamic (multiples of the model's input multiple), opset ONNX_OPSET, eager CBAM, the
same sidecar; checked against PyTorch with ONNX Runtime (when installed) before anything is written.
Files are written atomically; an existing output is replaced only with overwrite, the checkpoint never.
Importing this module is cheap (no torch): the command line reads EXPORT_FORMATS from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from hpc_drseg import __version__
from hpc_drseg.atomic import atomic_write_bytes, atomic_write_json
from hpc_drseg.constants import IMAGENET_MEAN, IMAGENET_STD, LESIONS
from hpc_drseg.errors import ExistsError, InputError

if TYPE_CHECKING:
    import torch

    from hpc_drseg.config import RunConfig
    from hpc_drseg.inference import LoadedCheckpoint

EXPORT_FORMATS: tuple[str, ...] = ("safetensors", "onnx")
SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx"}
SIDECAR_VERSION = 1
# The models need only long-standing operators (Conv, BatchNormalization, Resize, pooling); 17 is read by every
# current ONNX Runtime. Exported by the TorchScript exporter (dynamo=False): docs/platform-notes.md says why.
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-3  # max |logit difference| ONNX Runtime vs PyTorch that passes the check
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"
ONNX_DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
# A checkpoint key naming the sha256 of the shards' manifest.json the run trained on; copied when present.
MANIFEST_HASH_KEY = "data_manifest_sha256"
EXTRA_HINT = "pip install 'hpc_drseg[export]'"


class OnnxCheck(NamedTuple):
    """One ONNX Runtime vs PyTorch comparison: input shape (B, 3, H, W) and max |logit difference|."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float


class OnnxMismatchError(RuntimeError):
    """ONNX Runtime's logits differ from PyTorch's by more than ONNX_TOLERANCE; nothing was written."""

    def __init__(self, out: Path, checks: list[OnnxCheck]) -> None:
        self.out, self.checks = out, checks
        super().__init__(
            f"{out} not written: ONNX Runtime differs from PyTorch by max |Δlogit| {format_checks(checks)} "
            f"(tolerance {ONNX_TOLERANCE:g}); --no-check writes it anyway"
        )


@dataclass
class ExportResult:
    out: Path
    sidecar: Path
    format: str
    checks: Optional[list[OnnxCheck]] = None
    """ONNX Runtime comparisons (onnx with onnxruntime installed and the check on); None = not checked."""
    notes: list[str] = field(default_factory=list)
    """What the user should know, e.g. that onnxruntime is missing and the file was not checked."""


def sidecar_path(out: str | Path) -> Path:
    """The JSON description written beside an export: model.onnx → model.onnx.json (so that the safetensors and
    ONNX exports of one model may share a stem)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def format_checks(checks: list[OnnxCheck]) -> str:
    return ", ".join(f"{c.max_abs_diff:.2e} at {'×'.join(map(str, c.shape))}" for c in checks)


# ------------------------------------------------------------------------------------------------------ checks
def check_targets(checkpoint: Path, out: Path, fmt: str, overwrite: bool) -> None:
    """Refuses, before the checkpoint is read: an unknown format or a file name not ending as it should, a target
    that is the checkpoint (never replaced, even with overwrite), a folder, or an existing file without overwrite."""
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"--format: got {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    for target in (out, sidecar_path(out)):
        if _same_file(target, checkpoint):
            raise InputError(f"--out {out} would write {target} over the checkpoint {checkpoint}; choose another --out")
    if out.suffix != SUFFIXES[fmt]:
        raise InputError(
            f"--out {out}: --format {fmt} writes a *{SUFFIXES[fmt]} file; name it e.g. {out.with_suffix(SUFFIXES[fmt])}"
        )
    for target in (out, sidecar_path(out)):
        if os.path.isdir(target):
            raise ExistsError(f"{target} is a folder; --out names the file to write: choose another --out")
        if os.path.lexists(target) and not overwrite:
            raise ExistsError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")


def _same_file(target: Path, checkpoint: Path) -> bool:
    """Whether `target` is the checkpoint, through symlinks and hard links as well as by name."""
    if os.path.exists(target) and os.path.exists(checkpoint):
        return os.path.samefile(target, checkpoint)
    return target.expanduser().resolve() == checkpoint.expanduser().resolve()


def _require(fmt: str) -> None:
    """The packages a format needs (the `export` extra): an InputError naming the missing one and the fix."""
    for module in ("safetensors",) if fmt == "safetensors" else ("onnx",):
        try:
            __import__(module)
        except ImportError:
            raise InputError(f"--format {fmt} needs the Python package {module}: {EXTRA_HINT}") from None


# ----------------------------------------------------------------------------------------------------- export
def export_model(
    checkpoint: str | Path, out: str | Path, fmt: str, overwrite: bool = False, check: bool = True
) -> ExportResult:
    """Writes `out` (weights, or the ONNX graph) and its sidecar `sidecar_path(out)` from a `drseg train` checkpoint.

    check (onnx): compare ONNX Runtime with PyTorch at two input sizes first; OnnxMismatchError (nothing written)
    beyond ONNX_TOLERANCE. Without onnxruntime the file is written unchecked and ExportResult.notes says so.
    """
    from hpc_drseg.inference import load_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    check_targets(checkpoint, out, fmt, overwrite)
    _require(fmt)
    loaded = load_checkpoint(checkpoint, device="cpu")
    use_eager_cbam(loaded.model)
    description = describe(loaded, checkpoint)
    result = ExportResult(out=out, sidecar=sidecar_path(out), format=fmt)
    if fmt == "safetensors":
        data = safetensors_bytes(loaded.model, description)
    else:
        data = onnx_bytes(loaded.model, loaded.config, description)
        result.checks = _checked(data, loaded, out, check, result.notes)
        description["onnx"]["check"] = _check_record(result.checks, result.notes)
    atomic_write_bytes(out, data)
    description["weights"] = {"file": out.name, "format": fmt, "bytes": len(data), "sha256": _sha256(data)}
    atomic_write_json(result.sidecar, description)
    return result


def use_eager_cbam(model: torch.nn.Module) -> None:
    """Every CBAM block of `model` on the plain PyTorch path: the fused Triton kernel and torch.compile cannot be
    exported, and the eager path is their reference (same parameters, same result)."""
    from hpc_drseg.models import CBAM

    for module in model.modules():
        if isinstance(module, CBAM):
            module.impl = "eager"


def describe(loaded: LoadedCheckpoint, checkpoint: Path) -> dict[str, Any]:
    """The sidecar's content: everything needed to build the model, feed it and read its output, and provenance."""
    from hpc_drseg.config import config_to_dict
    from hpc_drseg.models.registry import architecture

    cfg, state, model = loaded.config, loaded.state, loaded.model
    progress = state.get("progress") or {}
    return {
        "format_version": SIDECAR_VERSION,
        "producer": f"hpc_drseg {__version__}",
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model": config_to_dict(cfg)["model"],
        "architecture": architecture(cfg.model),
        "lesions": list(LESIONS),
        "output": "logits (B, 4, H, W), one channel per lesion in `lesions` order; sigmoid gives probabilities",
        "input": {
            "layout": "(B, 3, H, W) float32, RGB",
            "image_px": cfg.data.image_px,
            "input_multiple": cfg.model.input_multiple,
            "resize": "the model was trained on image_px × image_px images (area averaging when shrinking); H and W "
            "must be multiples of input_multiple",
        },
        "normalization": {
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "formula": "(pixel / 255 - mean) / std per RGB channel",
        },
        "initialisation": {"init": cfg.model.init, "pretrained_path": cfg.model.pretrained_path},
        "data_manifest_sha256": state.get(MANIFEST_HASH_KEY),
        "source": {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": _file_sha256(checkpoint),
            "run_name": cfg.name,
            "epoch": progress.get("epoch"),
            "global_step": progress.get("global_step"),
        },
    }


def safetensors_bytes(model: torch.nn.Module, description: dict[str, Any]) -> bytes:
    """The state dict as safetensors, its keys those of the model class (load_state_dict(strict=True) takes them);
    the header's metadata holds the sidecar's description as JSON too, so the file alone says what it is."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    return save(tensors, metadata={"hpc_drseg": json.dumps(description)})


# ------------------------------------------------------------------------------------------------------- onnx
def onnx_bytes(model: torch.nn.Module, cfg: RunConfig, description: dict[str, Any]) -> bytes:
    """The eval-mode model as ONNX (opset ONNX_OPSET, dynamic batch/height/width) with the description in its
    metadata, exported by the TorchScript exporter: torch.export specialises the batch dimension of CBAM's pooled
    (2B, C, 1, 1) tensor (docs/platform-notes.md)."""
    import onnx
    import torch

    side = cfg.data.image_px
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (above) and warns of its deprecation; the models' Python
        # check that sides are multiples of input_multiple is not part of the graph: the tracer says so, as expected.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 3, side, side),),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: ONNX_DYNAMIC_AXES, ONNX_OUTPUT: ONNX_DYNAMIC_AXES},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    _check_dynamic(proto)
    description["onnx"] = {"opset": ONNX_OPSET, "input": ONNX_INPUT, "output": ONNX_OUTPUT, "dynamic_axes": "B, H, W"}
    proto.metadata_props.add(key="hpc_drseg", value=json.dumps(description))
    return proto.SerializeToString()


def _check_dynamic(proto: Any) -> None:
    """The exporter must have left batch, height and width symbolic; a fixed one is a bug of this module or torch."""
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        fixed = [axis for axis in ONNX_DYNAMIC_AXES if not dims[axis].dim_param]
        if fixed:
            raise RuntimeError(f"ONNX export left axes {fixed} of {value.name!r} fixed; expected them dynamic")


def check_shapes(image_px: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """Two inputs that differ in batch, height and width: the training size, and a non-square larger one."""
    return [(1, 3, image_px, image_px), (2, 3, image_px + multiple, image_px + 2 * multiple)]


def compare_onnx(data: bytes, model: torch.nn.Module, cfg: RunConfig) -> list[OnnxCheck]:
    """ONNX Runtime (CPU) vs PyTorch logits on seeded random inputs of `check_shapes`."""
    import numpy as np
    import onnxruntime
    import torch

    from hpc_drseg.models import split_output

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    checks = []
    for shape in check_shapes(cfg.data.image_px, cfg.model.input_multiple):
        image = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected, _ = split_output(model.eval()(image))
        got = session.run([ONNX_OUTPUT], {ONNX_INPUT: image.numpy()})[0]
        same_shape = got.shape == tuple(expected.shape)
        diff = float(np.abs(got - expected.numpy()).max()) if same_shape else float("inf")
        checks.append(OnnxCheck(shape, diff))
    return checks


def _checked(data: bytes, loaded: LoadedCheckpoint, out: Path, check: bool, notes: list[str]) -> Optional[list]:
    if not check:
        notes.append("not checked against PyTorch (--no-check)")
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        notes.append(f"onnxruntime is not installed: not checked against PyTorch ({EXTRA_HINT})")
        return None
    checks = compare_onnx(data, loaded.model, loaded.config)
    if not all(c.max_abs_diff <= ONNX_TOLERANCE for c in checks):
        raise OnnxMismatchError(out, checks)
    return checks


def _check_record(checks: Optional[list[OnnxCheck]], notes: list[str]) -> dict[str, Any]:
    if checks is None:
        return {"checked": False, "why": "; ".join(notes)}
    return {
        "checked": True,
        "runtime": "onnxruntime CPUExecutionProvider",
        "tolerance": ONNX_TOLERANCE,
        "max_abs_diff": {"×".join(map(str, c.shape)): c.max_abs_diff for c in checks},
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

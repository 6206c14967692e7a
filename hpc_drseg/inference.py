"""Use a trained model from Python: `load_model(checkpoint)` and `Predictor(checkpoint).predict(image)`, which maps an
RGB photo of any size to float32 (4, H, W) lesion probabilities in LESIONS order at the photo's own size.

The input path is the one of training and the standard evaluation protocol (Jithesh et al., ICMLA 2025): resize to
the training side data.image_px (area averaging when shrinking), ImageNet normalisation, sigmoid of the logits, then
the probabilities (not the logits) upsampled bilinearly to the native size. `drseg predict` runs through Predictor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from hpc_drseg.config import RunConfig
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.normalize import normalize
from hpc_drseg.data.resize import resize_image
from hpc_drseg.errors import InputError
from hpc_drseg.models import split_output

# Images per forward pass of predict_many: at the paper's 512² a ResNet-50 batch of 4 needs ≈1 GB of activations.
DEFAULT_BATCH_SIZE = 4
EXPECTED_IMAGE = "an RGB uint8 numpy array of shape (H, W, 3)"


class LoadedCheckpoint(NamedTuple):
    """A run checkpoint made ready for inference: the model (eval mode, on its device), its config, the raw file."""

    model: torch.nn.Module
    config: RunConfig
    state: dict[str, Any]


# ------------------------------------------------------------------------------------------------------- model
def select_device(device: Optional[str | torch.device] = None) -> torch.device:
    """CUDA when available and not overridden; an explicit request for CUDA without it is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"device={device!r} is not a torch device; use cpu, cuda or cuda:N") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r} requested but CUDA is not available here; use device=cpu")
    return chosen


def load_checkpoint(checkpoint: str | Path, device: Optional[str | torch.device] = None) -> LoadedCheckpoint:
    """The model of a `drseg train` checkpoint, built from the checkpoint's own config, weights loaded strictly, in
    eval mode on `device` (default: CUDA if available). A file that is no run checkpoint, or whose weights do not fit
    its config, is one line naming it; the ImageNet file the config may name is never read."""
    from hpc_drseg.evaluate import load_model_weights  # the one loader of eval and predict (train/checkpoint.py checks)

    torch_device = select_device(device)
    model, cfg, state = load_model_weights(Path(checkpoint))
    return LoadedCheckpoint(model.to(torch_device).eval(), cfg, state)


def load_model(checkpoint: str | Path, device: Optional[str | torch.device] = None) -> torch.nn.Module:
    """The trained model of `checkpoint` in eval mode on `device`: (B, 3, H, W) normalised images → (B, 4, H, W)
    logits in LESIONS order, H and W multiples of its config's model.input_multiple."""
    return load_checkpoint(checkpoint, device).model


# ------------------------------------------------------------------------------------------------------ images
def check_image(image: Any, name: str = "image") -> np.ndarray:
    """`image` itself if it is an RGB uint8 (H, W, 3) array; else an InputError naming what it is and the fix."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: got a {type(image).__name__}; expected {EXPECTED_IMAGE} (np.asarray(pil_image))")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = "grey: np.repeat(image[..., None], 3, axis=2); RGBA: image[..., :3]; CHW: image.transpose(1, 2, 0)"
        raise InputError(f"{name}: got shape {image.shape}; expected (H, W, 3) RGB ({hint})")
    if image.dtype != np.uint8:
        raise InputError(
            f"{name}: got dtype {image.dtype}; expected uint8 0-255 of shape (H, W, 3) "
            "(from floats in [0, 1]: (image * 255).round().astype(np.uint8))"
        )
    if 0 in image.shape[:2]:
        raise InputError(f"{name}: got shape {image.shape}, an empty image; expected (H, W, 3) with H, W >= 1")
    return image


def preprocess(images: list[np.ndarray], image_px: int, device: torch.device) -> torch.Tensor:
    """RGB uint8 (H, W, 3) images of any sizes → (B, 3, image_px, image_px) float32 ImageNet-normalised on `device`,
    resized as the shards' images were (data/resize.py)."""
    resized = np.stack([resize_image(image, image_px) for image in images])  # (B, px, px, 3)
    batch = torch.from_numpy(resized).to(device).permute(0, 3, 1, 2)  # uint8 across the bus: 4× less to copy
    return normalize(batch)


def to_native_size(probs: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(4, px, px) probabilities → float32 (4, height, width) numpy, bilinear as the standard evaluation protocol."""
    native = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)
    return native.clamp_(0, 1)[0].cpu().numpy()


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


# --------------------------------------------------------------------------------------------------- predictor
class Predictor:
    """Lesion probabilities for RGB photos of any size with a trained checkpoint.

    >>> predictor = Predictor("runs/attention_deeplab/checkpoints/best.pt")
    >>> probs = predictor.predict(image)  # image: uint8 (H, W, 3) RGB → float32 (4, H, W), channels in LESIONS
    """

    lesions: tuple[str, ...] = LESIONS

    def __init__(
        self,
        checkpoint: str | Path,
        device: Optional[str | torch.device] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size: got {batch_size!r}; use a positive integer (default {DEFAULT_BATCH_SIZE})")
        self.checkpoint, self.device, self.batch_size = Path(checkpoint), select_device(device), batch_size
        self.model, self.config, _ = load_checkpoint(self.checkpoint, self.device)

    @property
    def image_px(self) -> int:
        """The side images are resized to before the model sees them (the training side, data.image_px)."""
        return self.config.data.image_px

    def predict(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) → float32 (4, H, W) probabilities in LESIONS order (MA, EX, SE, HE)."""
        return self._predict_batch([check_image(image)])[0]

    def predict_many(self, images: Iterable[np.ndarray]) -> list[np.ndarray]:
        """`predict` of each image, batch_size images per forward pass; images may differ in size."""
        results: list[np.ndarray] = []
        for chunk in _chunks(images, self.batch_size):
            start = len(results)
            checked = [check_image(image, f"images[{start + i}]") for i, image in enumerate(chunk)]
            results.extend(self._predict_batch(checked))
        return results

    @torch.no_grad()
    def _predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        logits, _ = split_output(self.model(preprocess(images, self.image_px, self.device)))
        probs = torch.sigmoid(logits.float())  # (B, 4, px, px)
        return [to_native_size(p, image.shape[0], image.shape[1]) for p, image in zip(probs, images)]

    def __repr__(self) -> str:
        return (
            f"Predictor({str(self.checkpoint)!r}, model={self.config.model.name}, image_px={self.image_px}, "
            f"device={self.device}, batch_size={self.batch_size})"
        )

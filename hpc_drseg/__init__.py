"""hpc_drseg: diabetic-retinopathy lesion segmentation (Attention-DeepLab, DeepLab-V3+, U-Net) on GPU clusters.

Importing the package is cheap: no torch, no accelerate. Heavy modules are imported by the commands that need them;
the inference API (`load_model`, `Predictor`, from hpc_drseg/inference.py) is imported on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from hpc_drseg.constants import LESIONS

if TYPE_CHECKING:
    from hpc_drseg.inference import Predictor, load_model

# albumentations phones home at import to check for updates; clusters and CI have no network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
__all__ = ["LESIONS", "Predictor", "__version__", "load_model"]
# Public names whose module imports torch: loaded by __getattr__ when first asked for, so `drseg --help` stays fast.
_LAZY = {"Predictor": "hpc_drseg.inference", "load_model": "hpc_drseg.inference"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hpc_drseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

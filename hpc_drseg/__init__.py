"""hpc_drseg: diabetic-retinopathy lesion segmentation (Attention-DeepLab, DeepLab-V3+, U-Net) on GPU clusters.

Importing the package is cheap: no torch, no accelerate. Heavy modules are imported by the commands that need them.
"""

import os

from hpc_drseg.constants import LESIONS

# albumentations phones home at import to check for updates; clusters and CI have no network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
__all__ = ["LESIONS", "__version__"]

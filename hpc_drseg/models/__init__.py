"""Architectures of the paper (Jithesh et al., ICMLA 2025): Attention-DeepLab, DeepLab-V3+ and U-Net, built from a
ModelConfig by `build_model`. Every model maps (B, 3, H, W) images to (B, 4, H, W) logits in LESIONS order
(`split_output` reads them, and the auxiliary head's, from what forward returns).
"""

from hpc_drseg.models.cbam import CBAM
from hpc_drseg.models.output import split_output
from hpc_drseg.models.registry import build_model, check_initialisation, check_input_size, describe_model

__all__ = ["CBAM", "build_model", "check_initialisation", "check_input_size", "describe_model", "split_output"]

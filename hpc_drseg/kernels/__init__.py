"""Fused kernels (Triton) behind the model code: `cbam_triton` (CBAM of Woo et al. 2018, forward and backward) and
`bench` (its GPU benchmark). Nothing is imported here: models/cbam.py loads `cbam_triton` only when impl="triton" runs,
so importing the package never needs Triton.
"""

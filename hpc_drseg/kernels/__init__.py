"""Fused kernels (Triton) behind the model code: `cbam_triton` (CBAM of Woo et al. 2018 as one op, forward and
backward; kernels in `cbam_fwd` / `cbam_bwd`, launches in `cbam_launch`) and `bench` (`drseg bench cbam`). Nothing is
imported here: models/cbam.py loads `cbam_triton` only when impl="triton" runs, so importing the package never needs
Triton.
"""

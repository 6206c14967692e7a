"""The fused CombinedLoss against the frozen pre-fusion implementation (reference_losses.py) for every configuration
the config allows: each term on/off, pos_weight unset/set, aux head absent/present, fp32 and bf16 autocast; forward
values, every log and the gradients w.r.t. the logits of both heads.

Tolerances: the fused loss computes BCE as −logsigmoid(±logit) and (1 − p_t)^γ from log p_t − z, where the reference
calls binary_cross_entropy_with_logits and logsigmoid(−z): the same math, rounded differently (a few fp32 ulps per
pixel). Values and fp32 gradients agree to 2e-6 relative. bf16 logits: the fused loss casts them to fp32 once, so their
gradient is the fp32 gradient rounded to bf16 once (checked exactly); the reference casts them once per term and sums
four bf16-rounded gradients in bf16, so the two agree to 2^-6 (two bf16 steps) relative, 2^-7 of the largest.
"""

from __future__ import annotations

import collections
import itertools

import pytest
import reference_losses
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hpc_drseg.config import LossConfig, LossWeights
from hpc_drseg.losses import build_loss

VALUE_TOL = {"rtol": 2e-6, "atol": 1e-7}
GRAD_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2**-6}
PAPER_WEIGHTS = {"dice": 1.0, "bce": 0.5, "focal": 1.0, "boundary": 0.5}
PAPER_POS_WEIGHT = [4.0, 1.0, 1.5, 2.0]


def term_ids(on: tuple[bool, ...]) -> str:
    return "".join("01"[b] for b in on)  # dice, bce, focal, boundary: 1 = on


def weights_on(mask: tuple[bool, ...]) -> LossWeights:
    return LossWeights(**{name: PAPER_WEIGHTS[name] if on else 0.0 for name, on in zip(PAPER_WEIGHTS, mask)})


def make_batch(mask_dtype: torch.dtype = torch.uint8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, aux logits at half resolution, mask): spread and extreme logits; per channel single border pixels,
    blobs, an empty mask, an all-lesion image."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 4, 12, 12, generator=gen) * 4
    logits[0, :, 0, :4] = torch.tensor([100.0, -100.0, 30.0, -30.0])
    aux = torch.randn(2, 4, 6, 6, generator=gen) * 3
    mask = torch.zeros(2, 4, 12, 12)
    mask[:, 0, 0, 0] = mask[:, 0, 5, 11] = mask[1, 0, 7, 3] = 1  # microaneurysm-like single pixels, two on the border
    mask[:, 1] = (torch.rand(2, 12, 12, generator=gen) < 0.3).float()
    mask[0, 3], mask[1, 3, 4:9, 2:10] = 1, 1  # channel 2 stays empty
    if mask_dtype == torch.uint8:
        return logits, aux, (mask * 255).to(torch.uint8)  # 0/255 masks, as read from DDR files
    return logits, aux, mask.to(mask_dtype)


def run(loss, logits, aux, mask, dtype: torch.dtype, with_aux: bool) -> tuple[dict, list[torch.Tensor]]:
    """Logs (incl. per lesion) and the gradients of `total` w.r.t. the logits; bf16 logits come from bf16 autocast."""
    leaves = [t.to(dtype).requires_grad_() for t in (logits, aux)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        total, logs = loss(leaves[0], mask, leaves[1] if with_aux else None, per_lesion=True)
    total.backward()
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in logs.values())
    return {**logs, "_total": total.detach()}, [leaf.grad for leaf in leaves[: 1 + with_aux]]


def assert_parity(cfg: LossConfig, dtype: torch.dtype, with_aux: bool, mask_dtype: torch.dtype = torch.uint8):
    logits, aux, mask = make_batch(mask_dtype)
    logs, grads = run(build_loss(cfg), logits, aux, mask, dtype, with_aux)
    ref_logs, ref_grads = run(reference_losses.build_loss(cfg), logits, aux, mask, dtype, with_aux)
    assert logs.keys() == ref_logs.keys()
    for key in logs:
        torch.testing.assert_close(logs[key], ref_logs[key], **VALUE_TOL, msg=lambda m, k=key: f"{k}: {m}")
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == dtype  # all zero when every weight is 0: then they must be exactly equal
        scale = ref.abs().max().item()
        torch.testing.assert_close(grad, ref, rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * 0.5 * scale)
    if dtype == torch.bfloat16:  # one rounding: the fp32 gradient of the same (bf16-valued) logits, rounded to bf16
        _, fp32_grads = run(build_loss(cfg), logits.bfloat16(), aux.bfloat16(), mask, torch.float32, with_aux)
        for grad, fp32_grad in zip(grads, fp32_grads):
            assert torch.equal(grad, fp32_grad.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_aux", [False, True], ids=["main", "aux"])
@pytest.mark.parametrize("pos_weight", [None, PAPER_POS_WEIGHT], ids=["no_pw", "pw"])
@pytest.mark.parametrize("terms_on", list(itertools.product((False, True), repeat=4)), ids=term_ids)
def test_every_term_combination_matches_the_reference(terms_on, pos_weight, with_aux, dtype):
    assert_parity(LossConfig(weights=weights_on(terms_on), pos_weight=pos_weight), dtype, with_aux)


OTHER_SETTINGS = {
    "edge_emphasis": {"boundary_mode": "edge_emphasis"},
    "gamma0_alpha_half": {"focal_gamma": 0.0, "focal_alpha": 0.5},
    "gamma_half": {"focal_gamma": 0.5},
    "gamma10_alpha1": {"focal_gamma": 10.0, "focal_alpha": 1.0},
    "alpha0": {"focal_alpha": 0.0},
    "theta0": {"boundary_theta": 0.0},
    "theta100_edge": {"boundary_theta": 100.0, "boundary_mode": "edge_emphasis"},
    "dice_eps1": {"dice_eps": 1.0},
    "dice_eps_tiny": {"dice_eps": 1e-12},
    "aux_weight_big": {"aux_weight": 1e3},
    "pw_extremes": {"pos_weight": [0.0, 1e6, 2.5, 1.0]},
    "odd_weights": {"weights": LossWeights(dice=0.3, bce=2.0, focal=7.0, boundary=1e-3)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("setting", list(OTHER_SETTINGS))
def test_other_settings_match_the_reference(setting, dtype):
    assert_parity(LossConfig(**OTHER_SETTINGS[setting]), dtype, with_aux=True)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_mask_dtypes_match_the_reference(mask_dtype):
    assert_parity(LossConfig(pos_weight=PAPER_POS_WEIGHT), torch.float32, with_aux=True, mask_dtype=mask_dtype)


class _FullSizeOps(TorchDispatchMode):
    """Counts operators that read or write a tensor of at least `numel` elements, views excluded."""

    VIEWS = {"detach", "view", "unsqueeze", "expand", "select", "t", "alias", "_unsafe_view", "slice", "unbind"}

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        if name not in self.VIEWS and max((t.numel() for t in tensors), default=0) >= self.numel:
            self.ops[name] += 1
        return out


def test_fewer_full_size_operators_than_the_reference():
    """The point of the fusion: forward + backward touch full-size maps far less often (measured 44 against 68)."""
    logits, _, mask = make_batch()
    counts = {}
    losses = {"fused": build_loss(LossConfig()), "reference": reference_losses.build_loss(LossConfig())}
    for name, loss in losses.items():
        with _FullSizeOps(logits.numel()) as mode:
            total, _ = loss(logits.clone().requires_grad_(), mask)
            total.backward()
        counts[name] = sum(mode.ops.values())
    assert counts["fused"] <= 0.7 * counts["reference"], counts

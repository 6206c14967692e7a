"""Tables of tiny hand-checked cases for the loss terms of hpc_drseg.losses (paper eq. 1-6), one function per term.

Expected values are written with plain math (sigmoid(ln 3) = 0.75, sigmoid(0) = 0.5), never with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hpc_drseg.constants import LESIONS
from hpc_drseg.losses import (
    bce_loss,
    boundary_loss,
    boundary_weight,
    dice_loss,
    focal_loss,
    mask_gradient_magnitude,
)

EPS = 1e-6
LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(−ln 3) = 0.25
THETA = 1.5


def grid(*channels: list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Four H×W channel tables → (1, 4, H, W)."""
    assert len(channels) == len(LESIONS)
    return torch.tensor([channels], dtype=dtype)


def same4(table: list[list[float]]) -> torch.Tensor:
    return grid(table, table, table, table)


def close(actual: torch.Tensor, expected: list[float], rel: float = 1e-5, abs_: float = 1e-6) -> None:
    assert actual.dtype == torch.float32
    assert actual.tolist() == pytest.approx(expected, rel=rel, abs=abs_)


# ------------------------------------------------------------------------------------------------------------ Dice
def test_dice_table_per_channel():
    # MA perfect single pixel, EX totally wrong, SE empty mask with p = 0.5, HE all-lesion with p = 0.5.
    target = grid([[1, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]])
    logits = grid([[100, -100], [-100, -100]], [[-100, 100], [100, 100]], [[0, 0], [0, 0]], [[0, 0], [0, 0]])
    expected = [
        1 - (2 * 1 + EPS) / (1 + 1 + EPS),  # ≈ 0
        1 - EPS / (3 + 1 + EPS),  # ≈ 1
        1 - EPS / (2 + 0 + EPS),  # an empty mask scores ≈ 1 unless every p ≈ 0
        1 - (2 * 2 + EPS) / (2 + 4 + EPS),  # = 1/3
    ]
    close(dice_loss(logits, target), expected)
    assert expected[0] == pytest.approx(0, abs=1e-6) and expected[1] == pytest.approx(1, abs=1e-6)


def test_dice_soft_probabilities_and_empty_mask_predicted_empty():
    # p = 0.75, 0.25, 0.5, 0.5 against a single-pixel lesion: Σpy = 0.75, Σp = 2, Σy = 1.
    soft = [[LN3, -LN3], [0, 0]]
    empty_right = [[-100, -100], [-100, -100]]  # Σp ≈ 1.5e-43: (0 + ε) / (0 + ε) → loss 0
    target = grid([[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]])
    logits = grid(soft, empty_right, soft, soft)
    expected = [1 - (1.5 + EPS) / (3 + EPS), 0.0, 1 - (1.5 + EPS) / (3 + EPS), 1 - EPS / (2 + EPS)]
    close(dice_loss(logits, target), expected)


def test_dice_sums_over_the_whole_batch():
    # Image 0: empty mask, p = 0.5 everywhere; image 1: all-lesion, predicted perfectly.
    target = torch.zeros(2, 4, 2, 2)
    target[1] = 1
    logits = torch.zeros(2, 4, 2, 2)
    logits[1] = 100
    # Σpy = 4, Σp = 2 + 4, Σy = 4 → 1 − 8/10 = 0.2 (a per-image mean would give (1 + 0) / 2 = 0.5).
    close(dice_loss(logits, target), [1 - (8 + EPS) / (10 + EPS)] * 4)


# ------------------------------------------------------------------------------------------------------------- BCE
def test_bce_table():
    target = same4([[1, 0], [0, 0]])
    logits = same4([[LN3, LN3], [0, -LN3]])
    # −ln 0.75, −ln(1 − 0.75), −ln 0.5, −ln(1 − 0.25)
    per_pixel = [math.log(4 / 3), math.log(4), math.log(2), math.log(4 / 3)]
    close(bce_loss(logits, target), [sum(per_pixel) / 4] * 4)


def test_bce_empty_and_all_lesion_masks():
    target = grid([[0, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 0]], [[1, 1], [1, 1]])
    logits = grid([[0, 0], [0, 0]], [[0, 0], [0, 0]], [[-LN3] * 2] * 2, [[LN3] * 2] * 2)
    close(bce_loss(logits, target), [math.log(2), math.log(2), math.log(4 / 3), math.log(4 / 3)])


def test_bce_pos_weight_multiplies_lesion_pixels_only():
    target = same4([[1, 0], [0, 0]])
    logits = same4([[LN3, LN3], [0, -LN3]])
    background = math.log(4) + math.log(2) + math.log(4 / 3)
    expected = [(w * math.log(4 / 3) + background) / 4 for w in (4, 1, 1.5, 2)]
    close(bce_loss(logits, target, pos_weight=[4, 1, 1.5, 2]), expected)


def test_bce_equals_torch_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, 6, generator=gen) * 4
    target = (torch.rand(3, 4, 5, 6, generator=gen) < 0.3).float()
    pw = torch.tensor([4.0, 1.0, 1.5, 2.0])
    for pos_weight in (None, pw):
        ref = [
            F.binary_cross_entropy_with_logits(
                logits[:, c], target[:, c], pos_weight=None if pos_weight is None else pos_weight[c]
            ).item()
            for c in range(4)
        ]
        close(bce_loss(logits, target, pos_weight=pos_weight), ref)


# ----------------------------------------------------------------------------------------------------------- focal
def test_focal_table_alpha_quarter_gamma_two():
    target = same4([[1, 0], [0, 0]])
    logits = same4([[LN3, LN3], [0, -LN3]])
    per_pixel = [
        0.25 * 0.25**2 * math.log(4 / 3),  # lesion, p_t = 0.75
        0.75 * 0.75**2 * math.log(4),  # background, p = 0.75 → p_t = 0.25
        0.75 * 0.5**2 * math.log(2),  # background, p_t = 0.5
        0.75 * 0.25**2 * math.log(4 / 3),  # background, p_t = 0.75
    ]
    close(focal_loss(logits, target), [sum(per_pixel) / 4] * 4)


def test_focal_empty_all_lesion_and_single_pixel():
    target = grid([[0, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 1]], [[1, 1], [1, 1]])
    logits = grid([[0, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, LN3]], [[-LN3] * 2] * 2)
    expected = [
        0.75 * 0.25 * math.log(2),
        0.25 * 0.25 * math.log(2),
        (3 * 0.75 * 0.25 * math.log(2) + 0.25 * 0.0625 * math.log(4 / 3)) / 4,
        0.25 * 0.75**2 * math.log(4),  # lesion predicted p = 0.25
    ]
    close(focal_loss(logits, target), expected)


def test_focal_gamma_zero_is_alpha_weighted_bce():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 4, 4, generator=gen) * 3
    target = (torch.rand(2, 4, 4, 4, generator=gen) < 0.4).float()
    for alpha in (0.25, 0.5, 0.9):
        alpha_t = alpha * target + (1 - alpha) * (1 - target)
        ref = (alpha_t * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).mean(dim=(0, 2, 3))
        close(focal_loss(logits, target, alpha=alpha, gamma=0.0), ref.tolist())


def test_focal_stable_at_extreme_logits():
    target = same4([[1, 1], [0, 0]])
    logits = same4([[100, -100], [100, -100]]).requires_grad_()
    loss = focal_loss(logits, target)
    # right & confident → 0; wrong & confident → α_t·100 (lesion α = .25, background .75): (0 + 25 + 75 + 0) / 4
    close(loss, [25.0] * 4, rel=1e-6)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # d/dx of −α_t·log σ(±x) at a confidently wrong pixel is ∓α_t / 4 pixels.
    assert logits.grad[0, 0].flatten().tolist() == pytest.approx([0, -0.25 / 4, 0.75 / 4, 0], abs=1e-6)


# -------------------------------------------------------------------------------------------------------- boundary
S2 = math.sqrt(2 + EPS)  # Sobel magnitude diagonal to a single lesion pixel
S4 = math.sqrt(4 + EPS)  # ... beside it (|±2|)
FLAT = math.sqrt(EPS)  # = 1e-3: no gradient


def test_sobel_magnitude_single_pixel_lesion_centre_and_corner():
    centre = [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    corner = [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    empty = [[0, 0, 0]] * 3
    full = [[1, 1, 1]] * 3
    mag = mask_gradient_magnitude(grid(centre, corner, empty, full, dtype=torch.uint8))
    assert mag.shape == (1, 4, 3, 3) and mag.dtype == torch.float32
    # Sobel's centre tap is 0, so the lesion pixel itself has no gradient; its ring has 2 (sides) and √2 (diagonals).
    close(mag[0, 0].flatten(), [S2, S4, S2, S4, FLAT, S4, S2, S4, S2])
    close(mag[0, 1].flatten(), [FLAT, S4, FLAT, S4, S2, FLAT, FLAT, FLAT, FLAT])
    close(mag[0, 2].flatten(), [FLAT] * 9)
    # Zero padding: an all-lesion mask has edges on the image border (corner 3+3 → √18, side 1+2+1 → 4).
    s18, s16 = math.sqrt(18 + EPS), math.sqrt(16 + EPS)
    close(mag[0, 3].flatten(), [s18, s16, s18, s16, FLAT, s16, s18, s16, s18])


def test_boundary_empty_mask_is_bce_times_flat_weight():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 5, 5, generator=gen) * 3
    target = torch.zeros(2, 4, 5, 5)
    flat_weight = math.exp(-THETA * 1e-3)  # ≈ 0.9985
    bce = bce_loss(logits, target)
    close(boundary_loss(logits, target), (bce * flat_weight).tolist())
    close(boundary_loss(logits, target), bce.tolist(), rel=2e-3)
    close(boundary_loss(logits, target, mode="edge_emphasis"), (bce * (2 - flat_weight)).tolist())


def test_boundary_single_pixel_lesion_hand_value():
    target = same4([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    logits = torch.zeros(1, 4, 3, 3)  # per-pixel BCE = ln 2 everywhere
    w = {d: math.exp(-THETA * d) for d in (FLAT, S4, S2)}
    paper = math.log(2) * (w[FLAT] + 4 * w[S4] + 4 * w[S2]) / 9
    emphasis = math.log(2) * ((2 - w[FLAT]) + 4 * (2 - w[S4]) + 4 * (2 - w[S2])) / 9
    close(boundary_loss(logits, target), [paper] * 4)
    close(boundary_loss(logits, target, mode="edge_emphasis"), [emphasis] * 4)


def test_boundary_modes_weight_edges_in_opposite_directions():
    table = [[0.0] * 7 for _ in range(7)]
    for r in range(2, 5):
        for c in range(2, 5):
            table[r][c] = 1.0  # a 3×3 lesion in the middle of a 7×7 image
    target = same4(table)
    background, interior, edge = (0, 0), (3, 3), (2, 3)
    paper = boundary_weight(target, THETA, "paper")[0, 0]
    emphasis = boundary_weight(target, THETA, "edge_emphasis")[0, 0]
    assert paper[interior].item() == pytest.approx(paper[background].item()) == pytest.approx(math.exp(-THETA * FLAT))
    assert paper[edge] < 0.1 * paper[interior]  # eq. (5) as printed: edges nearly ignored
    assert emphasis[edge] > 1.9 and emphasis[interior] == pytest.approx(2 - math.exp(-THETA * FLAT))
    assert emphasis.max() < 2.0 and emphasis.min() >= 1.0
    # The same mistake costs less on an edge pixel than inside the lesion in paper mode, more in edge_emphasis mode.
    wrong_at = {}
    for name, (r, c) in {"edge": edge, "interior": interior}.items():
        logits = (target * 2 - 1) * 10
        logits[:, :, r, c] = -10.0
        wrong_at[name] = [boundary_loss(logits, target, mode=m)[0].item() for m in ("paper", "edge_emphasis")]
    assert wrong_at["edge"][0] < wrong_at["interior"][0] and wrong_at["edge"][1] > wrong_at["interior"][1]


def test_boundary_rejects_unknown_mode():
    with pytest.raises(ValueError, match="boundary_mode"):
        boundary_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), mode="edges")


# ----------------------------------------------------------------------------------------------- masks, pos_weight
def test_any_positive_mask_value_is_lesion_for_every_dtype():
    binary = grid([[1, 0, 0], [0, 0, 0], [0, 0, 1]], [[0] * 3] * 3, [[1] * 3] * 3, [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    logits = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(9)) * 3
    variants = (binary.bool(), binary.to(torch.uint8) * 255, binary * 255, binary * 0.5, binary.to(torch.int64))
    for fn in (dice_loss, bce_loss, focal_loss, boundary_loss):
        for variant in variants:
            assert torch.equal(fn(logits, variant), fn(logits, binary)), (fn.__name__, variant.dtype)


def test_pos_weight_values_are_checked_for_lists_and_sizes_for_tensors():
    logits, target = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    for bad in ([1.0, -1.0, 1.0, 1.0], [float("nan")] * 4):
        with pytest.raises(ValueError, match="non-negative"):
            bce_loss(logits, target, pos_weight=bad)
    with pytest.raises(ValueError, match="got 3 values"):
        bce_loss(logits, target, pos_weight=torch.ones(3))
    assert torch.equal(bce_loss(logits, target, pos_weight=torch.full((4,), 2.0)), bce_loss(logits, target))

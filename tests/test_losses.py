"""Tables of tiny hand-checked cases for hpc_drseg.losses (paper eq. 1-6), plus autocast, gradient and aux checks.

Expected values are written with plain math (sigmoid(ln 3) = 0.75, sigmoid(0) = 0.5), never with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hpc_drseg.config import LossConfig, LossWeights
from hpc_drseg.constants import LESIONS
from hpc_drseg.losses import (
    CombinedLoss,
    bce_loss,
    boundary_loss,
    boundary_weight,
    build_loss,
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


# --------------------------------------------------------------------------------------------------- combined loss
def make_case(seed: int = 3, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, size, size, generator=gen) * 2
    target = (torch.rand(2, 4, size, size, generator=gen) < 0.2).to(torch.uint8)
    return logits, target


def test_build_loss_defaults_are_the_papers():
    loss = build_loss(LossConfig())
    assert loss.weights == {"dice": 1.0, "bce": 0.5, "focal": 1.0, "boundary": 0.5}
    assert (loss.focal_alpha, loss.focal_gamma, loss.boundary_theta) == (0.25, 2.0, 1.5)
    assert loss.boundary_mode == "paper" and loss.pos_weight is None and loss.aux_weight == 0.4


def test_combined_loss_without_arguments_is_the_config_default():
    """CombinedLoss() takes the paper's weights and constants from LossConfig(): the same loss as build_loss."""
    plain, built = CombinedLoss(), build_loss(LossConfig())
    assert plain.weights == built.weights == {"dice": 1.0, "bce": 0.5, "focal": 1.0, "boundary": 0.5}
    attrs = ("focal_alpha", "focal_gamma", "boundary_theta", "boundary_mode", "dice_eps", "aux_weight")
    assert {a: getattr(plain, a) for a in attrs} == {a: getattr(built, a) for a in attrs}
    assert plain.pos_weight is None and built.pos_weight is None
    gen = torch.Generator().manual_seed(11)
    logits, aux = torch.randn(3, 4, 16, 16, generator=gen) * 3, torch.randn(3, 4, 8, 8, generator=gen)
    target = (torch.rand(3, 4, 16, 16, generator=gen) < 0.1).to(torch.uint8)
    total, logs = plain(logits, target, aux_logits=aux, per_lesion=True)
    ref_total, ref_logs = built(logits, target, aux_logits=aux, per_lesion=True)
    assert total.item() == ref_total.item() and logs.keys() == ref_logs.keys()
    assert all(torch.equal(logs[k], ref_logs[k]) for k in logs)


def test_total_is_weighted_sum_of_channel_means():
    logits, target = make_case()
    total, logs = build_loss(LossConfig())(logits, target)
    terms = {
        "dice": dice_loss(logits, target).mean().item(),
        "bce": bce_loss(logits, target).mean().item(),
        "focal": focal_loss(logits, target).mean().item(),
        "boundary": boundary_loss(logits, target).mean().item(),
    }
    expected = 1.0 * terms["dice"] + 0.5 * terms["bce"] + 1.0 * terms["focal"] + 0.5 * terms["boundary"]
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert set(logs) == {"dice", "bce", "focal", "boundary", "total"}
    for name, value in terms.items():
        assert logs[name].item() == pytest.approx(value, rel=1e-6)
    assert logs["total"].item() == pytest.approx(expected, rel=1e-6) and not logs["total"].requires_grad


def test_custom_weights_and_per_lesion_logs():
    logits, target = make_case()
    cfg = LossConfig(weights=LossWeights(dice=0.0, bce=2.0, focal=0.0, boundary=0.0))
    total, logs = build_loss(cfg)(logits, target, per_lesion=True)
    assert total.item() == pytest.approx(2 * bce_loss(logits, target).mean().item(), rel=1e-6)
    per_channel = dice_loss(logits, target)
    for i, lesion in enumerate(LESIONS):
        assert logs[f"dice/{lesion}"].item() == pytest.approx(per_channel[i].item(), rel=1e-6)
    assert len(logs) == 4 + 1 + 4 * len(LESIONS)


def test_pos_weight_changes_only_bce():
    logits, target = make_case()
    _, plain = build_loss(LossConfig())(logits, target)
    _, weighted = build_loss(LossConfig(pos_weight=[4.0, 1.0, 1.5, 2.0]))(logits, target)
    for name in ("dice", "focal", "boundary"):
        assert weighted[name].item() == pytest.approx(plain[name].item(), rel=1e-6)
    assert weighted["bce"].item() > plain["bce"].item()


def test_target_dtypes_agree():
    logits, target = make_case()
    loss = build_loss(LossConfig())
    ref, _ = loss(logits, target.float())
    for variant in (target, target.bool(), target * 255):
        assert loss(logits, variant)[0].item() == pytest.approx(ref.item(), rel=1e-6)


def test_gradients_reach_logits():
    logits, target = make_case()
    logits.requires_grad_()
    total, _ = build_loss(LossConfig())(logits, target)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bf16_autocast_gives_fp32_finite_loss():
    torch.manual_seed(0)
    producer = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    image = torch.randn(2, 3, 16, 16)
    _, target = make_case(size=16)
    loss = build_loss(LossConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux_logits = producer(image), producer(image[:, :, ::2, ::2])
        total, logs = loss(logits, target, aux_logits=aux_logits)
    assert logits.dtype == torch.bfloat16
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in logs.values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in producer.parameters())
    # Autocast must not reach inside the loss: same result as fp32 outside autocast on the same bf16 logits.
    ref, _ = loss(logits.detach().float(), target, aux_logits=aux_logits.detach().float())
    assert total.item() == pytest.approx(ref.item(), rel=1e-6)


def test_aux_adds_weighted_loss_of_upsampled_logits():
    logits, target = make_case(size=8)
    aux_small = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    loss = build_loss(LossConfig(aux_weight=0.4))
    main, _ = loss(logits, target)
    upsampled = F.interpolate(aux_small, size=(8, 8), mode="bilinear", align_corners=False)
    aux_alone, _ = loss(upsampled, target)
    total, logs = loss(logits, target, aux_logits=aux_small)
    assert logs["aux"].item() == pytest.approx(aux_alone.item(), rel=1e-6)
    assert total.item() == pytest.approx(main.item() + 0.4 * aux_alone.item(), rel=1e-6)
    assert logs["total"].item() == pytest.approx(total.item())
    same_size, _ = loss(logits, target, aux_logits=upsampled)
    assert same_size.item() == pytest.approx(total.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "logits_shape, target_shape",
    [((1, 4, 4, 4), (1, 4, 4, 5)), ((1, 3, 4, 4), (1, 3, 4, 4)), ((4, 4, 4), (4, 4, 4))],
)
def test_shape_errors_name_both_shapes(logits_shape, target_shape):
    for fn in (dice_loss, bce_loss, focal_loss, boundary_loss, build_loss(LossConfig())):
        with pytest.raises(ValueError) as err:
            fn(torch.zeros(logits_shape), torch.zeros(target_shape))
        assert str(tuple(logits_shape)) in str(err.value) and str(tuple(target_shape)) in str(err.value)


def test_pos_weight_length_and_weight_keys_are_checked():
    with pytest.raises(ValueError, match="pos_weight"):
        bce_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), pos_weight=[1.0, 2.0, 3.0])
    weights = {"dice": 1.0, "bce": 0.5, "focal": 1.0, "boundary": 0.5}
    with pytest.raises(ValueError, match="pos_weight"):
        CombinedLoss(weights, pos_weight=[1.0] * 5)
    with pytest.raises(ValueError, match="loss.weights"):
        CombinedLoss({**weights, "dcie": 1.0})
    with pytest.raises(ValueError, match="aux_logits"):
        CombinedLoss(weights)(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), aux_logits=torch.zeros(1, 3, 2, 2))

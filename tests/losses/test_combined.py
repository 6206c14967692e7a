"""The combined loss of hpc_drseg.losses (paper eq. 1): weights, logs, aux head, autocast, validation, and what the
training step needs from it: mask maps once per batch without autograd, buffers, one torch.compile graph."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hpc_drseg.config import LossConfig, LossWeights
from hpc_drseg.constants import LESIONS
from hpc_drseg.losses import (
    CombinedLoss,
    bce_loss,
    boundary_loss,
    build_loss,
    dice_loss,
    focal_loss,
)


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


# ---------------------------------------------------------------------------------------------- the training step
def test_pos_weight_is_validated_once_and_held_as_a_buffer():
    for bad in ([1.0, -0.5, 1.0, 1.0], [1.0, float("nan"), 1.0, 1.0], [float("inf")] * 4, [1.0] * 3):
        with pytest.raises(ValueError, match=r"loss.pos_weight: got .*non-negative values"):
            CombinedLoss(pos_weight=bad)
    loss = CombinedLoss(pos_weight=[4, 1, 1.5, 2])
    buffers = dict(loss.named_buffers())
    assert buffers["pos_weight"].tolist() == [4.0, 1.0, 1.5, 2.0] and buffers["pos_weight"].dtype == torch.float32
    sobel_x = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
    assert buffers["sobel_kernels"].shape == (8, 1, 3, 3) and buffers["sobel_kernels"][0, 0].tolist() == sobel_x
    assert torch.equal(buffers["sobel_kernels"][1, 0], buffers["sobel_kernels"][0, 0].t())  # then y, per channel
    assert loss.state_dict() == {}  # not persistent: a checkpoint of the loss carries no config
    assert set(dict(CombinedLoss().named_buffers())) == {"sobel_kernels"}


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_mask_maps_are_built_once_per_batch_without_autograd():
    logits, target = make_case(size=8)
    aux = torch.randn(2, 4, 4, 4, requires_grad=True)
    loss = build_loss(LossConfig(pos_weight=[4.0, 1.0, 1.5, 2.0]))
    with _OpCounter() as counter:
        loss(logits.requires_grad_(), target, aux_logits=aux)
    # One Sobel conv, one threshold and one cast of the mask for both heads (the reference: 2, 8 and 8).
    assert (counter.ops["convolution"], counter.ops["gt"], counter.ops["_to_copy"]) == (1, 1, 1)
    maps = loss.mask_maps(target.float().requires_grad_())  # even a mask that asks for gradients gets none
    assert all(t.grad_fn is None and not t.requires_grad for t in maps)
    assert maps.mask.dtype == torch.float32 and maps.mask_sum.shape == (4,)


def test_compiles_to_one_graph_with_the_eager_values_and_gradients():
    """fullgraph=True fails on any graph break; aot_eager also traces the backward (no C++ compile: ~3 s)."""
    torch._dynamo.reset()
    loss = build_loss(LossConfig(pos_weight=[4.0, 1.0, 1.5, 2.0]))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    logits, target = make_case(size=8)
    aux = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    results = []
    for fn in (loss, compiled):
        leaves = [logits.clone().requires_grad_(), aux.clone().requires_grad_()]
        total, logs = fn(leaves[0], target, aux_logits=leaves[1], per_lesion=True)
        total.backward()
        results.append((logs, [leaf.grad for leaf in leaves]))
    (logs, grads), (compiled_logs, compiled_grads) = results
    assert logs.keys() == compiled_logs.keys()
    for key in logs:
        torch.testing.assert_close(compiled_logs[key], logs[key], rtol=1e-6, atol=1e-7)
    for grad, compiled_grad in zip(grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, grad, rtol=1e-6, atol=1e-9)

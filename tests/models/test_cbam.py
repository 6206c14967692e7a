"""CBAM against a reference written here from the definition (Woo et al. 2018, paper-code semantics): forward and
gradients, fp32 and bf16, NCHW and channels_last; the module's composed eager path against `cbam_eager`; compile
parity; state_dict identical across impls; triton fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from hpc_drseg.config.choices import CBAM_IMPLS
from hpc_drseg.models import CBAM
from hpc_drseg.models import cbam as cbam_module
from hpc_drseg.models.cbam import cbam_eager, cbam_forward


def reference_cbam(x, w1, w2, ws):
    """Definition, in float64, written independently of the package: MLP by einsum, pooling by sums and amax.

    amax, not max(dim).values: at ties (common with bf16 inputs) amax splits the gradient evenly between the tied
    entries, max(dim) gives it all to one of them; both are valid subgradients, the package uses amax.
    """
    x, w1, w2, ws = (t.double() for t in (x, w1, w2, ws))
    w1, w2 = w1[:, :, 0, 0], w2[:, :, 0, 0]  # (hidden, C), (C, hidden)

    def mlp(v):  # v: (B, C)
        return torch.einsum("ch,bh->bc", w2, torch.relu(torch.einsum("hc,bc->bh", w1, v)))

    avg = x.sum((2, 3)) / (x.shape[2] * x.shape[3])
    mx = x.flatten(2).amax(2)
    x = x * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
    stats = torch.stack([x.sum(1) / x.shape[1], x.amax(1)], dim=1)
    k = ws.shape[-1]
    return x * torch.sigmoid(F.conv2d(stats, ws, padding=k // 2))


def make_inputs(channels=32, reduction=16, k=7, shape=(2, 9, 11), seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, w = shape
    hidden = max(1, channels // reduction)
    x = torch.randn(b, channels, h, w, generator=gen)
    w1 = torch.randn(hidden, channels, 1, 1, generator=gen) * 0.3
    w2 = torch.randn(channels, hidden, 1, 1, generator=gen) * 0.3
    ws = torch.randn(1, 2, k, k, generator=gen) * 0.2
    return x, w1, w2, ws


def grads(fn, inputs, upstream):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, upstream.to(out.dtype))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels,reduction,k", [(32, 16, 7), (48, 16, 7), (8, 16, 3)])  # 8 → hidden max(1, 0) = 1
def test_eager_matches_reference_fp32(channels_last, channels, reduction, k):
    x, w1, w2, ws = make_inputs(channels, reduction, k)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape)
    out, g = grads(lambda *a: cbam_forward(*a, impl="eager"), (x, w1, w2, ws), upstream)
    ref, g_ref = grads(reference_cbam, (x, w1, w2, ws), upstream)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "w_fc1", "w_fc2", "w_spatial"), g, g_ref):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_half_precision_close_to_reference(channels_last, dtype, tol):
    """Half-precision in and out, fp32 inside: errors are the final rounding (≈0.2 % for bf16), forward and backward."""
    x, w1, w2, ws = make_inputs(64)
    inputs = [t.to(dtype) for t in (x, w1, w2, ws)]
    if channels_last:
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, g = grads(lambda *a: cbam_forward(*a, impl="eager"), inputs, upstream)
    ref, g_ref = grads(reference_cbam, [t.double() for t in inputs], upstream.double())
    assert out.dtype == dtype
    assert relative_error(out, ref) < tol
    for name, a, b in zip(("x", "w_fc1", "w_fc2", "w_spatial"), g, g_ref):
        assert a.dtype == dtype
        assert relative_error(a, b) < tol, name


def test_autocast_bf16_module():
    module = CBAM(32)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
        out_bf16 = module(x.bfloat16())
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16  # x's dtype out, whatever autocast says
    ref = reference_cbam(x, module.channel.fc1.weight, module.channel.fc2.weight, module.spatial.conv.weight)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_bf16.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out_bf16.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_module_shapes_and_paper_constants():
    module = CBAM(48)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    # 48 // 16 = 3 hidden units, no biases anywhere, 7×7 conv 2 → 1 without BN
    assert shapes == {
        "channel.fc1.weight": (3, 48, 1, 1),
        "channel.fc2.weight": (48, 3, 1, 1),
        "spatial.conv.weight": (1, 2, 7, 7),
    }
    x = torch.randn(1, 48, 5, 5)
    ref = reference_cbam(x, *[p.detach() for p in module.parameters()])
    torch.testing.assert_close(module(x), ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_eager_composes_submodules_and_matches_cbam_eager(channels_last, x_dtype, module_dtype):
    """The eager module runs channel then spatial through their own forward; `cbam_eager` stays the reference and
    the two agree bitwise, forward and gradients, whatever the input and parameter dtypes."""
    module = CBAM(32).to(module_dtype)
    calls = []
    for name in ("channel", "spatial"):
        getattr(module, name).register_forward_hook(lambda mod, args, out, name=name: calls.append(name))
    x = make_inputs(32)[0].to(x_dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weights = [module.channel.fc1.weight, module.channel.fc2.weight, module.spatial.conv.weight]
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x_dtype)

    x_module = x.clone().requires_grad_(True)
    out = module(x_module)
    g = torch.autograd.grad(out, [x_module, *weights], upstream)
    assert calls == ["channel", "spatial"]
    ref, g_ref = grads(cbam_eager, (x, *weights), upstream)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == x_dtype and out.is_contiguous(memory_format=fmt)
    assert torch.equal(out, ref)
    for name, a, b in zip(("x", "w_fc1", "w_fc2", "w_spatial"), g, g_ref):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_state_dict_identical_across_impls():
    keys = {impl: {k: tuple(v.shape) for k, v in CBAM(256, impl=impl).state_dict().items()} for impl in CBAM_IMPLS}
    assert keys["eager"] == keys["compile"] == keys["triton"]
    donor = CBAM(256, impl="eager")
    CBAM(256, impl="compile").load_state_dict(donor.state_dict(), strict=True)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="impl"):
        CBAM(16, impl="cuda")
    with pytest.raises(ValueError, match="kernel_size"):
        CBAM(16, kernel_size=4)


def test_triton_without_cuda_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cbam_module, "_warned_reasons", set())
    assert cbam_module.active_impl("triton", torch.empty(0)) == "eager"
    module = CBAM(16, impl="triton")
    x = torch.randn(1, 16, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [module(x), module(x), CBAM(16, impl="triton")(x)]
    fallback = [w for w in caught if "falls back to eager" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert "TRITON_INTERPRET" in str(fallback[0].message)
    torch.testing.assert_close(outs[0], cbam_forward(x, *[p.detach() for p in module.parameters()], impl="eager"))


def test_triton_with_interpreter_but_no_kernel_module_warns_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cbam_module, "_warned_reasons", set())
    monkeypatch.setattr(cbam_module, "TRITON_MODULE", "hpc_drseg.kernels.does_not_exist")
    cbam_module._load_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="does_not_exist"):
            CBAM(16, impl="triton")(torch.randn(1, 16, 4, 4))
    finally:
        cbam_module._load_kernel.cache_clear()


@pytest.mark.slow  # first torch.compile (inductor, C++) took 100 s on the shared 2-core CPU
def test_compile_matches_eager():
    x, w1, w2, ws = make_inputs(32)
    x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape)
    out, g = grads(lambda *a: cbam_forward(*a, impl="compile"), (x, w1, w2, ws), upstream)
    ref, g_ref = grads(lambda *a: cbam_forward(*a, impl="eager"), (x, w1, w2, ws), upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

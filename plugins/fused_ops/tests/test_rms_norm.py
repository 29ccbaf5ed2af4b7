"""RMSNorm kernels against the transformers modules they replace.

Tolerances: fp32 rtol=1e-5, atol=1e-5 (only reduction order differs). bf16: max abs error
<= 1e-2 * max |expected| (transformers rounds to bf16 between steps, the kernel once at the
end, so outputs differ by about one bf16 ulp). The PyTorch path reproduces the forward bit
for bit, which is asserted with ``torch.equal``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from accel.testing import assert_close_scaled
from accel_fused_ops.integration.norms import rms_norm_params
from accel_fused_ops.kernels.rms_norm import rms_norm, rms_norm_reference
from accel_fused_ops.support import ARCHITECTURES, NORM_CLASSES

SHAPE = (3, 37, 129)  # 111 rows of an odd width: masks on both axes, 7 programs


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.dtype == torch.float32:
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        assert_close_scaled(actual, expected, 1e-2)


def make_module(
    model: str, cls_name: str, dim: int, dtype: torch.dtype, device="cpu"
) -> torch.nn.Module:
    module_cls = getattr(
        importlib.import_module(f"transformers.models.{model}.modeling_{model}"), cls_name
    )
    module = module_cls(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.5)  # zeros/ones at init would hide weight bugs
    return module.to(device)


FAMILIES = [
    ("llama", "LlamaRMSNorm"),
    ("gemma2", "Gemma2RMSNorm"),
    ("gemma3", "Gemma3RMSNorm"),
    ("olmo2", "Olmo2RMSNorm"),
]


@pytest.mark.parametrize("model,cls_name", FAMILIES, ids=[f[1] for f in FAMILIES])
def test_matches_transformers_module(impl, device, model, cls_name, dtype):
    torch.manual_seed(0)
    module = make_module(model, cls_name, SHAPE[-1], dtype, device)
    x = (2.0 * torch.randn(SHAPE)).to(device, dtype).requires_grad_()
    expected = module(x)
    grad_out = torch.randn_like(expected)
    exp_dx, exp_dw = torch.autograd.grad(expected, (x, module.weight), grad_out)

    out = rms_norm(x, module.weight, **rms_norm_params(module))
    dx, dw = torch.autograd.grad(out, (x, module.weight), grad_out)

    assert_close(out, expected)
    assert_close(dx, exp_dx)
    assert_close(dw, exp_dw)
    if impl == "torch":
        assert torch.equal(out, expected)


# Every RMSNorm class of the support table, with the transformers module that defines it.
KNOWN_CLASSES = sorted(
    {
        ("gemma3" if t == "gemma3_text" else t, cls)
        for t, arch in ARCHITECTURES.items()
        for cls in arch.norms
    }
)


@pytest.mark.parametrize("model,cls_name", KNOWN_CLASSES, ids=[c[1] for c in KNOWN_CLASSES])
def test_params_reproduce_every_known_class_bit_for_bit(model, cls_name, monkeypatch):
    """Guards the class table: if transformers changes one of these forwards, this fails."""
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    torch.manual_seed(0)
    module = make_module(model, cls_name, 48, torch.bfloat16)
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, module.weight, **rms_norm_params(module)), module(x))


def test_known_class_table_is_exactly_the_tested_one():
    assert set(NORM_CLASSES) == {c[1] for c in KNOWN_CLASSES}


def test_params_of_subclass_and_eps():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class MyNorm(LlamaRMSNorm):
        pass

    assert rms_norm_params(MyNorm(8, eps=1e-4)) == {"eps": 1e-4, "offset": 0.0, "casting": "llama"}
    assert rms_norm_params(Gemma2RMSNorm(8, eps=3e-6)) == {
        "eps": 3e-6,
        "offset": 1.0,
        "casting": "gemma",
    }


def test_unknown_module_is_rejected():
    with pytest.raises(ValueError, match="no fused RMSNorm equivalent is known for LayerNorm"):
        rms_norm_params(torch.nn.LayerNorm(8))


def test_mixed_dtypes_and_frozen_weight(impl, device):
    """bf16 activations with an fp32 frozen weight: Llama's output is fp32 (type promotion)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    module = make_module("llama", "LlamaRMSNorm", SHAPE[-1], torch.float32, device)
    module.weight.requires_grad_(False)
    assert isinstance(module, LlamaRMSNorm)
    x = torch.randn(SHAPE, dtype=torch.bfloat16).to(device).requires_grad_()
    expected = module(x)
    grad_out = torch.randn_like(expected)
    (exp_dx,) = torch.autograd.grad(expected, x, grad_out)

    out = rms_norm(x, module.weight, **rms_norm_params(module))
    (dx,) = torch.autograd.grad(out, x, grad_out)
    assert out.dtype == torch.float32
    # The normalised value is rounded to bf16 before the fp32 multiply: bf16 tolerance.
    assert_close(out.bfloat16(), expected.bfloat16())
    assert_close(dx, exp_dx)


def test_offset_with_llama_casting(impl, device):
    """offset is applied to the weight in fp32 before the Llama-style rounding."""
    torch.manual_seed(2)
    x = torch.randn(SHAPE, dtype=torch.bfloat16).to(device).requires_grad_()
    w = torch.randn(SHAPE[-1], dtype=torch.bfloat16).to(device).requires_grad_()
    expected = rms_norm_reference(x, w, 1e-6, offset=0.5, casting="llama")
    grad_out = torch.randn_like(expected)
    exp = torch.autograd.grad(expected, (x, w), grad_out)
    out = rms_norm(x, w, 1e-6, offset=0.5, casting="llama")
    got = torch.autograd.grad(out, (x, w), grad_out)
    assert_close(out, expected)
    for g, e in zip(got, exp):
        assert_close(g, e)


def test_non_contiguous_input(impl, device):
    """A transposed input (last-dim stride != 1) gives the same values and gradients."""
    torch.manual_seed(3)
    base = torch.randn(SHAPE[-1], 40).to(device).requires_grad_()
    w = torch.randn(SHAPE[-1]).to(device).requires_grad_()
    x = base.t()  # (40, 129), stride (1, 40)
    expected = rms_norm_reference(x, w, 1e-6)
    grad_out = torch.randn_like(expected)
    exp = torch.autograd.grad(expected, (base, w), grad_out)
    out = rms_norm(x, w, 1e-6)
    got = torch.autograd.grad(out, (base, w), grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_backward_keeps_only_input_and_rstd(impl, device):
    """No (rows, D) fp32 intermediate survives forward: only x, weight and rstd (rows,)."""
    x = torch.randn(SHAPE, dtype=torch.bfloat16).to(device).requires_grad_()
    w = torch.randn(SHAPE[-1], dtype=torch.bfloat16).to(device).requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rms_norm(x, w, 1e-6)
    rows = SHAPE[0] * SHAPE[1]
    assert sorted(saved, key=str) == sorted(
        [
            ((rows, SHAPE[-1]), torch.bfloat16),
            ((SHAPE[-1],), torch.bfloat16),
            ((rows,), torch.float32),
        ],
        key=str,
    )


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="casting='t5' is not valid"):
        rms_norm(x, torch.ones(8), casting="t5")
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        rms_norm(x, torch.ones(8), eps=-1.0)


# --------------------------------------------------------------------------- options

ODD = (5, 13, 67)  # 65 rows of 67: masks on both axes


def _expected(x, weight, offset, casting):
    """The reference fwd and its autograd gradients; bf16 in ``casting="none"`` is compared
    with the fp32 computation (the kernel rounds once, the bf16 reference at every step)."""
    if casting == "none" and x.dtype != torch.float32:
        xr = x.detach().float().requires_grad_()
        wr = None if weight is None else weight.detach().float().requires_grad_()
    else:
        xr = x.detach().clone().requires_grad_()
        wr = None if weight is None else weight.detach().clone().requires_grad_()
    y = rms_norm_reference(xr, wr, 1e-5, offset=offset, casting=casting)
    return y, xr, wr


@pytest.mark.parametrize("casting", ["llama", "gemma", "none"])
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no_weight"])
def test_casting_modes_with_and_without_weight(impl, device, dtype, casting, affine):
    torch.manual_seed(4)
    x = (2.0 * torch.randn(ODD)).to(device, dtype).requires_grad_()
    weight = None
    if affine:
        weight = torch.randn(ODD[-1]).mul_(0.5).to(device, dtype).requires_grad_()
    offset = 1.0 if affine and casting == "gemma" else 0.0
    expected, xr, wr = _expected(x, weight, offset, casting)
    grad_out = torch.randn(expected.shape).to(device)
    wanted = (xr,) if wr is None else (xr, wr)
    exp_grads = torch.autograd.grad(expected, wanted, grad_out.to(expected.dtype))

    out = rms_norm(x, weight, 1e-5, offset=offset, casting=casting)
    got = (x,) if weight is None else (x, weight)
    grads = torch.autograd.grad(out, got, grad_out.to(out.dtype))
    assert out.dtype == (expected.dtype if dtype == torch.float32 else out.dtype)
    assert_close(out, expected.to(out.dtype))
    for g, e in zip(grads, exp_grads, strict=True):
        assert_close(g, e.to(g.dtype))
    if impl == "torch" and dtype == torch.float32:
        assert torch.equal(out, expected)


def test_module_without_weight_is_patched_like_the_module():
    """An RMSNorm whose weight is None (elementwise_affine=False style) through the glue."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from accel_fused_ops.integration.norms import rms_norm_forward

    class NoScale(Olmo2RMSNorm):
        def __init__(self, dim, eps):
            super().__init__(dim, eps)
            del self.weight
            self.weight = None

    module = NoScale(67, 1e-5)
    x = torch.randn(ODD)
    expected = rms_norm_reference(x, None, 1e-5, casting="gemma")
    torch.testing.assert_close(rms_norm_forward(module)(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("casting", ["llama", "gemma", "none"])
def test_in_place_backward_reuses_the_gradient_buffer(impl, device, casting):
    torch.manual_seed(5)
    x = torch.randn(ODD).to(device).requires_grad_()
    weight = torch.randn(ODD[-1]).to(device).requires_grad_()
    grad_out = torch.randn(ODD).to(device)
    y = rms_norm(x, weight, 1e-5, casting=casting)
    exp_dx, exp_dw = torch.autograd.grad(y, (x, weight), grad_out.clone())

    buffer = grad_out.clone()
    y = rms_norm(x, weight, 1e-5, casting=casting, in_place=True)
    dx, dw = torch.autograd.grad(y, (x, weight), buffer)
    assert dx.data_ptr() == buffer.data_ptr(), "dx must be written into the dy buffer"
    torch.testing.assert_close(dx, exp_dx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, exp_dw, rtol=1e-6, atol=1e-6)
    # a broadcast gradient (y.sum() backward) is never written into
    y = rms_norm(x, weight, 1e-5, casting=casting, in_place=True)
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    (ref,) = torch.autograd.grad(rms_norm(x, weight, 1e-5, casting=casting).sum(), (x,))
    torch.testing.assert_close(dx, ref, rtol=1e-6, atol=1e-6)


def test_offset_without_weight_is_refused():
    with pytest.raises(ValueError, match="offset=1.0 needs a weight"):
        rms_norm(torch.randn(3, 8), None, offset=1.0)

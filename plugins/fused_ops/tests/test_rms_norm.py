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
from accel_fused_ops.kernels.rms_norm import rms_norm, rms_norm_params, rms_norm_reference

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


# Every class rms_norm_params knows, with the transformers module that defines it.
KNOWN_CLASSES = [
    ("llama", "LlamaRMSNorm"),
    ("mistral", "MistralRMSNorm"),
    ("ministral", "MinistralRMSNorm"),
    ("mixtral", "MixtralRMSNorm"),
    ("qwen2", "Qwen2RMSNorm"),
    ("qwen2_moe", "Qwen2MoeRMSNorm"),
    ("qwen3", "Qwen3RMSNorm"),
    ("qwen3_moe", "Qwen3MoeRMSNorm"),
    ("granite", "GraniteRMSNorm"),
    ("granitemoe", "GraniteMoeRMSNorm"),
    ("granitemoeshared", "GraniteMoeSharedRMSNorm"),
    ("granitemoehybrid", "GraniteMoeHybridRMSNorm"),
    ("phi3", "Phi3RMSNorm"),
    ("deepseek_v3", "DeepseekV3RMSNorm"),
    ("smollm3", "SmolLM3RMSNorm"),
    ("gemma", "GemmaRMSNorm"),
    ("gemma2", "Gemma2RMSNorm"),
    ("gemma3", "Gemma3RMSNorm"),
    ("olmo2", "Olmo2RMSNorm"),
    ("olmo3", "Olmo3RMSNorm"),
]


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
    from accel_fused_ops.kernels import rms_norm as mod

    table = mod._LLAMA_STYLE | mod._GEMMA_STYLE | mod._OLMO_STYLE
    assert table == {c[1] for c in KNOWN_CLASSES}


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

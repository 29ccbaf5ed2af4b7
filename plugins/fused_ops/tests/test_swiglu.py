"""SwiGLU / GeGLU kernels against ``ACT2FN[name](gate) * up`` and real transformers MLPs.

Tolerances: fp32 rtol=1e-5, atol=1e-5 (the kernel evaluates exp / tanh / erf with its own
code). bf16: both paths round where transformers does (the activation, the product, and in
backward ``dy * up`` before the activation's derivative), so the PyTorch path reproduces the
forward and both gradients bit for bit (``torch.equal``) and the Triton kernel differs from
transformers in at most 1% of the elements (a last fp32 bit of exp / tanh / erf that flips a
bf16 rounding), by at most one bf16 rounding step there (2**-7 of the larger magnitude, plus
2**-7 * 1e-3 of the tensor's largest value for results near zero).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, GemmaConfig, LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from accel.testing import assert_close_scaled
from accel_fused_ops.integration.mlp import activation_params
from accel_fused_ops.kernels.swiglu import gated_activation, geglu, swiglu

SHAPE = (3, 37, 129)  # 14319 elements: 14 programs of 1024, the last one masked


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.dtype == torch.float32:
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        assert_close_scaled(actual, expected, 1e-2)
        assert_rounded_alike(actual, expected)


def assert_rounded_alike(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 results rounded at the same steps: equal but for a last-bit flip here and there."""
    assert actual.dtype == expected.dtype == torch.bfloat16
    a, e = actual.float(), expected.float()
    differ = a != e
    assert differ.float().mean().item() <= 1e-2, f"{int(differ.sum())} of {a.numel()} differ"
    step = 2.0**-7 * (torch.maximum(a.abs(), e.abs()) + 1e-3 * e.abs().max())
    assert torch.all((a - e).abs()[differ] <= step[differ])


OPS = {
    "silu": swiglu,
    "gelu_pytorch_tanh": lambda g, u: geglu(g, u, approximate="tanh"),
    "gelu": lambda g, u: geglu(g, u, approximate="none"),
}


def check(op, act_name, gate, up, impl):
    expected = ACT2FN[act_name](gate) * up
    grad_out = torch.randn_like(expected)
    exp_grads = torch.autograd.grad(expected, (gate, up), grad_out)
    out = op(gate, up)
    grads = torch.autograd.grad(out, (gate, up), grad_out)
    assert_close(out, expected)
    for g, e in zip(grads, exp_grads):
        assert_close(g, e)
    if impl == "torch":
        assert torch.equal(out, expected)
        assert all(torch.equal(g, e) for g, e in zip(grads, exp_grads))


@pytest.mark.parametrize("act_name", list(OPS))
def test_matches_transformers_activation(impl, device, act_name, dtype):
    torch.manual_seed(0)
    gate = (2.0 * torch.randn(SHAPE)).to(device, dtype).requires_grad_()  # reaches the tails
    up = torch.randn(SHAPE, dtype=dtype).to(device).requires_grad_()
    check(OPS[act_name], act_name, gate, up, impl)


def test_slices_of_a_fused_gate_up_projection(impl, device):
    """gate/up as column halves of one (..., 2I) output (row stride 2I) need no copy."""
    torch.manual_seed(1)
    fused = torch.randn(2, 37, 2 * 129).to(device).requires_grad_()
    gate, up = fused.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    grad_out = torch.randn_like(expected)
    (exp_grad,) = torch.autograd.grad(expected, fused, grad_out)
    out = swiglu(gate, up)
    (grad,) = torch.autograd.grad(out, fused, grad_out)
    assert_close(out, expected)
    assert_close(grad, exp_grad)


def test_backward_keeps_only_gate_and_up(impl, device):
    gate = torch.randn(SHAPE, dtype=torch.bfloat16).to(device).requires_grad_()
    up = torch.randn(SHAPE, dtype=torch.bfloat16).to(device).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        geglu(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up


def tiny(config_cls, **kw):
    return config_cls(hidden_size=16, intermediate_size=40, num_attention_heads=2, **kw)


def test_activation_params_of_real_mlps():
    llama = LlamaMLP(tiny(LlamaConfig, hidden_act="silu"))
    llama_gelu = LlamaMLP(tiny(LlamaConfig, hidden_act="gelu"))
    gemma = GemmaMLP(tiny(GemmaConfig))  # default gelu_pytorch_tanh
    gemma3 = Gemma3MLP(tiny(Gemma3TextConfig))  # reads config.hidden_activation
    assert activation_params(llama) == {"kind": "swiglu"}
    assert activation_params(llama_gelu) == {"kind": "geglu", "approximate": "none"}
    assert activation_params(gemma) == {"kind": "geglu", "approximate": "tanh"}
    assert activation_params(gemma3) == {"kind": "geglu", "approximate": "tanh"}


@pytest.mark.parametrize(
    "activation,expected",
    [
        ("silu", {"kind": "swiglu"}),
        (ACT2FN["swish"], {"kind": "swiglu"}),
        (ACT2FN["gelu_new"], {"kind": "geglu", "approximate": "tanh"}),
        (ACT2FN["gelu_python"], {"kind": "geglu", "approximate": "none"}),
        (torch.nn.GELU(approximate="tanh"), {"kind": "geglu", "approximate": "tanh"}),
    ],
)
def test_activation_params_of_activations(activation, expected):
    assert activation_params(activation) == expected


@pytest.mark.parametrize("activation", ["relu", ACT2FN["gelu_fast"], ACT2FN["gelu_10"]])
def test_activation_params_rejects_other_activations(activation):
    with pytest.raises(ValueError, match="not an activation the fused gated MLP supports"):
        activation_params(activation)


def test_patched_mlp_equals_module(impl, device):
    """What a patched Gemma MLP computes: down(gated_activation(gate, up, **params))."""
    torch.manual_seed(2)
    mlp = GemmaMLP(tiny(GemmaConfig)).to(device)
    x = torch.randn(2, 5, 16).to(device)
    fused = mlp.down_proj(
        gated_activation(mlp.gate_proj(x), mlp.up_proj(x), **activation_params(mlp))
    )
    torch.testing.assert_close(fused, mlp(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match="gate and up must have the same shape"):
        swiglu(g, torch.randn(4, 9))
    with pytest.raises(ValueError, match="approximate='fast' is not valid"):
        geglu(g, g, approximate="fast")
    with pytest.raises(ValueError, match="kind='reglu' is not valid"):
        gated_activation(g, g, kind="reglu")


# --------------------------------------------------------------------------- multipliers

MULTIPLIERS = {"gate_multiplier": 0.7, "out_multiplier": 1.3}


@pytest.mark.parametrize("act_name", list(OPS))
def test_multipliers_match_the_reference(impl, device, act_name, dtype):
    """``act(gate * gm) * up * om`` fwd+bwd on an odd shape against the reference formula."""
    torch.manual_seed(2)
    gate = (2.0 * torch.randn(SHAPE)).to(device, dtype).requires_grad_()
    up = torch.randn(SHAPE, dtype=dtype).to(device).requires_grad_()
    kind, approximate = {"silu": ("swiglu", "none"), "gelu": ("geglu", "none")}.get(
        act_name, ("geglu", "tanh")
    )
    expected = ACT2FN[act_name](gate * 0.7) * up * 1.3
    grad_out = torch.randn_like(expected)
    exp_grads = torch.autograd.grad(expected, (gate, up), grad_out)
    out = gated_activation(gate, up, kind, approximate, **MULTIPLIERS)
    grads = torch.autograd.grad(out, (gate, up), grad_out)
    assert_close(out, expected)
    for g, e in zip(grads, exp_grads, strict=True):
        assert_close(g, e)


@pytest.mark.parametrize("act_name", ["gelu_pytorch_tanh", "gelu", "silu"])
def test_mlp_in_bf16_with_values_in_the_tails(impl, device, act_name):
    """A Llama-layout MLP with unscaled randn weights (gate values up to ~50: the activation's
    tails), bf16, against the unfused module: bit for bit on the PyTorch path; on the Triton
    path the kernel's own outputs are rounded alike and the MLP's output and gradients are
    within 2**-7 of their largest value (a flipped last bit, summed by the matmuls)."""
    torch.manual_seed(4)
    hidden, inter = 67, 301
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, hidden_act=act_name,
        num_attention_heads=1, num_key_value_heads=1, head_dim=2,
    )  # fmt: skip
    mlp = LlamaMLP(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape))
    mlp = mlp.to(device)
    x = torch.randn(2, 19, hidden, dtype=torch.bfloat16).to(device).requires_grad_()
    grad_out = torch.randn(2, 19, hidden, dtype=torch.bfloat16).to(device)
    params = (x, *mlp.parameters())
    expected = mlp(x)
    exp_grads = torch.autograd.grad(expected, params, grad_out)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    product = gated_activation(gate, up, **activation_params(mlp))
    fused = mlp.down_proj(product)
    grads = torch.autograd.grad(fused, params, grad_out)
    assert_rounded_alike(product, mlp.act_fn(gate) * up)
    for got, want in zip((fused, *grads), (expected, *exp_grads), strict=True):
        if impl == "torch":
            assert torch.equal(got, want)
        else:
            assert_close_scaled(got, want, 2.0**-7)


def test_multipliers_reproduce_falcon_h1_mlp(impl, device):
    """Falcon-H1's ``down(up * silu(gate(x) * gm)) * dm`` with the multiplier folded into the
    product (down_proj has no bias), fwd and every gradient."""
    from transformers import FalconH1Config
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1MLP

    torch.manual_seed(3)
    config = FalconH1Config(hidden_size=24, intermediate_size=37, mlp_multipliers=[0.6, 1.7])
    mlp = FalconH1MLP(config).to(device)
    x = torch.randn(2, 5, 24).to(device).requires_grad_()
    expected = mlp(x)
    grad_out = torch.randn_like(expected)
    params = (x, *mlp.parameters())
    exp_grads = torch.autograd.grad(expected, params, grad_out)
    fused = mlp.down_proj(
        swiglu(
            mlp.gate_proj(x),
            mlp.up_proj(x),
            gate_multiplier=mlp.gate_multiplier,
            out_multiplier=mlp.down_multiplier,
        )
    )
    grads = torch.autograd.grad(fused, params, grad_out)
    assert_close(fused, expected)
    for g, e in zip(grads, exp_grads, strict=True):
        assert_close(g, e)


def test_multipliers_must_be_numbers():
    gate = torch.randn(3, 4)
    with pytest.raises(TypeError, match="gate_multiplier must be a number"):
        swiglu(gate, gate, gate_multiplier=torch.tensor(2.0))

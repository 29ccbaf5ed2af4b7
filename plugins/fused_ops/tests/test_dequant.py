"""The PyTorch GPTQ decoder of ``kernels/dequant.py`` against gptqmodel's own
``dequantize_weight`` (the layer's forward), and ``GPTQWeight`` against the layer's forward and
backward.

Shapes are odd on purpose: in=72 with groups of 32 (a partial last group), out=40 or 44 (not a
multiple of the 8 zero points per int32 word), 2/4/8 bits, act-order (rows assigned to groups
in a random order) and consecutive groups (in=96, the broadcast path). Tolerances: the decoded
product is exact in fp32, so fp16 and fp32 results must equal gptqmodel's bit for bit; bf16 is
rounded once from fp32 where gptqmodel rounds to fp16 first: at most one bf16 ulp (2^-7
relative).
"""

from __future__ import annotations

import pytest
import torch

from accel_fused_ops.kernels.dequant import (
    GPTQWeight,
    _contiguous_group_size,
    gptq_dequantize_torch,
)


def _gptq_layer(in_features, out_features, bits, group_size, desc_act):
    """A gptqmodel TorchLinear with random valid codes, zero points and scales (act-order: a
    random row-to-group assignment). ``optimized = True`` skips gptqmodel's torch.compile of
    ``dequantize_weight`` (seconds on CPU; the same values)."""
    qlinear = pytest.importorskip("gptqmodel.nn_modules.qlinear.torch")
    layer = qlinear.TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=False,
        desc_act=desc_act,
        in_features=in_features,
        out_features=out_features,
        bias=False,
        pack_dtype=torch.int32,
    )
    gen = torch.Generator().manual_seed(7 * bits + in_features + out_features)
    with torch.no_grad():
        for name in ("qweight", "qzeros"):
            words = torch.randint(-(2**31), 2**31 - 1, getattr(layer, name).shape, generator=gen)
            getattr(layer, name).copy_(words.to(torch.int32))
        step = 0.2 / 2**bits
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=gen) * step + step / 4)
        if desc_act:
            layer.g_idx.copy_(layer.g_idx[torch.randperm(in_features, generator=gen)])
    layer.optimized = True
    layer.post_init()
    layer.train()
    return layer


CASES = [
    # bits, in, out, group size, act-order, consecutive full groups (broadcast path)
    (4, 72, 44, 32, True, False),
    (4, 72, 40, 32, False, False),  # consecutive groups, the last one partial: gather path
    (4, 96, 44, 32, False, True),
    (2, 64, 40, 16, True, False),
    (8, 72, 40, 32, True, False),
    (8, 96, 40, 32, False, True),
]


@pytest.mark.parametrize(("bits", "in_f", "out_f", "group", "act", "broadcast"), CASES)
def test_gptq_torch_dequant_matches_gptqmodel(bits, in_f, out_f, group, act, broadcast):
    layer = _gptq_layer(in_f, out_f, bits, group, act)
    groups = layer.scales.shape[0]
    assert (_contiguous_group_size(layer.g_idx, groups) is not None) == broadcast
    reference = layer.dequantize_weight()  # (in, out), fp16 like the scales
    assert reference.shape == (in_f, out_f) and reference.dtype == torch.float16
    packed = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits)
    fp16 = gptq_dequantize_torch(*packed, torch.float16)
    torch.testing.assert_close(fp16, reference, rtol=0, atol=0)
    fp32 = gptq_dequantize_torch(*packed, torch.float32)  # the exact product
    torch.testing.assert_close(fp32.half(), reference, rtol=0, atol=0)
    bf16 = gptq_dequantize_torch(*packed, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16, reference.to(torch.bfloat16), rtol=2**-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", [True, False], ids=["act-order", "groups"])
def test_gptq_weight_forward_and_backward_match_the_layer(monkeypatch, dtype, act):
    """``x @ materialize(dtype).T`` and its input gradient against gptqmodel's forward (which
    multiplies by the fp16 product cast to x's dtype), on the PyTorch path."""
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    layer = _gptq_layer(96, 44, 4, 32, act)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 96, generator=gen).to(dtype)
    grad = torch.randn(3, 5, 44, generator=gen).to(dtype)

    x_ref = x.clone().requires_grad_(True)
    y_ref = layer(x_ref)
    y_ref.backward(grad)

    source = GPTQWeight(layer)
    weight = source.materialize(dtype)
    assert weight.shape == (44, 96) and weight.dtype == dtype
    x_new = x.clone().requires_grad_(True)
    y_new = x_new @ weight.t()
    y_new.backward(grad)
    exact = dtype != torch.bfloat16  # bf16: one rounding instead of gptqmodel's two
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 2**-7, "atol": 0}
    torch.testing.assert_close(weight.t(), layer.dequantize_weight().to(dtype), **tol)
    scale = max(y_ref.abs().max().item(), 1.0)
    torch.testing.assert_close(y_new, y_ref, rtol=0, atol=(2e-3 if exact else 2e-2) * scale)
    gscale = max(x_ref.grad.abs().max().item(), 1.0)
    torch.testing.assert_close(
        x_new.grad, x_ref.grad, rtol=0, atol=(2e-3 if exact else 2e-2) * gscale
    )

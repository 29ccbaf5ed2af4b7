"""Fused LoRA op against PEFT's own LoRA layers, forward and backward.

Every comparison runs the same PEFT module twice, once through its own forward and once through
``fused_lora_forward``, on the same input and upstream gradient, and compares the output and the
gradients of x, lora_A and lora_B. With dropout the RNG is re-seeded before each run: the fused
op draws its mask with ``torch.native_dropout``, which consumes the RNG like PEFT's
``nn.Dropout``, so both see the same mask (and a test checks the mask really changes the output).

Shapes: plain weights use in=65, out=47, r=3 and a (2, 7, 65) input. bitsandbytes NF4 quantises
the flattened weight in blocks of 64, so 65x47 works as well. GPTQ packs 8 input rows per int32
(4-bit) and groups rows by 32: in=72 (three groups, the last one partial), out=40 or 44.

Tolerances (TOL, per dtype) bound the largest absolute difference relative to the largest
magnitude of the PEFT tensor: fp32 1e-5; fp16 2e-3 and bf16 1.6e-2, i.e. about two ulps at the
top of the tensor's range. Elementwise relative checks would be wrong for low precision: a
gradient entry that is a sum with cancellation carries the rounding error of its largest terms,
and PEFT's own bf16 result is off from the fp32 one by the same amount as the fused op's.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from accel.testing import assert_close_scaled
from accel_fused_ops.integration.lora import _projection, can_fuse, fused_lora_forward
from accel_fused_ops.kernels.dequant import gptq_dequantize_triton
from accel_fused_ops.kernels.fused_lora import (
    fused_lora_linear,
    fused_lora_multi,
    fused_lora_reference,
)

IN, OUT, R = 65, 47, 3
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# --------------------------------------------------------------------------- helpers


class Block(nn.Module):
    """A norm (so the model owns a parameter, which peft needs) and the projections tested."""

    def __init__(self, in_features: int, **projections: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        for name, module in projections.items():
            setattr(self, name, module)


def _lora(model: nn.Module, targets: list[str], dropout: float = 0.0, **config) -> list[nn.Module]:
    """Wrap ``model`` with LoRA; lora_B gets random values (PEFT starts it at zero, which would
    make every lora_A gradient zero and the comparison weak). Returns the LoRA layers."""
    peft_model = get_peft_model(
        model,
        LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets, lora_dropout=dropout, **config),
    )
    peft_model.train()
    layers = [getattr(peft_model.base_model.model, name) for name in targets]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["default"].weight.normal_(0.0, 1.0)
    return layers


def _adapter_params(layer: nn.Module) -> list[torch.Tensor]:
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def _run(fn, x, params, grad_outputs, seed=1234):
    """Outputs of ``fn(x)`` and the gradients of x and ``params``, with the RNG seeded first."""
    torch.manual_seed(seed)
    outputs = fn(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs, [x, *params], list(grad_outputs))
    return [o.detach() for o in outputs], list(grads)


def _assert_matches(reference, fused, tol):
    ref_out, ref_grads = reference
    out, grads = fused
    for name, r, f in [("output", a, b) for a, b in zip(ref_out, out)] + [
        ("grad", a, b) for a, b in zip(ref_grads, grads)
    ]:
        assert_close_scaled(f, r, tol, f"{name} (fused vs PEFT)")


def _compare_with_peft(layer, x_dtype, seed=1234, tol=None):
    torch.manual_seed(0)
    x = torch.randn(2, 7, layer.in_features, dtype=x_dtype, requires_grad=True)
    grad_y = torch.randn(2, 7, layer.out_features, dtype=x_dtype)
    params = _adapter_params(layer)
    reference = _run(layer, x, params, [grad_y], seed)
    fused = _run(lambda t: fused_lora_forward(layer, t), x, params, [grad_y], seed)
    _assert_matches(reference, fused, tol or TOL[x_dtype])
    return x, fused


def _saved_tensors(fn, x):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


# --------------------------------------------------------------------------- plain weights


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_linear_matches_peft(dtype, bias, dropout):
    torch.manual_seed(0)
    model = Block(IN, proj=nn.Linear(IN, OUT, bias=bias, dtype=dtype))
    (layer,) = _lora(model, ["proj"], dropout)
    assert can_fuse(layer) is None
    # peft keeps the adapter in fp32 over a bf16 base: the mixed-dtype path is exercised too.
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x, (outputs, _) = _compare_with_peft(layer, dtype)

    if dropout:  # the mask must matter, or the comparison above proves nothing about it
        layer.eval()
        no_dropout = fused_lora_forward(layer, x).detach()
        diff = (no_dropout.float() - outputs[0].float()).abs().max().item()
        assert diff > 10 * TOL[dtype] * outputs[0].abs().max().item()


def test_autocast_bf16_matches_peft():
    torch.manual_seed(0)
    (layer,) = _lora(Block(IN, proj=nn.Linear(IN, OUT)), ["proj"], 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, (outputs, _) = _compare_with_peft(layer, torch.float32, tol=TOL[torch.bfloat16])
    assert outputs[0].dtype == torch.bfloat16


def _multi(layers, x):
    """q, k and v of one input in one Function (``fused_lora_multi``)."""
    return fused_lora_multi(x, [_projection(m) for m in layers])


def test_qkv_matches_peft_and_saves_x_once():
    torch.manual_seed(0)
    model = Block(
        IN,
        q_proj=nn.Linear(IN, OUT),
        k_proj=nn.Linear(IN, 23, bias=False),
        v_proj=nn.Linear(IN, 29),
    )
    layers = _lora(model, ["q_proj", "k_proj", "v_proj"], dropout=0.25)
    x = torch.randn(2, 7, IN, requires_grad=True)
    grad_ys = [torch.randn(2, 7, m.out_features) for m in layers]
    params = [p for m in layers for p in _adapter_params(m)]
    reference = _run(lambda t: tuple(m(t) for m in layers), x, params, grad_ys)
    fused = _run(lambda t: _multi(layers, t), x, params, grad_ys)
    _assert_matches(reference, fused, TOL[torch.float32])

    saved = _saved_tensors(lambda t: _multi(layers, t), x)
    assert sum(t.data_ptr() == x.data_ptr() for t in saved) == 1, "x must be saved exactly once"
    big_float = [t for t in saved if t.is_floating_point() and t.numel() >= x.numel()]
    assert len(big_float) == 1, f"only x may be saved at full size, got {[t.shape for t in saved]}"


# --------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize(
    "compute_dtype, x_dtype, dropout",
    [
        (torch.float32, torch.float32, 0.2),
        (torch.bfloat16, torch.bfloat16, 0.0),
        (torch.bfloat16, torch.float32, 0.2),
    ],
)
def test_bnb_nf4_matches_peft(compute_dtype, x_dtype, dropout):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(IN, OUT, compute_dtype=compute_dtype, quant_type="nf4").to("cpu")
    model = Block(IN, proj=base)
    model.is_loaded_in_4bit = True  # what transformers sets; peft then picks its Linear4bit LoRA
    (layer,) = _lora(model, ["proj"], dropout)
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    assert can_fuse(layer) is None
    _compare_with_peft(layer, x_dtype)


# --------------------------------------------------------------------------- GPTQ


def _gptq_linear(in_features, out_features, bits=4, group_size=32, desc_act=True, bias=True):
    """A gptqmodel TorchLinear holding random (but valid) packed codes, zero points and scales.

    With desc_act the rows are assigned to groups in a random order, as act-order GPTQ does.
    torch.compile of gptqmodel's dequantize_weight is skipped (``optimized = True``): it would
    cost ~15 s on CPU and computes the same values.
    """
    qlinear = pytest.importorskip("gptqmodel.nn_modules.qlinear.torch")
    layer = qlinear.TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=False,
        desc_act=desc_act,
        in_features=in_features,
        out_features=out_features,
        bias=bias,
        pack_dtype=torch.int32,
    )
    gen = torch.Generator().manual_seed(bits * 100 + out_features)

    def random_words(shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int64)

    with torch.no_grad():
        layer.qweight.copy_(random_words(layer.qweight.shape).to(torch.int32))
        layer.qzeros.copy_(random_words(layer.qzeros.shape).to(torch.int32))
        step = 0.2 / (2**bits)  # keeps the dequantised weights around +-0.2 for any bit width
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=gen) * step + step / 4)
        if desc_act:
            layer.g_idx.copy_(layer.g_idx[torch.randperm(in_features, generator=gen)])
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=gen))
    layer.optimized = True
    layer.post_init()
    return layer


@pytest.mark.parametrize(
    "bits, in_features, out_features, group_size, desc_act",
    [(4, 72, 44, 32, True), (4, 72, 40, 32, False), (2, 64, 40, 16, True), (8, 72, 40, 32, True)],
)
def test_gptq_triton_dequant_matches_gptqmodel(
    triton_device, bits, in_features, out_features, group_size, desc_act
):
    layer = _gptq_linear(in_features, out_features, bits, group_size, desc_act)
    reference = layer.dequantize_weight().to(triton_device)  # (in, out), fp16 like the scales
    assert reference.shape == (in_features, out_features)
    packed = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
    args = (*(t.to(triton_device) for t in packed), bits)
    # Small tiles so that several programs run and the edges are masked.
    fp16 = gptq_dequantize_triton(*args, torch.float16, block_k=32, block_n=32)
    torch.testing.assert_close(fp16, reference, rtol=0, atol=0)  # one rounding of an exact product
    # fp32 output is the exact product: rounded to fp16 it must be gptqmodel's value bit for bit.
    fp32 = gptq_dequantize_triton(*args, torch.float32, block_k=32, block_n=32)
    torch.testing.assert_close(fp32.half(), reference, rtol=0, atol=0)
    # gptqmodel rounds to fp16 first, the kernel once to bf16: at most one bf16 ulp (2^-7 rel).
    bf16 = gptq_dequantize_triton(*args, torch.bfloat16, block_k=32, block_n=32)
    torch.testing.assert_close(bf16, reference.to(torch.bfloat16), rtol=2**-7, atol=0)


@pytest.mark.parametrize(
    "impl, x_dtype, dropout",
    [
        ("torch", torch.float16, 0.0),
        ("torch", torch.float32, 0.2),
        ("triton", torch.float16, 0.2),
        ("triton", torch.bfloat16, 0.0),
    ],
)
def test_gptq_lora_matches_peft(monkeypatch, impl, x_dtype, dropout):
    if impl == "triton":
        from accel_fused_ops.dispatch import triton_interpreting

        if not triton_interpreting():
            pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", impl)
    torch.manual_seed(0)
    (layer,) = _lora(Block(72, proj=_gptq_linear(72, 40)), ["proj"], dropout)
    assert type(layer).__name__ == "GPTQLoraLinear"
    assert can_fuse(layer) is None
    x, _ = _compare_with_peft(layer, x_dtype)

    # The point of the fused op: the dequantised weight is not kept for backward.
    def is_dense_weight(t):
        return tuple(t.shape) in {(72, 40), (40, 72)}

    assert any(is_dense_weight(t) for t in _saved_tensors(layer, x))  # PEFT keeps it
    fused_saved = _saved_tensors(lambda t: fused_lora_forward(layer, t), x)
    assert not any(is_dense_weight(t) for t in fused_saved)


# --------------------------------------------------------------------------- can_fuse


def _plain_lora(**config):
    torch.manual_seed(0)
    (layer,) = _lora(Block(IN, proj=nn.Linear(IN, OUT)), ["proj"], **config)
    return layer


def test_can_fuse_reasons():
    assert "not a PEFT LoraLayer" in can_fuse(nn.Linear(IN, OUT))
    assert "DoRA" in can_fuse(_plain_lora(use_dora=True))
    assert "lora_bias" in can_fuse(_plain_lora(lora_bias=True))

    layer = _plain_lora(dropout=0.1)
    layer.lora_dropout["default"] = nn.AlphaDropout(0.1)
    assert "AlphaDropout" in can_fuse(layer)

    torch.manual_seed(0)
    emb_model = get_peft_model(
        Block(IN, emb=nn.Embedding(11, IN)), LoraConfig(target_modules=["emb"])
    )
    assert "Embedding is not supported" in can_fuse(emb_model.base_model.model.emb)

    torch.manual_seed(0)
    model = Block(IN, proj=nn.Linear(IN, OUT))
    peft_model = get_peft_model(model, LoraConfig(r=R, target_modules=["proj"]))
    peft_model.add_adapter("second", LoraConfig(r=R, target_modules=["proj"]))
    peft_model.base_model.set_adapter(["default", "second"])
    assert "2 active LoRA adapters" in can_fuse(peft_model.base_model.model.proj)


def test_runtime_states_fall_back_to_peft():
    layer = _plain_lora()
    x = torch.randn(2, 7, IN)
    with torch.no_grad():
        layer.merge()
        assert "merged" in can_fuse(layer)
        torch.testing.assert_close(fused_lora_forward(layer, x), layer(x), rtol=0, atol=0)
        layer.unmerge()
        assert can_fuse(layer) is None
        layer.enable_adapters(False)
        assert "disabled" in can_fuse(layer)
        base_only = layer.get_base_layer()(x)
        torch.testing.assert_close(fused_lora_forward(layer, x), base_only, rtol=0, atol=0)


def test_bad_shapes_are_named():
    base = nn.Linear(IN, OUT)
    a, b = torch.randn(R, IN), torch.randn(OUT, R)
    with pytest.raises(ValueError, match="weight requires grad"):
        fused_lora_linear(torch.randn(4, IN), base, a, b, 2.0)
    base.requires_grad_(False)
    with pytest.raises(ValueError, match="in_features=65"):
        fused_lora_linear(torch.randn(4, IN + 1), base, a, b, 2.0)
    with pytest.raises(ValueError, match=r"lora_A \(3, 64\)"):
        fused_lora_linear(torch.randn(4, IN), base, a[:, :-1], b, 2.0)
    with pytest.raises(ValueError, match="base layer type .*Conv1d is not supported"):
        fused_lora_linear(torch.randn(4, IN), nn.Conv1d(IN, OUT, 1), a, b, 2.0)


# --------------------------------------------------------------------------- the op alone


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_op_matches_its_reference(dropout):
    """``fused_lora_linear`` on a dense base against ``fused_lora_reference`` (autograd through
    the unfused composition) with the same dropout mask, fwd and every gradient (fp32 1e-5)."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    base.requires_grad_(False)
    lora_a = (0.1 * torch.randn(R, IN)).requires_grad_()
    lora_b = (0.1 * torch.randn(OUT, R)).requires_grad_()
    x = torch.randn(3, 5, IN, requires_grad=True)
    grad_y = torch.randn(3, 5, OUT)
    torch.manual_seed(7)
    fused = fused_lora_linear(x, base, lora_a, lora_b, 0.75, dropout)
    fused_grads = torch.autograd.grad(fused, (x, lora_a, lora_b), grad_y)
    torch.manual_seed(7)  # the mask fused_lora_linear drew (torch.native_dropout, same RNG)
    mask = torch.native_dropout(x.detach(), dropout, True)[1] if dropout else None
    expected = fused_lora_reference(x, base.weight, base.bias, lora_a, lora_b, 0.75, mask, dropout)
    expected_grads = torch.autograd.grad(expected, (x, lora_a, lora_b), grad_y)
    assert_close_scaled(fused, expected, 1e-5, "output")
    for got, want in zip(fused_grads, expected_grads, strict=True):
        assert_close_scaled(got, want, 1e-5, "grad")

"""Fused linear cross-entropy against the plain full-logits computation.

Reference: ``F.linear(hidden, weight, bias).float()`` then ``F.cross_entropy`` (what a
transformers model does), forward and backward, on both implementations (Triton kernel under
TRITON_INTERPRET=1 on CPU, compiled on CUDA where a GPU is present). Shapes are odd on purpose: N=37 rows, H=65, V=1000, chunks of 8 rows
(the last chunk is partial). Tolerances: fp32 loss rtol=1e-5 (atol=1e-6 near zero), fp32
gradients rtol=1e-5 with atol at 1e-5 of the largest gradient entry (chunked sums add in
another order, which shows on entries that nearly cancel); bf16 loss
rtol=1e-2 and gradients rtol=5e-2 with atol at 2% of the largest gradient entry (the weight
gradient is summed per chunk in bf16, one rounding per chunk instead of one overall).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from accel_fused_ops.kernels.linear_cross_entropy import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_module,
)

N, H, V = 37, 65, 1000
CHUNK = 8
FP32 = {"rtol": 1e-5, "atol": 1e-6}


def make(dtype=torch.float32, *, bias=True, seed=0, n=N, v=V, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(device, dtype)
    weight = (torch.randn(v, H, generator=g) / H**0.5).to(device, dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(device, dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    labels[CHUNK : 2 * CHUNK] = -100  # one whole chunk ignored
    return hidden, weight, b, labels.to(device)


def reference_loss(hidden, weight, bias, labels, *, reduction="mean", num_items=None, softcap=None):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if num_items is not None:
        return F.cross_entropy(logits, labels, reduction="sum") / num_items
    return F.cross_entropy(logits, labels, reduction=reduction)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def compare(ours, ref, ours_inputs, ref_inputs, tol_loss, tol_grad=None):
    """Backward both with the same random grad_output and compare loss and every gradient."""
    go = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(ours.device)
    (ours * go).sum().backward()
    (ref * go).sum().backward()
    torch.testing.assert_close(ours, ref.to(ours.dtype), **tol_loss)
    for a, b in zip(ours_inputs, ref_inputs, strict=True):
        if b is None or not b.requires_grad:
            continue
        tol = (tol_grad or fp32_grad_tol)(b.grad)
        assert a.grad is not None and a.grad.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)


def fp32_grad_tol(grad):
    return {"rtol": 1e-5, "atol": 1e-5 * grad.float().abs().max().item()}


def bf16_grad_tol(grad):
    return {"rtol": 5e-2, "atol": 2e-2 * grad.float().abs().max().item()}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_full_logits(impl, device, dtype, reduction):
    inputs = make(dtype, device=device)
    ours_in, ref_in = leaves(*inputs[:3]), leaves(*inputs[:3])
    labels = inputs[3]
    h, w, b = ours_in
    ours = fused_linear_cross_entropy(h, w, labels, b, reduction=reduction, chunk_size=CHUNK)
    ref = reference_loss(*ref_in, labels, reduction=reduction)
    if dtype == torch.float32:
        compare(ours, ref, ours_in, ref_in, FP32)
    else:
        compare(ours, ref, ours_in, ref_in, {"rtol": 1e-2, "atol": 1e-2}, bf16_grad_tol)
    assert torch.all(ours_in[0].grad[labels == -100] == 0)


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 100, None])
def test_chunk_sizes(chunk_size):
    inputs = make()
    ours_in, ref_in = leaves(*inputs[:3]), leaves(*inputs[:3])
    h, w, b = ours_in
    ours = fused_linear_cross_entropy(h, w, inputs[3], b, softcap=3.0, chunk_size=chunk_size)
    ref = reference_loss(*ref_in, inputs[3], softcap=3.0)
    compare(ours, ref, ours_in, ref_in, FP32)


@pytest.mark.parametrize("num_items", [50, torch.tensor(50.0)], ids=["int", "tensor"])
def test_softcap_and_num_items(impl, device, num_items):
    inputs = make(bias=False, device=device)
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(device)
    ours_in, ref_in = leaves(*inputs[:2]), leaves(*inputs[:2])
    ours = fused_linear_cross_entropy(
        *ours_in, inputs[3], softcap=5.0, num_items_in_batch=num_items, chunk_size=CHUNK
    )
    ref = reference_loss(*ref_in, None, inputs[3], softcap=5.0, num_items=num_items)
    compare(ours, ref, ours_in, ref_in, FP32)


def test_frozen_weight(impl, device):
    hidden, weight, bias, labels = make(device=device)
    h_ours, h_ref = leaves(hidden, hidden)
    ours = fused_linear_cross_entropy(h_ours, weight, labels, bias, chunk_size=CHUNK)
    ref = reference_loss(h_ref, weight, bias, labels)
    compare(ours, ref, [h_ours], [h_ref], FP32)
    assert weight.grad is None and bias.grad is None


def test_only_weight_trainable():
    hidden, weight, _, labels = make(bias=False)
    w_ours, w_ref = leaves(weight, weight)
    ours = fused_linear_cross_entropy(hidden, w_ours, labels, chunk_size=CHUNK)
    ref = reference_loss(hidden, w_ref, None, labels)
    compare(ours, ref, [w_ours], [w_ref], FP32)


def test_tied_embedding():
    """lm_head weight shared with the input embedding: both gradient paths add up."""

    def run(fused):
        torch.manual_seed(0)
        emb = nn.Embedding(V, H)
        mix = nn.Linear(H, H)
        ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
        labels = torch.roll(ids, -1)
        labels[-1] = -100
        hidden = torch.tanh(mix(emb(ids)))
        if fused:
            loss = fused_linear_cross_entropy(hidden, emb.weight, labels, chunk_size=CHUNK)
        else:
            loss = reference_loss(hidden, emb.weight, None, labels)
        loss.backward()
        return loss.detach(), emb.weight.grad, mix.weight.grad

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, **FP32)


def test_all_labels_ignored(impl, device):
    hidden, weight, bias, labels = make(device=device)
    labels = torch.full_like(labels, -100)
    h, w = leaves(hidden, weight)
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=CHUNK)
    assert torch.isnan(loss)  # like torch's mean over zero tokens
    loss.backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)
    total = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")
    assert total.item() == 0.0


class _OpLog(TorchDispatchMode):
    """Every aten op run inside, with the shapes of the new tensors it allocated (outputs
    sharing an input's storage, such as detach or transpose, are views, not buffers)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else [out]
        flat = [*args, *(kwargs or {}).values()]
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        shapes = [
            tuple(t.shape)
            for t in outs
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
        ]
        self.ops.append((str(func.overloadpacket), shapes))
        return out

    def count(self, *names):
        return sum(name in names for name, _ in self.ops)

    def made(self, shape):
        return any(shape in shapes for _, shapes in self.ops)


def _logged(fn):
    with _OpLog() as log:
        loss = fn()
    return loss, log


@pytest.mark.parametrize("variant", ["linear", "module"])
def test_no_grad_forward(impl, device, variant):
    """Under no_grad, inputs requiring grad cost what frozen ones cost: no backward matmuls,
    no (V, H) weight-gradient buffer; observed from the aten ops actually run."""
    hidden, weight, bias, labels = make(device=device)
    h, w, b = leaves(hidden, weight, bias)
    head = nn.Linear(H, V).to(device)
    with torch.no_grad():
        head.weight.copy_(weight), head.bias.copy_(bias)

    def run():
        if variant == "linear":
            return fused_linear_cross_entropy(h, w, labels, b, chunk_size=CHUNK)
        return fused_linear_cross_entropy_module(h, head, labels, chunk_size=CHUNK)

    with torch.no_grad():
        loss, log = _logged(run)
    ref = reference_loss(hidden, weight, bias, labels)
    torch.testing.assert_close(loss, ref, **FP32)
    assert loss.grad_fn is None
    _, log_grad = _logged(run)
    matmuls = ("aten.mm", "aten.addmm", "aten.matmul", "aten.linear")
    assert log_grad.made((V, H)) and not log.made((V, H))
    n_chunks = -(-N // CHUNK)
    assert 0 < log.count(*matmuls) <= n_chunks < log_grad.count(*matmuls)


def test_autocast_bf16_matches_transformers_style():
    """fp32 model under CPU autocast: logits in bf16, loss in fp32, gradients in fp32."""
    hidden, weight, bias, labels = make()
    ours_in, ref_in = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, w, b = ours_in
        ours = fused_linear_cross_entropy(h, w, labels, b, chunk_size=CHUNK)
        ref = reference_loss(*ref_in, labels)
    compare(ours, ref, ours_in, ref_in, {"rtol": 1e-2, "atol": 1e-2}, bf16_grad_tol)


def test_second_backward_is_refused():
    hidden, weight, bias, labels = make()
    (h,) = leaves(hidden)
    loss = fused_linear_cross_entropy(h, weight, labels, chunk_size=CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_default_chunk_size():
    """Rows for full matmul speed, capped by the default budget; a given budget alone decides."""
    assert default_chunk_size(128_256, "cpu") == 512  # 512 rows x 128k fp32 = 250 MiB
    assert default_chunk_size(32_000, "cpu") == 512  # 64 MiB, not 2048 rows of a fixed 256
    assert default_chunk_size(262_144, "cpu") == 256  # the 256 MiB cap
    assert default_chunk_size(128_256, "cuda", torch.bfloat16) == 87  # 64 MiB: bf16 + fp32
    assert default_chunk_size(32_000, torch.device("cuda", 1)) == 256
    assert default_chunk_size(128_256, "cpu", memory_budget=8 << 20) == 16
    assert default_chunk_size(128_256, "cpu", n_rows=100) == 100
    assert default_chunk_size(1 << 30) == 1


def test_memory_budget_bounds_the_chunk(monkeypatch):
    """memory_budget picks the chunk rows of a trainable head; results do not depend on it
    (the frozen-head pass has its own test in test_linear_cross_entropy_online.py)."""
    hidden, weight, bias, labels = make()
    seen = []
    from accel_fused_ops.kernels import linear_cross_entropy as lce

    real = lce.cross_entropy_rows

    def spy(logits, *args, **kwargs):
        seen.append(logits.shape[0 if kwargs.get("class_dim", 1) == 1 else 1])  # rows
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(lce, "cross_entropy_rows", spy)
    h1, w1, h2, w2 = leaves(hidden, weight, hidden, weight)
    budget = 5 * V * 4  # five fp32 rows of logits
    a = fused_linear_cross_entropy(h1, w1, labels, bias, memory_budget=budget)
    b = fused_linear_cross_entropy(h2, w2, labels, bias, chunk_size=N)
    assert max(seen[:-1]) == 5 and seen[-1] == (labels != -100).sum()
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, **FP32)
    torch.testing.assert_close(h1.grad, h2.grad, **FP32)
    torch.testing.assert_close(w1.grad, w2.grad, **fp32_grad_tol(w2.grad))
    with pytest.raises(ValueError, match="not both"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4, memory_budget=budget)
    with pytest.raises(ValueError, match="memory_budget"):
        fused_linear_cross_entropy(hidden, weight, labels, memory_budget=0)


# ----------------------------------------------------------------------------- module variant


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_module_variant_plain_linear(impl, device, reduction):
    hidden, weight, bias, labels = make(device=device)
    lin_a, lin_b = nn.Linear(H, V, device=device), nn.Linear(H, V, device=device)
    for lin in (lin_a, lin_b):
        with torch.no_grad():
            lin.weight.copy_(weight)
            lin.bias.copy_(bias)
    h_ours, h_ref = leaves(hidden, hidden)
    ours = fused_linear_cross_entropy_module(
        h_ours, lin_a, labels, reduction=reduction, chunk_size=CHUNK
    )
    ref = reference_loss(h_ref, lin_b.weight, lin_b.bias, labels, reduction=reduction)
    compare(ours, ref, [h_ours, lin_a.weight, lin_a.bias], [h_ref, lin_b.weight, lin_b.bias], FP32)


def _lora_head(seed: int, dropout: float = 0.0, device="cpu"):
    from peft import LoraConfig, get_peft_model

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(H, V, bias=False)

        def forward(self, x):
            return self.lm_head(x)

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["lm_head"], init_lora_weights=False
    )
    model = get_peft_model(Head(), config)
    return model.base_model.model.lm_head.to(device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_variant_peft_lora(impl, device, reduction):
    """A real PEFT LoRA lm_head: frozen base weight, gradients only for lora_A / lora_B."""
    hidden, _, _, labels = make(device=device)
    head_ours, head_ref = _lora_head(0, device=device), _lora_head(0, device=device)
    trainable = [n for n, p in head_ours.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["lora_A.default.weight", "lora_B.default.weight"]
    h_ours, h_ref = leaves(hidden, hidden)
    ours = fused_linear_cross_entropy_module(
        h_ours, head_ours, labels, reduction=reduction, chunk_size=CHUNK
    )
    logits = head_ref(h_ref).float()
    ref = F.cross_entropy(logits, labels, reduction=reduction)
    ours_params = [p for p in head_ours.parameters() if p.requires_grad]
    ref_params = [p for p in head_ref.parameters() if p.requires_grad]
    compare(ours, ref, [h_ours, *ours_params], [h_ref, *ref_params], FP32)
    assert head_ours.base_layer.weight.grad is None


def test_module_variant_dropout_replayed_for_none_reduction():
    """With LoRA dropout, reduction='none' recomputes in backward with the forward's RNG: its
    gradients equal those of reduction='sum', which are computed during forward."""
    hidden, _, _, labels = make()
    results = []
    for reduction in ("none", "sum"):
        head = _lora_head(0, dropout=0.5)
        head.train()
        (h,) = leaves(hidden)
        torch.manual_seed(123)
        loss = fused_linear_cross_entropy_module(
            h, head, labels, reduction=reduction, chunk_size=CHUNK
        )
        torch.manual_seed(999)  # backward must not depend on the RNG state at that time
        loss.sum().backward()
        results.append((loss.sum().detach(), h.grad, head.lora_A.default.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **FP32)


def test_module_variant_callable_needs_params():
    hidden, weight, _, labels = make()
    w = weight.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="params is required"):
        fused_linear_cross_entropy_module(hidden, lambda x: x @ w.t(), labels)
    (w_ref,) = leaves(weight)
    ours = fused_linear_cross_entropy_module(
        hidden, lambda x: x @ w.t(), labels, params=[w], chunk_size=CHUNK
    )
    ref = reference_loss(hidden, w_ref, None, labels)
    compare(ours, ref, [w], [w_ref], FP32)


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments(monkeypatch):
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    hidden, weight, bias, labels = make()
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 65\)"):
        fused_linear_cross_entropy(hidden, weight[:, :10], labels)
    with pytest.raises(ValueError, match=r"bias must have shape \(1000,\)"):
        fused_linear_cross_entropy(hidden, weight, labels, bias[:5])
    with pytest.raises(TypeError, match="hidden is torch.bfloat16 but weight is torch.float32"):
        fused_linear_cross_entropy(hidden.bfloat16(), weight, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="2-D"):
        fused_linear_cross_entropy(hidden.unsqueeze(0), weight, labels)
    with pytest.raises(ValueError, match="reduction='none'"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="none", num_items_in_batch=3)
    bad = labels.clone()
    bad[3] = V + 7
    with pytest.raises(ValueError, match="1007, outside the vocabulary"):
        fused_linear_cross_entropy(hidden, weight, bad)


@pytest.mark.parametrize("bad", [V, -1])
def test_out_of_range_label(impl, device, bad):
    """Both paths and both variants refuse a label outside [0, V) with the same message."""
    hidden, weight, bias, labels = make(device=device)
    labels[5] = bad
    with pytest.raises(ValueError, match=f"labels contain {bad}, outside the vocabulary"):
        fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=CHUNK)
    head = nn.Linear(H, V).to(device)
    with pytest.raises(ValueError, match=f"labels contain {bad}, outside the vocabulary"):
        fused_linear_cross_entropy_module(hidden, head, labels, chunk_size=CHUNK)

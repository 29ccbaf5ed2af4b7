"""``return_predicted_tokens`` (cross_entropy and the fused linear cross-entropy) and
``use_token_scaling`` (the fused linear cross-entropy), against PyTorch references built from
the full logits.

Predicted tokens: ``torch.argmax`` of the (soft-capped) fp32 logits, -1 for ignored rows,
compared exactly, with ties inside a vocabulary block and across blocks (first index wins).
Token scaling: ``F.cross_entropy(..., reduction="none")`` plus the z-loss, times the detached
probability of the label, then reduced; forward and backward (hidden, weight, bias) with a
random upstream gradient for ``"none"``. Every path: the Triton kernel (interpreter on CPU)
and the PyTorch chunked path for a trainable head, the streaming pass for a frozen one, and
the module variant. Odd shapes: 37 rows (every 5th ignored), vocabulary 1003, hidden 23.
Tolerances: fp32 rtol 1e-5, atol 1e-6 (reduction order only); bf16 head: loss and gradients
rtol 2e-2, atol 1e-4 (the bf16 logits of the fused GEMM and of ``F.linear`` may differ by a
rounding, which the label's probability amplifies, and the logits gradient is rounded once).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel_fused_ops.kernels.cross_entropy import LossOutput, cross_entropy
from accel_fused_ops.kernels.linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_module,
)

N, V, H = 37, 1003, 23
FP32 = {"rtol": 1e-5, "atol": 1e-6}
BF16 = {"rtol": 2e-2, "atol": 1e-4}


def _labels(n=N, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return labels


def expected_tokens(logits, labels, softcap=None):
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.where(labels == -100, -1, z.argmax(1))


def _with_ties(logits: torch.Tensor) -> torch.Tensor:
    """Rows 1 and 2 get their maximum twice: in one block (7, 300) and far apart (9, 950)."""
    logits = logits.clone()
    top = logits.abs().max() + 1.0
    logits[1, 7] = logits[1, 300] = top
    logits[2, 9] = logits[2, 950] = top
    return logits


# ------------------------------------------------------------------------ cross_entropy


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_predicted_tokens(impl, device, dtype, softcap, reduction):
    g = torch.Generator().manual_seed(1)
    logits = _with_ties(torch.randn(N, V, generator=g) * 3).to(dtype).to(device)
    labels = _labels().to(device)
    x = logits.clone().requires_grad_()
    out = cross_entropy(
        x, labels, softcap=softcap, reduction=reduction, return_predicted_tokens=True
    )
    assert isinstance(out, LossOutput) and out.z_loss is None and out.token_accuracy is None
    assert out.predicted_tokens.dtype == torch.int64
    assert not out.predicted_tokens.requires_grad
    assert torch.equal(out.predicted_tokens, expected_tokens(logits, labels, softcap))
    assert out.predicted_tokens[1] == 7 or labels[1] == -100
    # The loss and gradient are the ones computed without the option.
    y = logits.clone().requires_grad_()
    plain = cross_entropy(y, labels, softcap=softcap, reduction=reduction)
    torch.testing.assert_close(out.loss, plain, rtol=0, atol=0)
    upstream = torch.randn(plain.shape, generator=g).to(device)
    out.loss.backward(upstream)
    plain.backward(upstream)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


def test_cross_entropy_predicted_tokens_across_triton_blocks(impl, device):
    # 5000 classes: two blocks of 4096 in the kernel; the tie spans them.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5000, generator=g)
    logits[0, 4500] = 9.0  # the maximum sits in the second block
    logits[1, 100] = logits[1, 4200] = 9.0  # a tie across blocks
    logits, labels = logits.to(device), torch.tensor([1, 2, -100], device=device)
    out = cross_entropy(logits, labels, return_predicted_tokens=True, return_token_accuracy=True)
    assert out.predicted_tokens.tolist() == [4500, 100, -1]
    assert out.token_accuracy.item() == 0.0


# --------------------------------------------------------------- fused linear cross-entropy


def _head(dtype, device, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    # Exact ties: rows 5 and 900 of the head are equal and row 3's logit there is the maximum.
    weight[900] = weight[5] = hidden[3] * 2.0
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    if b is not None:
        b[900] = b[5]
    cast = lambda t: t.to(dtype).to(device) if t is not None else None  # noqa: E731
    return cast(hidden), cast(weight), cast(b)


def _logits(hidden, weight, bias):
    return F.linear(hidden, weight, bias)


PATHS = ["trainable", "frozen", "module"]


def _run_linear(path, hidden, weight, bias, labels, **kw):
    """The fused loss on a trainable head, a frozen head (streaming pass on the PyTorch path)
    or through the module entry point; the tensors whose gradients are checked."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(path != "frozen")
    b = bias.detach().clone().requires_grad_(path != "frozen") if bias is not None else None
    if path == "module":
        lin = torch.nn.Linear(H, V, bias=b is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        out = fused_linear_cross_entropy_module(h, lin, labels, chunk_size=16, **kw)
        return out, [h, lin.weight, lin.bias] if b is not None else [h, lin.weight]
    out = fused_linear_cross_entropy(h, w, labels, b, chunk_size=16, **kw)
    return out, [t for t in (h, w, b) if t is not None and t.requires_grad]


@pytest.mark.parametrize("path", PATHS)
def test_linear_predicted_tokens(impl, device, path):
    hidden, weight, bias = _head(torch.float32, device)
    labels = _labels().to(device)
    labels[3] = 11  # a row with the tie is not ignored
    out, _ = _run_linear(path, hidden, weight, bias, labels, return_predicted_tokens=True)
    expected = expected_tokens(_logits(hidden, weight, bias), labels)
    assert expected[3] == 5
    assert torch.equal(out.predicted_tokens, expected)
    plain, _ = _run_linear(path, hidden, weight, bias, labels)
    torch.testing.assert_close(out.loss, plain, rtol=0, atol=0)


def test_linear_predicted_tokens_across_streaming_blocks(device, monkeypatch):
    # The frozen-head streaming pass with 128-column blocks: the tie (5, 900) spans blocks.
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    hidden, weight, bias = _head(torch.float32, device)
    labels = _labels().to(device)
    out = fused_linear_cross_entropy(
        hidden, weight, labels, bias, memory_budget=N * 4 * 128,
        return_predicted_tokens=True, return_token_accuracy=True,
    )  # fmt: skip
    expected = expected_tokens(_logits(hidden, weight, bias), labels)
    assert torch.equal(out.predicted_tokens, expected)
    valid = labels != -100
    torch.testing.assert_close(
        out.token_accuracy, (expected == labels)[valid].float().mean(), rtol=0, atol=0
    )


def scaled_reference(logits, labels, reduction, *, weight=None, label_smoothing=0.0, s_z=0.0):
    """Per-token CE (+ z-loss) times the detached probability of the label, then reduced."""
    z = logits.float()
    valid = labels != -100
    ce = F.cross_entropy(
        z, labels, weight=weight, label_smoothing=label_smoothing, reduction="none"
    )
    lse = torch.logsumexp(z, 1)
    zl = torch.where(valid, s_z * lse * lse, 0.0)
    p = torch.softmax(z.detach(), 1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    p = torch.where(valid, p, 0.0)
    rows, z_rows = (ce + zl) * p, zl * p
    if reduction == "none":
        return rows, z_rows
    if reduction == "sum":
        return rows.sum(), z_rows.sum()
    safe = labels.clamp(min=0)
    denom = weight[safe][valid].sum() if weight is not None else valid.sum()
    return (ce * p).sum() / denom + z_rows.sum() / valid.sum(), z_rows.sum() / valid.sum()


SCALING_CASES = [
    pytest.param("sum", {}, id="sum"),
    pytest.param("mean", {"label_smoothing": 0.1, "lse_square_scale": 1e-2}, id="mean-ls-z"),
    pytest.param("none", {"class_weight": True}, id="none-weight"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("reduction", "case"), SCALING_CASES)
def test_linear_token_scaling(impl, device, dtype, path, reduction, case):
    if dtype == torch.bfloat16 and reduction != "mean":
        pytest.skip("bf16 runs one case per path")
    hidden, weight, bias = _head(dtype, device, seed=3)
    labels = _labels(seed=3).to(device)
    kw = dict(case)
    class_weight = None
    if kw.pop("class_weight", False):
        class_weight = (torch.rand(V, generator=torch.Generator().manual_seed(4)) + 0.5).to(device)
        kw["class_weight"] = class_weight
    s_z = kw.get("lse_square_scale", 0.0)
    out, params = _run_linear(
        path, hidden, weight, bias, labels, reduction=reduction, use_token_scaling=True,
        return_z_loss=True, **kw,
    )  # fmt: skip
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    h, w = ref_params[0], ref_params[1] if len(ref_params) > 1 else weight
    b = ref_params[2] if len(ref_params) > 2 else bias
    exp_loss, exp_z = scaled_reference(
        _logits(h, w, b), labels, reduction, weight=class_weight,
        label_smoothing=kw.get("label_smoothing", 0.0), s_z=s_z,
    )  # fmt: skip
    tol = FP32 if dtype == torch.float32 else BF16
    torch.testing.assert_close(out.loss, exp_loss, **tol)
    torch.testing.assert_close(out.z_loss, exp_z, **tol)
    upstream = torch.randn(exp_loss.shape, generator=torch.Generator().manual_seed(5))
    upstream = upstream.to(device)
    grads = torch.autograd.grad(out.loss, params, upstream)
    exp_grads = torch.autograd.grad(exp_loss, ref_params, upstream)
    for got, want in zip(grads, exp_grads, strict=True):
        torch.testing.assert_close(got, want.to(got.dtype), **tol)


def test_token_scaling_changes_only_what_it_should(device, monkeypatch):
    # Without the option the loss is the plain one; with it, ignored rows stay at 0 loss and
    # 0 gradient and every other row's loss shrinks by its label's probability (< 1).
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    hidden, weight, bias = _head(torch.float32, device, seed=6)
    labels = _labels(seed=6).to(device)
    h = hidden.clone().requires_grad_()
    rows = fused_linear_cross_entropy(h, weight, labels, bias, reduction="none")
    scaled = fused_linear_cross_entropy(
        h, weight, labels, bias, reduction="none", use_token_scaling=True
    )
    ignored = labels == -100
    assert torch.all(scaled[ignored] == 0) and torch.all(rows[ignored] == 0)
    assert torch.all(scaled[~ignored] < rows[~ignored])
    (grad,) = torch.autograd.grad(scaled.sum(), h)
    assert torch.all(grad[ignored] == 0) and torch.isfinite(grad).all()

"""Label smoothing, class weights, z-loss and token accuracy of cross_entropy and of the fused
linear cross-entropy, against ``torch.nn.functional.cross_entropy`` plus the z-loss formula.

Both implementations (``impl`` fixture: the Triton kernel under ``TRITON_INTERPRET=1`` on CPU,
and the PyTorch path) on odd shapes (37 rows, 129 classes, every 5th row ignored), forward and
backward with a random upstream gradient. Tolerances: fp32 rtol 1e-5, atol 1e-6 (reduction
order only); bf16 logits: loss rtol 1e-5 (fp32 on both sides from the same values), gradient
rtol 2e-2 (one bf16 rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel_fused_ops.kernels.cross_entropy import LossOutput, cross_entropy
from accel_fused_ops.kernels.linear_cross_entropy import fused_linear_cross_entropy

N, V, H = 37, 129, 23
FP32 = {"rtol": 1e-5, "atol": 1e-6}
BF16_LOSS = {"rtol": 1e-5, "atol": 1e-5}
BF16_GRAD = {"rtol": 2e-2, "atol": 1e-5}


def reference(
    logits,
    labels,
    *,
    reduction="mean",
    weight=None,
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    num_items=None,
    ignore_index=-100,
):
    """torch's cross-entropy on the fp32 logits, plus the z-loss, and the token accuracy."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != ignore_index
    n_valid = valid.sum()
    kw = {"weight": weight, "label_smoothing": label_smoothing, "ignore_index": ignore_index}
    zl_rows = torch.where(valid, lse_square_scale * torch.logsumexp(z, 1) ** 2, 0.0)
    correct = (z.argmax(1) == labels) & valid
    if num_items is not None:
        ce = F.cross_entropy(z, labels, reduction="sum", **kw) / num_items
        zl = zl_rows.sum() / num_items
    elif reduction == "none":
        ce, zl = F.cross_entropy(z, labels, reduction="none", **kw), zl_rows
    else:
        ce = F.cross_entropy(z, labels, reduction=reduction, **kw)
        zl = zl_rows.sum() / (n_valid if reduction == "mean" else 1)
    acc = correct.float() if reduction == "none" else correct.sum() / n_valid
    return ce + zl, zl, acc


def make_inputs(dtype, device, n=N, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    weight = torch.rand(v, generator=g) + 0.25
    return logits.to(device), labels.to(device), weight.to(device)


CASES = [
    pytest.param({"label_smoothing": 0.1}, id="smoothing"),
    pytest.param({"weight": True}, id="weight"),
    pytest.param({"weight": True, "label_smoothing": 0.25}, id="weight+smoothing"),
    pytest.param({"lse_square_scale": 1e-2}, id="zloss"),
    pytest.param({"lse_square_scale": 1e-3, "weight": True, "softcap": 4.0}, id="zloss+w+cap"),
    pytest.param({"label_smoothing": 0.1, "softcap": 4.0, "lse_square_scale": 1e-3}, id="all"),
]


def _kwargs(case, weight):
    kw = dict(case)
    if kw.pop("weight", False):
        kw["weight"] = weight
    return kw


def _combos(*extra):
    """Every case with mean and none in fp32, plus the listed (case id, reduction, dtype)."""
    ids = {p.id: p.values[0] for p in CASES}
    combos = [
        pytest.param(ids[i], r, torch.float32, id=f"{i}-{r}-fp32")
        for i in ids
        for r in ("mean", "none")
    ]
    for i, r, d in extra:
        combos.append(pytest.param(ids[i], r, d, id=f"{i}-{r}-{str(d)[6:]}"))
    return combos


CE_COMBOS = _combos(
    ("all", "sum", torch.float32),
    ("all", "mean", torch.bfloat16),
    ("weight+smoothing", "none", torch.bfloat16),
)


@pytest.mark.parametrize(("case", "reduction", "dtype"), CE_COMBOS)
def test_cross_entropy_options(impl, device, dtype, case, reduction):
    logits, labels, weight = make_inputs(dtype, device)
    kw = _kwargs(case, weight)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    out = cross_entropy(
        x1, labels, reduction=reduction, return_z_loss=True, return_token_accuracy=True, **kw
    )
    assert isinstance(out, LossOutput)
    ref, ref_z, ref_acc = reference(x2, labels, reduction=reduction, **kw)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (out.loss * go).sum().backward()
    (ref * go).sum().backward()
    loss_tol, grad_tol = (FP32, FP32) if dtype == torch.float32 else (BF16_LOSS, BF16_GRAD)
    torch.testing.assert_close(out.loss, ref, **loss_tol)
    torch.testing.assert_close(out.z_loss, ref_z.detach(), **loss_tol)
    torch.testing.assert_close(out.token_accuracy, ref_acc, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), **grad_tol)
    assert torch.all(x1.grad[labels == -100] == 0)
    assert not out.z_loss.requires_grad and not out.token_accuracy.requires_grad


def test_num_items_with_options(impl, device):
    logits, labels, weight = make_inputs(torch.float32, device)
    kw = {"label_smoothing": 0.2, "lse_square_scale": 1e-2, "weight": weight}
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ours = cross_entropy(x1, labels, num_items_in_batch=50, **kw)
    ref, _, _ = reference(x2, labels, num_items=50, **kw)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, **FP32)
    torch.testing.assert_close(x1.grad, x2.grad, **FP32)


def test_accuracy_ties_take_the_first_index(impl, device):
    """argmax over equal maxima is the first index, as torch.argmax, across Triton blocks."""
    logits = torch.zeros(3, V, device=device)
    logits[:, [5, 70, 128]] = 2.0
    labels = torch.tensor([5, 70, -100], device=device)
    out = cross_entropy(logits, labels, return_token_accuracy=True, reduction="none")
    assert out.token_accuracy.tolist() == [1.0, 0.0, 0.0]
    assert out.z_loss is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"label_smoothing": True}, TypeError, "label_smoothing"),
        ({"lse_square_scale": -1.0}, ValueError, "lse_square_scale"),
        ({"weight": torch.ones(V - 1)}, ValueError, "one weight per class"),
        ({"weight": torch.ones(V, dtype=torch.long)}, TypeError, "weight"),
    ],
)
def test_bad_option_values(kwargs, error, match):
    logits, labels, _ = make_inputs(torch.float32, "cpu")
    with pytest.raises(error, match=match):
        cross_entropy(logits, labels, **kwargs)


# ------------------------------------------------------------------ fused linear cross-entropy


def linear_inputs(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device, dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(device, dtype)
    b = torch.randn(V, generator=g).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    weight = (torch.rand(V, generator=g) + 0.25).to(device)
    return hidden, w, b, labels.to(device), weight


LINEAR_COMBOS = [pytest.param(c.values[0], "mean", id=f"{c.id}-mean") for c in CASES] + [
    pytest.param(CASES[-1].values[0], "none", id="all-none"),
    pytest.param(CASES[-2].values[0], "none", id="zloss+w+cap-none"),
    pytest.param(CASES[1].values[0], "sum", id="weight-sum"),
]


@pytest.mark.parametrize(("case", "reduction"), LINEAR_COMBOS)
def test_linear_options(impl, device, case, reduction):
    hidden, w, b, labels, weight = linear_inputs(device)
    kw = _kwargs(case, weight)
    lin_kw = {("class_weight" if k == "weight" else k): v for k, v in kw.items()}
    leaves = [t.clone().requires_grad_(True) for t in (hidden, w, b)]
    refs = [t.clone().requires_grad_(True) for t in (hidden, w, b)]
    out = fused_linear_cross_entropy(
        leaves[0],
        leaves[1],
        labels,
        leaves[2],
        reduction=reduction,
        chunk_size=8,
        return_z_loss=True,
        return_token_accuracy=True,
        **lin_kw,
    )
    ref, ref_z, ref_acc = reference(
        F.linear(refs[0], refs[1], refs[2]), labels, reduction=reduction, **kw
    )
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (out.loss * go).sum().backward()
    (ref * go).sum().backward()
    torch.testing.assert_close(out.loss, ref, **FP32)
    torch.testing.assert_close(out.z_loss, ref_z.detach(), **FP32)
    torch.testing.assert_close(out.token_accuracy, ref_acc, rtol=0, atol=0)
    for ours, theirs, name in zip(leaves, refs, ("hidden", "weight", "bias"), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, **FP32, msg=name)


def test_linear_weight_grad_accumulation_dtype():
    """bf16 lm_head in one-row chunks: with accum_dtype=fp32 the weight gradient is the
    one-chunk result up to one bf16 rounding (rtol 1e-2 of the largest entry); summed in bf16
    (the default) it carries one rounding per chunk and is further off."""
    hidden, w, _, labels, _ = linear_inputs("cpu", torch.bfloat16)

    def weight_grad(chunk_size, accum):
        ww = w.clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(
            hidden, ww, labels, chunk_size=chunk_size, reduction="sum", accum_dtype=accum
        )
        loss.backward()
        assert ww.grad.dtype == torch.bfloat16
        return ww.grad.double()

    whole = weight_grad(N, torch.float32)
    err = {
        a: (weight_grad(1, a) - whole).abs().max() / whole.abs().max()
        for a in (torch.float32, None)
    }
    assert err[torch.float32] < 1e-2
    assert err[torch.float32] < 0.5 * err[None], err
    with pytest.raises(TypeError, match="accum_dtype"):
        fused_linear_cross_entropy(hidden, w, labels, accum_dtype=torch.int32)


@pytest.mark.parametrize("case", CASES[-2:])
def test_torch_transposed_layout_matches_rows(case):
    """class_dim=0 ((V, N) logits, what the CPU fused linear path computes) equals the row
    layout, loss terms and gradient (fp32 tolerance)."""
    from accel_fused_ops.kernels.cross_entropy import _ce_rows_torch

    logits, labels, weight = make_inputs(torch.float32, "cpu")
    kw = _kwargs(case, weight)
    kw.pop("softcap", None)
    softcap = case.get("softcap")
    scale = torch.linspace(0.5, 2.0, N)
    g_rows, g_cols = torch.empty_like(logits), torch.empty(V, N)
    common = {"want_z": True, "want_correct": True, "z_grad_scale": scale.flip(0), **kw}
    a = _ce_rows_torch(logits, labels, -100, softcap, scale, g_rows, **common)
    b = _ce_rows_torch(
        logits.t().contiguous(), labels, -100, softcap, scale, g_cols, class_dim=0, **common
    )
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, **FP32)
    torch.testing.assert_close(g_cols.t(), g_rows, **FP32)

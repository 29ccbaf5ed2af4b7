"""The frozen-head streaming pass of the fused linear cross-entropy (PyTorch path).

Against ``F.linear`` + ``F.cross_entropy`` + the z-loss formula (``test_loss_options.reference``)
on odd shapes: 37 rows (every 5th ignored), H=23, V=129 streamed in blocks of 50 columns (the
last one partial) and passes of 8 rows (the last one partial), forward and backward with a
random upstream gradient. Tolerances: fp32 loss rtol 1e-5 / atol 1e-6 and hidden gradient
rtol 1e-5 with atol at 1e-5 of its largest entry (the online rescaling sums in another order);
bf16: loss rtol 1e-2, gradient rtol 5e-2 with atol at 2% of the largest entry (the reference
rounds its logits gradient to bf16, the streaming pass rounds the probabilities and each
block's product). The sharp-logits case also runs fp16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_loss_options import CASES, _kwargs, linear_inputs, reference

from accel_fused_ops.kernels import linear_cross_entropy as lce
from accel_fused_ops.kernels import linear_cross_entropy_online as online
from accel_fused_ops.kernels.linear_cross_entropy import fused_linear_cross_entropy

N, V, H = 37, 129, 23
ROWS, BLOCK = 8, 50
FP32 = {"rtol": 1e-5, "atol": 1e-6}

NO_SOFTCAP = [c for c in CASES if "softcap" not in c.values[0]]


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocabulary blocks of 50 columns for 8-row passes (default budget is 32 MiB)."""
    monkeypatch.setattr(online, "ONLINE_BLOCK_BYTES", ROWS * BLOCK * 4)


@pytest.fixture
def calls(monkeypatch):
    """Which pass ran: the streaming ``online_rows`` or the chunked ``cross_entropy_rows``."""
    seen = {"online": [], "chunked": 0}
    real_online, real_rows = lce.online_rows, lce.cross_entropy_rows

    def spy_online(hidden, labels, weight, bias, class_weight, opts, dtype, block, **kw):
        seen["online"].append((hidden.shape[0], block))
        return real_online(hidden, labels, weight, bias, class_weight, opts, dtype, block, **kw)

    def spy_rows(*args, **kwargs):
        seen["chunked"] += 1
        return real_rows(*args, **kwargs)

    monkeypatch.setattr(lce, "online_rows", spy_online)
    monkeypatch.setattr(lce, "cross_entropy_rows", spy_rows)
    return seen


def _run(hidden, w, b, labels, kw, reduction, **options):
    lin_kw = {("class_weight" if k == "weight" else k): v for k, v in kw.items()}
    return fused_linear_cross_entropy(
        hidden,
        w,
        labels,
        b,
        reduction=reduction,
        return_z_loss=True,
        return_token_accuracy=True,
        **lin_kw,
        **options,
    )


def _check(dtype, case, reduction, *, bias=True, sharp=1.0, **options):
    hidden, w, b, labels, weight = linear_inputs("cpu", dtype)
    hidden = (hidden.float() * sharp).to(dtype)
    b = b if bias else None
    kw = _kwargs(case, weight)
    h_ours, h_ref = (hidden.clone().requires_grad_(True) for _ in range(2))
    out = _run(h_ours, w, b, labels, kw, reduction, **options)
    ref, ref_z, ref_acc = reference(F.linear(h_ref, w, b), labels, reduction=reduction, **kw)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    (out.loss * go).sum().backward()
    (ref * go).sum().backward()
    if dtype == torch.float32:
        loss_tol = FP32
        grad_tol = {"rtol": 1e-5, "atol": 1e-5 * h_ref.grad.abs().max().item()}
    else:
        loss_tol = {"rtol": 1e-2, "atol": 1e-2}
        grad_tol = {"rtol": 5e-2, "atol": 2e-2 * h_ref.grad.float().abs().max().item()}
    torch.testing.assert_close(out.loss, ref, **loss_tol)
    torch.testing.assert_close(out.z_loss, ref_z.detach(), **loss_tol)
    if dtype == torch.float32:
        torch.testing.assert_close(out.token_accuracy, ref_acc, rtol=0, atol=0)
    assert h_ours.grad.dtype == dtype
    torch.testing.assert_close(h_ours.grad.float(), h_ref.grad.float(), **grad_tol)
    assert w.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", [pytest.param({}, id="plain"), *NO_SOFTCAP])
def test_options_fp32(small_blocks, calls, monkeypatch, case, reduction):
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    _check(torch.float32, case, reduction, chunk_size=ROWS)
    # 29 valid rows: passes of 8, 8, 8 and 5 (forward, and backward's recompute for "none")
    assert {r for r, _ in calls["online"]} == {8, 5} and calls["chunked"] == 0
    assert {blk for _, blk in calls["online"]} == {BLOCK}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3]])  # weight+smoothing, zloss
def test_options_bf16(small_blocks, calls, monkeypatch, case, reduction):
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    _check(torch.bfloat16, case, reduction, chunk_size=ROWS)
    assert calls["online"] and calls["chunked"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_bias_and_sharp_logits(small_blocks, monkeypatch, dtype):
    """Logits scaled x30: the running maximum moves between blocks by tens, and the rescaled
    sums must still match (exp would overflow without the rescaling)."""
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    _check(dtype, {"label_smoothing": 0.1}, "mean", bias=False, sharp=30.0, chunk_size=5)


def test_autocast_bf16_frozen_head(calls):
    """fp32 frozen head under CPU autocast: logits rounded to bf16 like nn.Linear's."""
    hidden, w, b, labels, _ = linear_inputs("cpu")
    h_ours, h_ref = (hidden.clone().requires_grad_(True) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_linear_cross_entropy(h_ours, w, labels, b)
        ref = F.cross_entropy(F.linear(h_ref, w, b).float(), labels)
    ours.backward()
    ref.backward()
    assert calls["online"] and calls["chunked"] == 0
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)
    assert h_ours.grad.dtype == torch.float32
    tol = 2e-2 * h_ref.grad.abs().max().item()
    torch.testing.assert_close(h_ours.grad, h_ref.grad, rtol=5e-2, atol=tol)


def test_accuracy_ties_across_blocks_take_the_first_index(small_blocks, monkeypatch):
    """Classes 10 and 60 (blocks 0 and 1) have equal weight rows, so equal logits; argmax is
    10, as torch's, whichever block holds the label."""
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    hidden, w, _, labels, _ = linear_inputs("cpu")
    w = w.clone()
    w[10] = w[60] = hidden[0] * 10  # the largest logit of row 0
    labels = labels.clone()
    labels[0] = 10
    labels[1] = 60
    hidden[1] = hidden[0]
    out = fused_linear_cross_entropy(
        hidden, w, labels, reduction="none", return_token_accuracy=True, chunk_size=ROWS
    )
    assert out.token_accuracy[0] == 1.0 and out.token_accuracy[1] == 0.0
    ref = (F.linear(hidden, w).argmax(1) == labels).float()
    torch.testing.assert_close(out.token_accuracy[labels != -100], ref[labels != -100])


def test_routing(calls, monkeypatch):
    """Frozen head on the PyTorch path streams; a trainable head or a soft-cap is chunked."""
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    hidden, w, b, labels, _ = linear_inputs("cpu")
    fused_linear_cross_entropy(hidden, w, labels, b)
    assert len(calls["online"]) == 1 and calls["chunked"] == 0
    fused_linear_cross_entropy(hidden, w.clone().requires_grad_(True), labels, b)
    fused_linear_cross_entropy(hidden, w, labels, b.clone().requires_grad_(True))
    fused_linear_cross_entropy(hidden, w, labels, b, softcap=4.0)
    assert len(calls["online"]) == 1 and calls["chunked"] == 3


def test_memory_budget_bounds_the_block(calls, monkeypatch):
    """memory_budget bounds rows x block fp32 logits; results do not depend on it."""
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    hidden, w, b, labels, _ = linear_inputs("cpu")
    h1, h2 = (hidden.clone().requires_grad_(True) for _ in range(2))
    small = fused_linear_cross_entropy(h1, w, labels, b, memory_budget=5 * V * 4)
    whole = fused_linear_cross_entropy(h2, w, labels, b)
    small.backward()
    whole.backward()
    assert calls["online"][0] == (5, V) and calls["online"][-1] == (29, V)  # 29 valid rows
    torch.testing.assert_close(small, whole, **FP32)
    torch.testing.assert_close(h1.grad, h2.grad, **FP32)


def test_online_plan():
    """Rows and vocabulary block for the budgets a user meets (fp32 logits; half precision
    takes 6 bytes a logit: the GEMM output and its fp32 copy)."""
    assert online.logit_bytes(torch.float32) == 4 and online.logit_bytes(torch.bfloat16) == 6
    assert online.online_plan(2048, 131072, bytes_per_logit=6) == (2048, 2730)
    assert online.online_plan(8192, 131072) == (4096, 2048)  # 32 MiB blocks
    assert online.online_plan(512, 131072) == (512, 16384)
    assert online.online_plan(4096, 131072, memory_budget=8 << 20) == (4096, 512)
    # a block under 256 columns gives up rows instead
    assert online.online_plan(4096, 131072, memory_budget=1 << 20) == (1024, 256)
    assert online.online_plan(37, 129, chunk_size=8) == (8, 129)
    assert online.online_plan(37, 129, memory_budget=100) == (1, 25)

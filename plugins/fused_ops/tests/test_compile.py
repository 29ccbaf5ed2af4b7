"""A fully patched tiny Llama runs forward and backward under ``torch.compile`` on CPU.

The ``aot_eager`` backend runs what the patches can break — Dynamo tracing of the instance
forwards, the swapped ``apply_rotary_pos_emb`` and the autograd Functions, and AOTAutograd's
joint forward/backward graphs — without Inductor's C++ code generation, which alone takes
about 90 s for this model on a 2-core machine. Loss and gradients must equal the eager
patched model's (rtol 1e-5, atol 1e-6).

The loss path alone compiles with ``fullgraph=True`` (no graph break): the label-range check
and the ignored-row count are host syncs that are skipped while Dynamo traces (ignored rows
then go through the kernel with zero loss and gradient; an out-of-range label gives NaN).
Tolerances as above.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import batches, tiny_model

from accel import apply_patches
from accel_fused_ops.config import FusedOpsConfig
from accel_fused_ops.kernels.cross_entropy import cross_entropy
from accel_fused_ops.kernels.linear_cross_entropy import fused_linear_cross_entropy
from accel_fused_ops.rules import build_rules

SETTINGS = FusedOpsConfig(
    fast_loss=True, fast_rms_layernorm=True, fast_rope_embeddings=True, fast_swiglu=True
)


def test_patched_llama_forward_backward_under_torch_compile():
    batch = batches(1)[0]
    model = tiny_model("llama")
    applied = apply_patches(model, build_rules(SETTINGS, model))
    try:
        model.train()
        eager = model(**batch)
        eager.loss.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)

        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        out = compiled(**batch)
        out.loss.backward()
        assert out.logits is None  # still the fused linear cross-entropy path
        torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    finally:
        applied.revert()
        torch._dynamo.reset()


TOL = {"rtol": 1e-5, "atol": 1e-6}


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 23, generator=g)
    weight = torch.randn(129, 23, generator=g) / 23**0.5
    labels = torch.randint(0, 129, (37,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels


@pytest.fixture
def torch_path(monkeypatch):
    """The PyTorch implementation (the Triton interpreter does not trace)."""
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "torch")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_cross_entropy_options_compile_fullgraph(torch_path):
    hidden, weight, labels = _inputs()
    logits = hidden @ weight.t()

    def loss(x, y):
        out = cross_entropy(
            x,
            y,
            label_smoothing=0.1,
            lse_square_scale=1e-3,
            return_z_loss=True,
            return_token_accuracy=True,
        )
        return out.loss, out.z_loss, out.token_accuracy

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    eager, traced = loss(x1, labels), compiled(x2, labels)
    eager[0].backward()
    traced[0].backward()
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)

    bad = labels.clone()
    bad[3] = 129  # outside the vocabulary: NaN under compile (no host-synced check)
    out = compiled(logits, bad)
    assert torch.isnan(out[0])


def test_fused_linear_cross_entropy_compile_fullgraph(torch_path):
    """Ignored rows (every 5th) run through the kernel instead of being dropped by nonzero."""
    hidden, weight, labels = _inputs()

    def loss(h, w, y):
        return fused_linear_cross_entropy(h, w, y, chunk_size=8, label_smoothing=0.1)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    eager, traced = loss(h1, w1, labels), compiled(h2, w2, labels)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager, **TOL)
    torch.testing.assert_close(h2.grad, h1.grad, **TOL)
    torch.testing.assert_close(w2.grad, w1.grad, **TOL)

"""A fully patched tiny Llama runs forward and backward under ``torch.compile`` on CPU.

The ``aot_eager`` backend runs what the patches can break — Dynamo tracing of the instance
forwards, the swapped ``apply_rotary_pos_emb`` and the autograd Functions, and AOTAutograd's
joint forward/backward graphs — without Inductor's C++ code generation, which alone takes
about 90 s for this model on a 2-core machine. Loss and gradients must equal the eager
patched model's (rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import torch
from tiny_models import batches, tiny_model

from accel import apply_patches
from accel_fused_ops.config import FusedOpsConfig
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

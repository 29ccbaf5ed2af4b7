"""Which architectures each feature supports, as data: the rules and the README table read it.

An architecture is listed for a feature only when a model-level test trains a tiny model of
that type with the feature on and off and finds the same losses (``tests/test_models.py``).
The module classes are listed by name because transformers copies each block into every
modeling file; ``checks`` in the rules verify at patch time that a listed class still
computes what the fused op assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

#: model types with RMSNorm, RoPE attention and a causal-LM head (the common core)
_ROPE_RMSNORM_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "granite",
    "granitemoe",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "gemma3_text",
)
#: of those, the ones whose MLP is one dense gated block per layer (the MoE models keep their
#: experts in fused 3-D tensors, computed inside the experts module)
_GATED_MLP_TYPES = (
    "llama",
    "mistral",
    "granite",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "gemma3_text",
)
ALL_MODEL_TYPES = (*_ROPE_RMSNORM_TYPES, "gpt_bigcode")


@dataclass(frozen=True)
class Feature:
    """One config switch of the plugin and the architectures its rules can patch."""

    name: str
    #: what is replaced, in a few words (README table legend)
    patches: str
    model_types: tuple[str, ...]
    #: why an architecture is missing, for the error message and the README
    excluded: dict[str, str]


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(
            "fast_loss",
            "the model's `loss_function` (cross-entropy or fused linear cross-entropy)",
            ALL_MODEL_TYPES,
            {},
        ),
        Feature(
            "fast_rms_layernorm",
            "`forward` of every RMSNorm module",
            _ROPE_RMSNORM_TYPES,
            {"gpt_bigcode": "uses LayerNorm, not RMSNorm"},
        ),
        Feature(
            "fast_rope_embeddings",
            "`apply_rotary_pos_emb` of the attention modules' modeling file",
            _ROPE_RMSNORM_TYPES,
            {"gpt_bigcode": "has learned absolute positions, no rotary embedding"},
        ),
        Feature(
            "fast_swiglu",
            "`forward` of every gated MLP (`down(act(gate(x)) * up(x))`)",
            _GATED_MLP_TYPES,
            {
                "mixtral": "experts are fused 3-D tensors inside MixtralExperts, not gated MLP "
                "modules",
                "granitemoe": "experts are fused 3-D tensors inside GraniteMoeExperts, not gated "
                "MLP modules",
                "gpt_bigcode": "the MLP is not gated (c_fc -> gelu -> c_proj)",
            },
        ),
        Feature(
            "fused_lora",
            "`forward` of every PEFT LoRA linear layer",
            ALL_MODEL_TYPES,
            {},
        ),
    )
}

#: gated MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
GATED_MLP_CLASSES = (
    "LlamaMLP",
    "MistralMLP",
    "Qwen2MLP",
    "Qwen3MLP",
    "GraniteMLP",
    "Gemma2MLP",
    "Gemma3MLP",
)

#: what each causal-LM class does to the lm_head output before ``loss_function``:
#: "none"; "scale" (divides by ``config.logits_scaling``: linear, commutes with the head);
#: "softcap" (``cap * tanh(logits / cap)`` with ``config.final_logit_softcapping``)
CAUSAL_LM_HEADS = {
    "LlamaForCausalLM": "none",
    "MistralForCausalLM": "none",
    "MixtralForCausalLM": "none",
    "Qwen2ForCausalLM": "none",
    "Qwen3ForCausalLM": "none",
    "GPTBigCodeForCausalLM": "none",
    "Gemma3ForConditionalGeneration": "none",
    "GraniteForCausalLM": "scale",
    "GraniteMoeForCausalLM": "scale",
    "Gemma2ForCausalLM": "softcap",
    "Gemma3ForCausalLM": "softcap",
}

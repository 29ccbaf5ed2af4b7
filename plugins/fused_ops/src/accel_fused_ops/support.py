"""The per-architecture support table: for every model type, every feature is Supported or
Unsupported with the reason, and the module classes the feature's rules act on.

One table serves the plugin's architecture gate (``FusedOpsPlugin.model_types``), the
per-feature check and its error message (``rules.check_supported``) and the README table
(``model_table``). An architecture is Supported for a feature only when the feature's record
(``features.FEATURES``) lists it as verified: a model-level test trains a tiny model of that
type with the feature on and off and finds the same losses (``tests/test_models.py``).
Anything else is Unsupported, with the table's reason or "not verified". Module classes are listed by name because transformers copies
each block into every modeling file; at patch time the integration layer verifies that a
listed class still computes what the fused op assumes (bytecode checks), so a changed
transformers release is refused instead of silently mis-fused.

Pure data: importing it loads neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from accel.api import Support, Supported, Unsupported

from .features import EVERY, FEATURES

NOT_VERIFIED = "not verified: no model-level test trains this feature on this architecture"


@dataclass(frozen=True)
class Architecture:
    """One ``config.model_type``: what its modules are and what each feature does with them."""

    model_type: str
    #: RMSNorm class -> its family in ``integration.norms.FAMILIES`` (eps attribute, offset,
    #: casting mode)
    norms: Mapping[str, str] = field(default_factory=dict)
    #: gated MLP class -> its forward's form in ``integration.mlp.FORMS``
    mlps: Mapping[str, str] = field(default_factory=dict)
    #: causal-LM class -> what it does to the lm_head output before the loss: "none",
    #: "scale" (divides by ``config.logits_scaling``) or "softcap" (``final_logit_softcapping``)
    heads: Mapping[str, str] = field(default_factory=dict)
    #: feature -> Supported / Unsupported (every feature of ``features.FEATURES``)
    features: Mapping[str, Support] = field(default_factory=dict)

    def support(self, feature: str) -> Support:
        return self.features[feature]


def _arch(
    model_type: str,
    *,
    norms: Mapping[str, str] = (),
    mlps: Mapping[str, str] = (),
    heads: Mapping[str, str],
    unsupported: Mapping[str, str] = (),
    notes: Mapping[str, str] = (),
) -> Architecture:
    unsupported, notes = dict(unsupported), dict(notes)
    features: dict[str, Support] = {}
    for feature in FEATURES:
        name = feature.name
        verified = feature.verified_on == EVERY or model_type in feature.verified_on
        if name in unsupported:
            features[name] = Unsupported(unsupported[name])
        else:
            features[name] = (
                Supported(notes.get(name, "")) if verified else Unsupported(NOT_VERIFIED)
            )
    return Architecture(model_type, dict(norms), dict(mlps), dict(heads), features)


_EXPERTS = "experts are fused 3-D tensors inside {}, not gated MLP modules"

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        _arch(
            "llama",
            norms={"LlamaRMSNorm": "llama"},
            mlps={"LlamaMLP": "gate_up_down"},
            heads={"LlamaForCausalLM": "none"},
        ),
        _arch(
            "mistral",
            norms={"MistralRMSNorm": "llama"},
            mlps={"MistralMLP": "gate_up_down"},
            heads={"MistralForCausalLM": "none"},
        ),
        _arch(
            "mixtral",
            norms={"MixtralRMSNorm": "llama"},
            heads={"MixtralForCausalLM": "none"},
            unsupported={"fast_swiglu": _EXPERTS.format("MixtralExperts")},
        ),
        _arch(
            "granite",
            norms={"GraniteRMSNorm": "llama"},
            mlps={"GraniteMLP": "gate_up_down"},
            heads={"GraniteForCausalLM": "scale"},
        ),
        _arch(
            "granitemoe",
            norms={"GraniteMoeRMSNorm": "llama"},
            heads={"GraniteMoeForCausalLM": "scale"},
            unsupported={"fast_swiglu": _EXPERTS.format("GraniteMoeExperts")},
        ),
        _arch(
            "granitemoehybrid",
            norms={"GraniteMoeHybridRMSNorm": "llama"},
            mlps={"GraniteMoeHybridMLP": "fused_gate_up_io"},
            heads={"GraniteMoeHybridForCausalLM": "scale"},
            notes={
                "fast_swiglu": "the dense (shared) MLP; MoE experts, when present, stay unfused",
                "fast_rms_layernorm": "the block norms; Mamba layers' gated norm stays unfused",
            },
        ),
        _arch(
            "qwen2",
            norms={"Qwen2RMSNorm": "llama"},
            mlps={"Qwen2MLP": "gate_up_down"},
            heads={"Qwen2ForCausalLM": "none"},
        ),
        _arch(
            "qwen3",
            norms={"Qwen3RMSNorm": "llama"},
            mlps={"Qwen3MLP": "gate_up_down"},
            heads={"Qwen3ForCausalLM": "none"},
        ),
        _arch(
            "phi3",
            norms={"Phi3RMSNorm": "llama"},
            mlps={"Phi3MLP": "fused_gate_up"},
            heads={"Phi3ForCausalLM": "none"},
            notes={"fast_rope_embeddings": "partial rotary (rotary_dim < head_dim) included"},
        ),
        _arch(
            "olmo2",
            norms={"Olmo2RMSNorm": "olmo"},
            mlps={"Olmo2MLP": "gate_up_down"},
            heads={"Olmo2ForCausalLM": "none"},
            notes={
                "fast_rope_embeddings": "the rotation is cast back to q/k's dtype, as OLMo2's is"
            },
        ),
        _arch(
            "smollm3",
            norms={"SmolLM3RMSNorm": "llama"},
            mlps={"SmolLM3MLP": "gate_up_down"},
            heads={"SmolLM3ForCausalLM": "none"},
            notes={"fast_rope_embeddings": "the NoPE layers call no rotary embedding"},
        ),
        _arch(
            "gemma2",
            norms={"Gemma2RMSNorm": "gemma"},
            mlps={"Gemma2MLP": "gate_up_down"},
            heads={"Gemma2ForCausalLM": "softcap"},
        ),
        _arch(
            "gemma3",
            norms={"Gemma3RMSNorm": "gemma"},
            mlps={"Gemma3MLP": "gate_up_down"},
            heads={"Gemma3ForConditionalGeneration": "none"},
        ),
        _arch(
            "gemma3_text",
            norms={"Gemma3RMSNorm": "gemma"},
            mlps={"Gemma3MLP": "gate_up_down"},
            heads={"Gemma3ForCausalLM": "softcap"},
        ),
        _arch(
            "gpt_oss",
            norms={"GptOssRMSNorm": "olmo"},
            heads={"GptOssForCausalLM": "none"},
            unsupported={
                "fast_swiglu": "experts are fused 3-D tensors inside GptOssExperts with a "
                "clamped, alpha-scaled SwiGLU, not gated MLP modules",
            },
            notes={
                "fast_rope_embeddings": "its half-width cos/sin are doubled for the fused kernel "
                "(the same rotation)"
            },
        ),
        _arch(
            "gpt_bigcode",
            heads={"GPTBigCodeForCausalLM": "none"},
            unsupported={
                "fast_rms_layernorm": "uses LayerNorm, not RMSNorm",
                "fast_rope_embeddings": "has learned absolute positions, no rotary embedding",
                "fast_swiglu": "the MLP is not gated (c_fc -> gelu -> c_proj)",
            },
        ),
    )
}

#: every model type the plugin accepts (some feature supports it)
ALL_MODEL_TYPES = tuple(ARCHITECTURES)


def supported_types(feature: str) -> tuple[str, ...]:
    """The model types whose table entry says Supported for ``feature``."""
    return tuple(t for t, a in ARCHITECTURES.items() if a.support(feature).supported)


def support_of(model_type: str | None, feature: str) -> Support:
    """``feature``'s entry for ``model_type``; Unsupported for a type missing from the table."""
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        return Unsupported("this architecture is not in the support table (not verified)")
    return arch.support(feature)


def _union(attr: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for arch in ARCHITECTURES.values():
        merged.update(getattr(arch, attr))
    return merged


#: every RMSNorm class of a listed architecture -> its family
NORM_CLASSES = _union("norms")
#: every gated MLP class -> its form
MLP_CLASSES = _union("mlps")
#: every causal-LM class -> its logits transform
CAUSAL_LM_HEADS = _union("heads")

"""The fused patches refuse a transformers function that is not exactly the form they
replace: a copy of GPT-OSS's rotary helper whose only change is one constant (``dim=-1`` to
``dim=1``, the same bytecode) is refused, the unchanged copy accepted; the same for an
RMSNorm forward and a gated MLP forward changed by one constant."""

from __future__ import annotations

import inspect
import textwrap
import types
from pathlib import Path

import pytest
import torch
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP, LlamaRMSNorm

from accel.api import PatchError
from accel_fused_ops.integration import rope
from accel_fused_ops.integration.mlp import form_of
from accel_fused_ops.integration.norms import rms_norm_params


def _modeling_copy(edit: tuple[str, str] | None) -> types.ModuleType:
    """A stand-in modeling file holding GPT-OSS's two RoPE functions, compiled again from
    transformers' own file (as a whole: the compiler's output depends on the context) with
    ``edit`` (old, new) applied inside the helper."""
    source = Path(modeling_gpt_oss.__file__).read_text()
    if edit is not None:
        start = source.index("def _apply_rotary_emb(")
        end = source.index("\ndef ", start + 1)
        assert edit[0] in source[start:end]
        source = source[:start] + source[start:end].replace(*edit) + source[end:]
    code = compile(source, modeling_gpt_oss.__file__, "exec")
    module = types.ModuleType("accel_test_modeling_gpt_oss_copy")
    module.torch = torch
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and const.co_name in (
            "_apply_rotary_emb",
            "apply_rotary_pos_emb",
        ):
            known = inspect.unwrap(getattr(modeling_gpt_oss, const.co_name))
            function = types.FunctionType(const, module.__dict__, None, known.__defaults__)
            setattr(module, const.co_name, function)
    return module


def test_unchanged_copy_of_gpt_oss_rope_is_the_known_form():
    assert rope.rope_replacement(_modeling_copy(None)) is rope.fused_half_width_rope


def test_gpt_oss_rope_with_one_constant_changed_is_refused():
    changed = _modeling_copy(("dim=-1", "dim=1"))
    original = modeling_gpt_oss._apply_rotary_emb.__code__
    assert changed._apply_rotary_emb.__code__.co_code == original.co_code  # only a constant
    assert rope.rope_replacement(changed) is None
    with pytest.raises(PatchError, match="not a rotary embedding the fused op reproduces"):
        rope.acquire(changed)
    assert changed.apply_rotary_pos_emb.__module__ == changed.__name__  # left as it was


def _subclass_with(cls: type, method: str, edit: tuple[str, str]) -> type:
    source = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    assert edit[0] in source
    namespace = {"torch": torch}
    exec(compile(source.replace(*edit, 1), "<copy>", "exec"), namespace)
    return type(cls.__name__, (cls,), {method: namespace[method]})


def test_rms_norm_forward_with_one_constant_changed_is_refused():
    norm = LlamaRMSNorm(8)
    assert rms_norm_params(norm)["eps"] == norm.variance_epsilon
    changed = _subclass_with(LlamaRMSNorm, "forward", ("pow(2)", "pow(3)"))(8)
    with pytest.raises(ValueError, match=r"forward of LlamaRMSNorm .*LOAD_CONST 3"):
        rms_norm_params(changed)


def test_mlp_forward_with_one_constant_changed_is_refused():
    config = LlamaConfig(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2
    )
    assert form_of(LlamaMLP(config))[0] == "gate_up_down"
    edit = ("return down_proj", "return down_proj * 1.0")
    changed = _subclass_with(LlamaMLP, "forward", edit)(config)
    with pytest.raises(ValueError, match="not the 'gate_up_down' gated MLP form"):
        form_of(changed)

"""accel.testing: one builder of tiny real models for every architecture the tests use."""

from __future__ import annotations

import pytest
import torch

from accel import testing


@pytest.mark.parametrize("model_type", testing.MODEL_TYPES)
def test_every_architecture_builds_a_reproducible_model_that_trains(model_type):
    model = testing.tiny_model(model_type)
    config = model.config.get_text_config()
    assert config.vocab_size == 64 and config.num_hidden_layers == 2
    assert config.hidden_size == 32 and next(model.parameters()).dtype == torch.float32
    again = testing.tiny_model(model_type)
    other_seed = testing.tiny_model(model_type, seed=1)
    state, same, other = model.state_dict(), again.state_dict(), other_seed.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert any(not torch.equal(state[k], other[k]) for k in state)

    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None


def test_sizes_features_and_overrides():
    small = testing.tiny_config("llama", size="small")
    assert (small.vocab_size, small.hidden_size, small.intermediate_size) == (128, 64, 128)
    assert small.pad_token_id is None  # "small" keeps the architecture's own special ids
    tiny = testing.tiny_config("llama")
    assert (tiny.pad_token_id, tiny.bos_token_id, tiny.eos_token_id) == (0, 2, 3)

    granite = testing.tiny_config("granite", features=True)
    assert (granite.logits_scaling, granite.residual_multiplier) == (4.0, 0.5)
    assert testing.tiny_config("granite").logits_scaling == 1.0
    gemma = testing.tiny_config("gemma2", features=True)
    assert gemma.final_logit_softcapping == 5.0 and gemma.tie_word_embeddings
    assert gemma.head_dim == 8  # hidden / heads, not Gemma's default of 256
    assert testing.tiny_config("mixtral", features=True).output_router_logits
    assert testing.tiny_config("mixtral").num_local_experts == 4

    # Llama's size names reach GPTBigCode's n_* fields; overrides win over every table
    bigcode = testing.tiny_config("gpt_bigcode", size="small", hidden_size=48, attn_pdrop=0.25)
    assert (bigcode.n_embd, bigcode.n_layer, bigcode.n_head) == (48, 2, 4)
    assert (bigcode.attn_pdrop, bigcode.resid_pdrop, bigcode.bos_token_id) == (0.25, 0.0, 1)
    gemma3 = testing.tiny_config("gemma3", vocab_size=96)
    assert gemma3.text_config.vocab_size == 96 and gemma3.image_token_index == 95


def test_unknown_architecture_and_size_are_named():
    with pytest.raises(ValueError, match="no tiny 'bert' model; known: llama, mistral"):
        testing.tiny_config("bert")
    with pytest.raises(ValueError, match="size='huge' is not one of tiny, small"):
        testing.tiny_config("llama", size="huge")


def test_assert_close_scaled():
    expected = torch.tensor([1000.0, 0.001])
    testing.assert_close_scaled(expected + torch.tensor([1.0, 1.0]), expected, 2e-3)
    with pytest.raises(AssertionError, match=r"max \|diff\| 3 > 0.002"):
        testing.assert_close_scaled(expected + 3.0, expected, 2e-3)
    with pytest.raises(AssertionError, match="dtype"):
        testing.assert_close_scaled(expected.bfloat16(), expected, 1.0)

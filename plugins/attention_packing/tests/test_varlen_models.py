"""Padded batch (sdpa) vs the same examples packed (PaddingFreeCollator + varlen attention):
same per-token loss and same gradients, for the supported architectures.

Tolerances (fp32): per-token CE atol 1e-5; HF mean loss atol 1e-6; parameter gradients
rtol 1e-4 plus an atol of 1e-5 x the gradient's largest magnitude. The atol scales because
packing changes the order of fp32 sums: an element's error follows the size of the terms
summed into it, not its own value (measured: up to 1.6e-6 x the largest magnitude, on
elements near zero). A wrong mask or position id moves gradients by O(1) of that scale.
"""

import pytest
import torch
from packing_tiny_models import padded_batch, random_examples, tiny_model, token_ce

from accel_attention_packing.attention import (
    VARLEN_ATTENTION_NAME,
    disable_kv_cache,
    register_varlen_attention,
)
from accel_attention_packing.collator import PaddingFreeCollator
from accel_attention_packing.support import SUPPORTED_MODEL_TYPES

LENGTHS = [7, 13, 3, 10, 1, 6]
MODELS = SUPPORTED_MODEL_TYPES  # every Supported entry of the support table is tested here


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_varlen_attention()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    per_token = token_ce(out.logits, batch["labels"])
    per_token.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return per_token.detach(), out.loss.detach(), grads


def _compare(model, examples, labels=None):
    model.train()
    disable_kv_cache(model)
    model.set_attn_implementation("sdpa")
    ref_tok, ref_loss, ref_grads = _loss_and_grads(model, padded_batch(examples, labels))
    model.set_attn_implementation(VARLEN_ATTENTION_NAME)
    feats = [
        {"input_ids": e} if labels is None else {"input_ids": e, "labels": lab}
        for e, lab in zip(examples, labels or examples)
    ]
    tok, loss, grads = _loss_and_grads(model, PaddingFreeCollator()(feats))
    assert tok.shape == ref_tok.shape
    torch.testing.assert_close(tok, ref_tok, rtol=0, atol=1e-5)
    torch.testing.assert_close(tok.sum(), ref_tok.sum(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(
            grads[name],
            ref_grads[name],
            rtol=1e-4,
            atol=1e-5 * scale,
            msg=lambda m, n=name: f"{n}: {m}",
        )


@pytest.mark.parametrize("name", MODELS)
def test_packed_matches_padded(name):
    model = tiny_model(name)
    _compare(model, random_examples(LENGTHS, seed=1))


def test_mistral_sliding_window_matches_padded():
    examples = random_examples([12, 9, 3], seed=2)
    model = tiny_model("mistral", sliding_window=4)
    _compare(model, examples)
    # the window must actually change the result, or this test would prove nothing
    wide = tiny_model("mistral", sliding_window=None)
    wide.load_state_dict(model.state_dict())
    batch = padded_batch(examples)
    assert not torch.allclose(model(**batch).logits, wide(**batch).logits, atol=1e-3)


def test_completion_only_labels_match_padded():
    examples = random_examples([8, 5, 11], seed=3)
    labels = [[-100] * (len(e) // 2) + e[len(e) // 2 :] for e in examples]
    _compare(tiny_model("llama"), examples, labels)


def test_gradient_accumulation_matches_full_padded_batch():
    """Two packed micro-batches with num_items_in_batch == one padded batch of all."""
    examples = random_examples(LENGTHS, seed=4)
    model = tiny_model("llama").train()
    disable_kv_cache(model)
    full = padded_batch(examples)
    full_loss = model(**full).loss
    full_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    model.set_attn_implementation(VARLEN_ATTENTION_NAME)
    collate = PaddingFreeCollator()
    micro = [collate([{"input_ids": e} for e in part]) for part in (examples[:2], examples[2:])]
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    assert n_items == int((full["labels"][:, 1:] != -100).sum())
    total = 0.0
    for b in micro:
        loss = model(**b, num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full_loss.item(), abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_padded_batch_through_varlen_path_matches_sdpa():
    """The 2-D padding mask path (no packing) of the varlen function, e.g. for eval."""
    examples = random_examples([9, 4, 6], seed=5)
    batch = padded_batch(examples)
    model = tiny_model("qwen2").eval()
    ref = model(**batch).logits
    model.set_attn_implementation(VARLEN_ATTENTION_NAME)
    got = model(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], rtol=0, atol=1e-5)


def test_generation_with_cache_matches_sdpa():
    model = tiny_model("llama").eval()
    prompt = torch.tensor([random_examples([5], seed=6)[0]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(prompt, output_logits=True, return_dict_in_generate=True, **kw)
    model.set_attn_implementation(VARLEN_ATTENTION_NAME)
    got = model.generate(prompt, output_logits=True, return_dict_in_generate=True, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_kv_cache_trap_observed_and_avoided():
    """Observed with transformers 5.23: with use_cache=True, sdpa attends across the
    examples of a packed row (the cache disables packing detection); with the cache off
    it does not. The varlen path reads the boundaries itself, so it is right either way."""
    examples = random_examples([7, 13, 3], seed=7)
    model = tiny_model("llama").train()
    per_example = torch.cat([model(input_ids=torch.tensor([e])).logits[0] for e in examples])
    batch = PaddingFreeCollator()([{"input_ids": e} for e in examples])

    model.config.use_cache = True
    leaky = model(**batch).logits[0]
    assert (leaky - per_example).abs().max() > 1e-2

    assert disable_kv_cache(model) is True
    assert model.config.use_cache is False
    assert model.generation_config.use_cache is False
    torch.testing.assert_close(model(**batch).logits[0], per_example, rtol=0, atol=1e-5)

    model.config.use_cache = True
    model.set_attn_implementation(VARLEN_ATTENTION_NAME)
    torch.testing.assert_close(model(**batch).logits[0], per_example, rtol=0, atol=1e-5)


def test_eval_ignores_attention_dropout_and_train_applies_it():
    examples = random_examples([6, 9], seed=8)
    model = tiny_model("llama", attention_dropout=0.5)
    disable_kv_cache(model)
    batch = PaddingFreeCollator()([{"input_ids": e} for e in examples])
    model.eval()
    ref = model(**padded_batch(examples)).logits
    model.set_attn_implementation(VARLEN_ATTENTION_NAME)
    got = model(**batch).logits[0]
    torch.testing.assert_close(got, torch.cat([ref[0, :6], ref[1, :9]]), rtol=0, atol=1e-5)
    model.train()
    assert not torch.allclose(model(**batch).logits[0], got, atol=1e-3)

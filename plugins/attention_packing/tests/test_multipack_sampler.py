"""MultipackBatchSampler / plan_epoch: exactly-once, budget, balance, determinism, resume."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from accel_attention_packing.collator import PaddingFreeCollator
from accel_attention_packing.multipack import MultipackBatchSampler, plan_epoch


def _lengths(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(5.0, 0.9, n), 16, 1024).astype(np.int64)


LENGTHS = _lengths()
BUDGET = 4096


def _all_batches(lengths, replicas, **kw):
    """batches[rank] = list of index lists, from one sampler per simulated rank."""
    out = []
    for rank in range(replicas):
        s = MultipackBatchSampler(lengths, num_replicas=replicas, rank=rank, **kw)
        out.append(list(s))
    return out


@pytest.mark.parametrize("replicas", [1, 2, 8])
def test_exactly_once_budget_and_balance(replicas):
    batches = _all_batches(LENGTHS, replicas, max_tokens_per_rank=BUDGET, seed=3)
    steps = {len(b) for b in batches}
    assert len(steps) == 1, "every rank must run the same number of steps"
    seen = np.concatenate([np.concatenate([np.asarray(x) for x in b]) for b in batches])
    assert np.array_equal(np.sort(seen), np.arange(LENGTHS.size))
    tokens = np.array([[LENGTHS[x].sum() for x in b] for b in batches])  # (rank, step)
    assert tokens.max() <= BUDGET
    # as few steps as a 99%-full packing would need (small sets lose more to whole steps)
    assert len(batches[0]) <= np.ceil(LENGTHS.sum() / (replicas * BUDGET * 0.99))
    ratio = tokens.max(axis=0) / tokens.min(axis=0)
    assert ratio.mean() <= 1.02


def test_plan_metrics_match_batches():
    plan = plan_epoch(LENGTHS, num_replicas=4, max_tokens_per_rank=BUDGET, seed=1)
    assert plan.real_tokens == LENGTHS.sum()
    assert plan.efficiency() == pytest.approx(LENGTHS.sum() / (plan.num_steps * 4 * BUDGET))
    assert 1.0 <= plan.imbalance() <= 1.02
    tokens = plan.step_tokens()
    assert tokens[0, 2] == LENGTHS[plan.batch(0, 2)].sum()


def test_deterministic_per_seed_and_epoch():
    a = MultipackBatchSampler(LENGTHS, max_tokens_per_rank=BUDGET, seed=7)
    b = MultipackBatchSampler(LENGTHS, max_tokens_per_rank=BUDGET, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert first != second
    assert sorted(sum(first, [])) == sorted(sum(second, []))
    c = MultipackBatchSampler(LENGTHS, max_tokens_per_rank=BUDGET, seed=8)
    assert list(c) != first


@pytest.mark.parametrize("replicas", [1, 3])
def test_resume_mid_epoch(replicas):
    kw = dict(num_replicas=replicas, max_tokens_per_rank=BUDGET, seed=5, epoch=2)
    for rank in range(replicas):
        full = list(MultipackBatchSampler(LENGTHS, rank=rank, **kw))
        s = MultipackBatchSampler(LENGTHS, rank=rank, **kw)
        it = iter(s)
        head = [next(it) for _ in range(7)]
        state = s.state_dict()
        assert state["epoch"] == 2 and state["step"] == 7
        resumed = MultipackBatchSampler(
            LENGTHS, rank=rank, num_replicas=replicas, max_tokens_per_rank=BUDGET, seed=5
        )
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # what a trainer does at the start of the epoch
        tail = list(resumed)
        assert head + tail == full
        assert len(list(resumed)) == len(full)  # the next pass is a whole epoch again
        via_arg = MultipackBatchSampler(LENGTHS, rank=rank, start_step=7, **kw)
        assert list(via_arg) == tail


def test_resume_refuses_a_different_plan():
    s = MultipackBatchSampler(LENGTHS, max_tokens_per_rank=BUDGET)
    state = s.state_dict()
    other = MultipackBatchSampler(LENGTHS[:-1], max_tokens_per_rank=BUDGET)
    with pytest.raises(ValueError, match="lengths_digest"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="num_replicas"):
        MultipackBatchSampler(LENGTHS, num_replicas=2, max_tokens_per_rank=BUDGET).load_state_dict(
            state
        )


def test_oversize_error_names_the_example():
    lengths = LENGTHS.copy()
    lengths[42] = BUDGET + 1
    with pytest.raises(ValueError, match=r"#42 \(4097 tokens\).*oversize='report'"):
        _ = MultipackBatchSampler(lengths, max_tokens_per_rank=BUDGET).plan


def test_oversize_report_skips_and_warns():
    lengths = LENGTHS.copy()
    lengths[[3, 9]] = BUDGET * 2
    s = MultipackBatchSampler(
        lengths, num_replicas=2, max_tokens_per_rank=BUDGET, oversize="report"
    )
    with pytest.warns(UserWarning, match="skipping 2 example"):
        plan = s.plan
    assert plan.skipped.tolist() == [3, 9]
    seen = sorted(sum((plan.batch(t, r) for t in range(plan.num_steps) for r in (0, 1)), []))
    assert seen == [i for i in range(lengths.size) if i not in (3, 9)]


def test_fewer_examples_than_ranks_pads_or_drops():
    lengths = np.array([30, 10, 20])
    plan = plan_epoch(lengths, num_replicas=4, max_tokens_per_rank=64)
    assert plan.num_steps == 1 and plan.num_padding == 1
    batches = [plan.batch(0, r) for r in range(4)]
    assert all(batches)
    assert sorted(sum(batches, [])) == [0, 1, 1, 2]  # the shortest example is repeated
    assert plan.real_tokens == 60
    dropped = plan_epoch(lengths, num_replicas=4, max_tokens_per_rank=64, drop_last=True)
    assert dropped.num_steps == 0 and sorted(dropped.dropped.tolist()) == [0, 1, 2]


def test_batch_size_semantics():
    s = MultipackBatchSampler(LENGTHS, num_replicas=2, batch_size=8)
    assert len(s) == -(-LENGTHS.size // 16)
    counts = [len(b) for b in s]
    assert 4 <= np.mean(counts) <= 8
    assert s.plan.imbalance() <= 1.02


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(), "exactly one of"),
        (dict(max_tokens_per_rank=10, batch_size=2), "exactly one of"),
        (dict(max_tokens_per_rank=0), "positive int"),
        (dict(max_tokens_per_rank=10, rank=2, num_replicas=2), "rank must be"),
        (dict(max_tokens_per_rank=10, oversize="skip"), "oversize must be"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MultipackBatchSampler([5, 6], **kw)


def test_bad_lengths():
    with pytest.raises(ValueError, match="example 1 has length 0"):
        MultipackBatchSampler([5, 0], max_tokens_per_rank=10)
    with pytest.raises(ValueError, match="1-D"):
        MultipackBatchSampler([[5]], max_tokens_per_rank=10)


def test_dataloader_with_padding_free_collator():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 50)
    data = [{"input_ids": list(range(n))} for n in lengths]
    sampler = MultipackBatchSampler(lengths, max_tokens_per_rank=96, seed=0)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=PaddingFreeCollator())
    total = 0
    for batch in loader:
        n = batch["input_ids"].shape[1]
        assert n <= 96
        assert batch["cu_seq_lens_q"][-1].item() == n
        total += n
    assert total == lengths.sum()
    assert len(loader) == len(sampler)
    assert isinstance(sampler, torch.utils.data.Sampler)

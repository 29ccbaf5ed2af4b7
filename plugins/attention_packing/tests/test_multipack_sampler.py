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


# -- planner internals and hard instances -------------------------------------------------


def _heap_lpt(sizes, num_bins):
    """Reference LPT: each item (longest first) to the emptiest bin, ties to the lowest id."""
    loads = [0] * num_bins
    out = []
    for s in sizes:
        b = min(range(num_bins), key=lambda i: (loads[i], i))
        out.append(b)
        loads[b] += int(s)
    return np.asarray(out)


@pytest.mark.parametrize("case", range(12))
def test_fill_is_exactly_lpt(case):
    from accel_attention_packing.multipack import _fill

    rng = np.random.default_rng(case)
    n = int(rng.integers(1, 400))
    m = int(rng.integers(1, 70))
    if case == 0:  # a few bins far above the rest: rounds get small, the heap finishes
        sizes = np.array([500] * (m - 1) + [3] * 300 + [1] * 100)
    else:  # many ties (small range) or few (wide range)
        sizes = rng.integers(1, int(rng.choice([3, 20, 1000])), n)
    sizes = np.sort(sizes)[::-1].astype(np.int64)
    bin_of, loads = _fill(sizes, m)
    assert np.array_equal(bin_of, _heap_lpt(sizes, m))
    assert np.array_equal(loads, np.bincount(bin_of, weights=sizes, minlength=m))


def test_repair_trades_bring_every_bin_within_budget():
    from accel_attention_packing.multipack import _fill, _repair

    sizes = np.sort(_lengths(20_000, seed=4))[::-1]
    budget = 4096
    m = -(-int(sizes.sum()) // budget) + 1  # ~5 tokens of room per bin on average
    bin_of, loads = _fill(sizes, m)
    lowest = loads.min()
    assert (loads > budget).sum() > 200  # LPT alone overflows a quarter of the bins
    assert _repair(sizes, bin_of, loads, budget)
    assert np.array_equal(loads, np.bincount(bin_of, weights=sizes, minlength=m))
    assert loads.max() <= budget and loads.min() >= lowest


def test_lognormal_200k_64_ranks_needs_the_fewest_steps():
    """200k lognormal(5, 0.9) lengths, budget 16384, 64 ranks: the tokens need 40.97 steps,
    so 41 is the fewest any planner that drops nothing can use (99.93% efficiency)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.0, 0.9, 200_000), 16, 1024).astype(np.int64)
    budget, ranks = 16384, 64
    plan = plan_epoch(lengths, num_replicas=ranks, max_tokens_per_rank=budget, seed=0)
    assert plan.num_steps == -(-int(lengths.sum()) // (ranks * budget)) == 41
    assert plan.efficiency() >= 0.999
    assert plan.imbalance() <= 1.001
    assert plan.step_tokens().max() <= budget
    assert np.array_equal(np.sort(plan.indices), np.arange(lengths.size))  # each exactly once
    assert plan.num_padding == 0 and plan.dropped.size == 0 and plan.skipped.size == 0
    assert plan.real_tokens == lengths.sum()
    again = plan_epoch(lengths, num_replicas=ranks, max_tokens_per_rank=budget, seed=0)
    assert np.array_equal(again.indices, plan.indices)
    assert np.array_equal(again.step_bins, plan.step_bins)
    other = plan_epoch(lengths, num_replicas=ranks, max_tokens_per_rank=budget, seed=0, epoch=1)
    assert other.num_steps == 41 and not np.array_equal(other.indices, plan.indices)


@pytest.mark.parametrize("ranks", [1, 8, 64])
@pytest.mark.parametrize("budget", [4096, 16384])
@pytest.mark.parametrize("dist", ["lognormal", "heavy", "uniform"])
def test_steps_close_to_the_fewest_possible(dist, budget, ranks):
    rng = np.random.default_rng(11)
    raw = {
        "lognormal": lambda: rng.lognormal(5.0, 0.9, 30_000),
        "heavy": lambda: rng.lognormal(4.0, 1.2, 30_000),
        "uniform": lambda: rng.integers(16, 1025, 30_000),
    }[dist]()
    lengths = np.clip(raw, 16, 1024).astype(np.int64)
    plan = plan_epoch(lengths, num_replicas=ranks, max_tokens_per_rank=budget, seed=1)
    fewest = -(-int(lengths.sum()) // (ranks * budget))
    assert fewest <= plan.num_steps <= fewest + max(1, fewest // 200)
    assert plan.step_tokens().max() <= budget
    assert plan.imbalance() <= 1.001
    assert np.array_equal(np.sort(plan.indices), np.arange(lengths.size))


def test_examples_over_half_the_budget_get_a_bin_each():
    """No trade can help (two examples never share a bin): the guaranteed bound is used."""
    lengths = np.full(37, 33)
    plan = plan_epoch(lengths, num_replicas=4, max_tokens_per_rank=64)
    assert plan.num_steps == 10 and plan.num_padding == 3
    assert plan.step_tokens().max() <= 64
    assert sorted(set(plan.indices.tolist())) == list(range(37))


def test_long_examples_that_crowd_bins_still_pack_tightly():
    """20k examples of 900-1024 tokens among 80k of 1-16: a 4096-token bin holds at most 4
    long ones, so 625 steps on 8 ranks is a floor (the token count alone would allow 608).
    Bins then need ~130 tokens of room on average, far more than the shortest example."""
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(900, 1025, 20_000), rng.integers(1, 17, 80_000)])
    rng.shuffle(lengths)
    plan = plan_epoch(lengths, num_replicas=8, max_tokens_per_rank=4096)
    assert 625 <= plan.num_steps <= 632  # within ~1% of the floor
    assert plan.step_tokens().max() <= 4096
    assert plan.imbalance() <= 1.001
    assert np.array_equal(np.sort(plan.indices), np.arange(lengths.size))

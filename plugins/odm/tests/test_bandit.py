"""EXP3 and the odm batch sampler without a model: the update rule, the gamma floor,
determinism, the per-dataset streams and an exact resume."""

from __future__ import annotations

import math

import pytest

from accel_odm.bandit import Exp3
from accel_odm.sampler import OdmBatchSampler


def test_update_matches_a_hand_computed_exp3_step():
    # K=2, gamma=0.1, eta=0.5, equal weights: p = (0.5, 0.5). Arm 0 observed with reward 1:
    # estimate 1 / 0.5 = 2, w0 <- 1 * exp(0.5 * 2 / 2) = e^0.5; arm 1 unobserved keeps w1 = 1.
    bandit = Exp3(2, gamma=0.1, eta=0.5)
    estimates = bandit.update([1.0, None])
    assert estimates == [2.0, None]
    w0 = math.exp(0.5)
    assert bandit.weights() == pytest.approx([w0 / (w0 + 1), 1 / (w0 + 1)])
    p0 = 0.9 * w0 / (w0 + 1) + 0.05  # 0.6102133...
    assert bandit.probabilities() == pytest.approx([p0, 1 - p0])
    assert p0 == pytest.approx(0.610213, abs=1e-6)
    # second step: both observed, rewards 0.2 and 0.4
    p = bandit.probabilities()
    bandit.update([0.2, 0.4])
    lw0 = 0.5 + 0.5 * (0.2 / p[0]) / 2
    lw1 = 0.5 * (0.4 / p[1]) / 2
    z = math.exp(lw0) + math.exp(lw1)
    assert bandit.weights() == pytest.approx([math.exp(lw0) / z, math.exp(lw1) / z])


def test_weights_move_toward_the_higher_reward_arm():
    bandit = Exp3(3, gamma=0.1, eta=0.2)
    for _ in range(20):
        bandit.update([0.5, 2.0, 1.0])
    w = bandit.weights()
    assert w[1] > w[2] > w[0]
    assert bandit.probabilities()[1] > 0.5


def test_gamma_floor_holds_however_lopsided_the_rewards():
    bandit = Exp3(4, gamma=0.2, eta=1.0, initial=[1, 1, 1, 1])
    for _ in range(500):  # log weights grow without overflow
        bandit.update([50.0, None, 0.0, None])
    probs = bandit.probabilities()
    assert min(probs) >= 0.2 / 4 - 1e-12
    assert min(probs) == pytest.approx(0.05)
    assert sum(probs) == pytest.approx(1.0)
    # initial weights are respected, a zero weight keeps only the floor
    start = Exp3(2, gamma=0.1, eta=0.1, initial=[3, 0])
    assert start.probabilities() == pytest.approx([0.95, 0.05])


def batches(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_is_deterministic_for_a_seed_and_follows_the_probabilities():
    def make(seed):
        return OdmBatchSampler([50, 30, 20], Exp3(3, 0.1, 0.1, [8, 1, 1]), batch_size=10, seed=seed)

    a, b, c = make(1), make(1), make(2)
    assert batches(a, 10) == batches(b, 10)
    assert batches(c, 10) != batches(make(1), 10)
    # p = 0.9 * (0.8, 0.1, 0.1) + 0.1 / 3 -> (0.753, 0.123, 0.123); 100 draws
    assert a.counts[0] > 55 and sum(a.counts) == 100
    assert list(a.pending)[0] == [
        0 if i < 50 else 1 if i < 80 else 2 for i in batches(make(1), 1)[0]
    ]


def test_each_dataset_is_read_in_shuffled_passes_that_restart():
    sampler = OdmBatchSampler([3, 100], Exp3(2, 0.1, 0.1, [1, 0]), batch_size=4, seed=0)
    rows = [i for batch in batches(sampler, 6) for i in batch if i < 3]  # ~95% from dataset 0
    full = len(rows) // 3 * 3
    assert full >= 15
    assert all(sorted(rows[k : k + 3]) == [0, 1, 2] for k in range(0, full, 3))
    assert sampler.passes[0] == len(rows) // 3


def test_sampling_interval_draws_runs_of_one_dataset():
    sampler = OdmBatchSampler(
        [40, 40], Exp3(2, 0.5, 0.1), batch_size=8, seed=4, sampling_interval=4
    )
    for batch in batches(sampler, 5):
        for k in range(0, 8, 4):
            assert len({i >= 40 for i in batch[k : k + 4]}) == 1


def test_state_round_trip_continues_with_the_same_decisions():
    def make():
        return OdmBatchSampler(
            [13, 7, 5], Exp3(3, 0.1, 0.3), batch_size=3, num_replicas=2, rank=1, seed=9
        )

    straight = make()
    it = iter(straight)
    first = [next(it) for _ in range(2)]
    straight.bandit.update([1.0, 3.0, None])
    state = straight.state_dict()
    expected = [next(it) for _ in range(2)]
    resumed = make()
    resumed.load_state_dict(state)
    got = list(iter(resumed))
    assert got[:2] == [[], []]  # placeholders for the two batches the trainer skips
    assert got[2:4] == expected
    assert len(got) == len(resumed) == math.ceil(25 / 6)
    assert first != expected
    other = OdmBatchSampler(
        [13, 7, 5], Exp3(3, 0.1, 0.3), batch_size=4, num_replicas=2, rank=1, seed=9
    )
    with pytest.raises(ValueError, match="saved batch_size=3"):
        other.load_state_dict(state)

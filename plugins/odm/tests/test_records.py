"""The reward records: lookup, each forward reward's per-example formula, each signal."""

from __future__ import annotations

import math

import pytest
import torch

from accel_odm import records
from accel_odm.plugin import OdmConfig


def means_of(losses, entropies, squares):
    return torch.tensor([losses, entropies, squares], dtype=torch.float64)


def test_every_record_is_consistent():
    assert len(records.BY_NAME) == len(records.REWARDS)
    for r in records.REWARDS:
        assert r.reads in ("forward", "validation")
        assert (r.per_example is not None) == (r.reads == "forward"), r.name
        assert isinstance(r.signal(3), records.Signal)
        assert r.help


def test_fms_acceleration_rewards_keep_their_names_and_alias():
    for name in ("train_loss", "entropy", "entropy3_varent1", "validation_loss"):
        assert records.lookup(name).name == name
    assert records.lookup("ENTROPY_VARENTROPY").name == "entropy3_varent1"
    assert OdmConfig(reward_type="entropy_varentropy").reward_type == "entropy3_varent1"


@pytest.mark.parametrize("name", ["gradnorm", "learnability", "combined", "entropy_last_token"])
def test_not_implemented_rewards_are_refused_with_the_reason(name):
    with pytest.raises(ValueError, match="not supported"):
        records.lookup(name)


def test_unknown_reward_names_the_valid_ones():
    with pytest.raises(ValueError, match="train_loss_decrease"):
        OdmConfig(reward_type="lossy")


def test_forward_formulas():
    m = means_of([2.0, 3.0], [1.0, 2.0], [1.5, 4.0])  # variances 0.5 and 0
    assert records.lookup("train_loss").per_example(m).tolist() == [2.0, 3.0]
    assert records.lookup("train_loss_decrease").per_example(m).tolist() == [2.0, 3.0]
    assert records.lookup("entropy").per_example(m).tolist() == [1.0, 2.0]
    got = records.lookup("entropy3_varent1").per_example(m).tolist()
    assert got == pytest.approx([(3 * 1.0 + 0.5) / 4, (3 * 2.0 + 0.0) / 4])
    # a negative variance from rounding is clamped to 0
    neg = records.lookup("entropy3_varent1").per_example(means_of([0.0], [2.0], [3.9]))
    assert neg.tolist() == pytest.approx([1.5])


def test_which_rewards_need_entropy():
    need = {r.name for r in records.REWARDS if r.needs_entropy}
    assert need == {"entropy", "entropy3_varent1"}


@pytest.mark.parametrize("name", ["train_loss", "entropy", "entropy3_varent1", "validation_loss"])
def test_fms_rewards_pass_the_measured_values_on(name):
    signal = records.lookup(name).signal(3)
    assert signal([3.0, None, 1.5]) == [3.0, None, 1.5]
    assert signal([3.0, None, 1.5]) == [3.0, None, 1.5]  # no state


def test_validation_decrease_rewards_the_fastest_falling_dataset():
    signal = records.lookup("validation_loss_decrease").signal(3)
    assert signal([5.0, 5.0, 4.0]) == [None, None, None]  # nothing to compare with yet
    # dataset 0 fell 1.0, dataset 1 0.5, dataset 2 (noise: flat) not at all
    assert signal([4.0, 4.5, 4.0]) == pytest.approx([1.0, 0.5, 0.0])
    # a rising loss gets a negative reward, scaled by the largest absolute change
    assert signal([3.5, 4.75, 4.0]) == pytest.approx([1.0, -0.5, 0.0])


def test_flat_losses_everywhere_earn_zero():
    signal = records.lookup("validation_loss_decrease").signal(2)
    signal([2.0, 3.0])
    assert signal([2.0, 3.0]) == [0.0, 0.0]


def test_train_decrease_smooths_and_needs_a_full_window():
    signal = records.Decrease(2, window=3, smoothing=0.5)
    outs = [signal([float(v), 1.0]) for v in (8, 8, 8)]
    assert all(o == [None, None] for o in outs)
    # fourth update: averages of dataset 0 are 8, 8, 8, 6 -> drop 2; dataset 1 flat
    assert signal([4.0, 1.0]) == pytest.approx([1.0, 0.0])


def test_unobserved_dataset_gets_no_reward_and_keeps_its_history():
    signal = records.Decrease(2, window=1, smoothing=1.0)
    signal([3.0, 3.0])
    assert signal([2.0, None]) == [1.0, None]  # dataset 1 not trained this interval
    assert signal([2.0, 1.0]) == pytest.approx([0.0, 1.0])  # compared with its last value, 3


def test_non_finite_values_are_ignored():
    signal = records.Decrease(1, window=1, smoothing=1.0)
    signal([2.0])
    assert signal([math.nan]) == [None]
    assert signal([1.0]) == [1.0]


def test_noise_is_not_rewarded_once_its_loss_is_flat():
    """A learnable dataset whose loss keeps falling slowly beats an unlearnable one whose
    loss is high but flat; train_loss picks the unlearnable one."""
    learnable = [4.0 - 0.01 * t for t in range(60)]
    noise = [6.0] * 60
    signal = records.lookup("train_loss_decrease").signal(2)
    for a, b in zip(learnable, noise):
        last = signal([a, b])
    assert last[0] == pytest.approx(1.0) and last[1] == pytest.approx(0.0)
    assert records.lookup("train_loss").signal(2)([learnable[-1], noise[-1]])[1] > learnable[-1]


def test_decrease_state_round_trips():
    a = records.Decrease(2, window=2, smoothing=0.3)
    for v in ([5.0, 4.0], [4.0, None], [3.5, 3.0]):
        a(v)
    b = records.Decrease(2, window=2, smoothing=0.3)
    b.load_state_dict(a.state_dict())
    assert a([3.0, 2.5]) == b([3.0, 2.5])
    with pytest.raises(ValueError, match="2 datasets, this run 3"):
        records.Decrease(3, window=2, smoothing=0.3).load_state_dict(a.state_dict())


def test_bad_signal_constants_are_refused():
    with pytest.raises(ValueError):
        records.Decrease(2, window=0, smoothing=0.5)
    with pytest.raises(ValueError):
        records.Decrease(2, window=2, smoothing=0.0)

"""Runtime defaults: CPU threads (set before torch loads, the user's settings win) and DDP's
find_unused_parameters (on only where a trainable module can be skipped)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from accel.testing import tiny_model
from accel.threads import default_threads, environment_for
from accel.trainer.ddp import find_unused_default, may_skip


def test_thread_defaults_fill_in_and_the_users_win():
    cores = default_threads()
    assert environment_for({}) == {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"}
    two = environment_for({}, processes=2)["OMP_NUM_THREADS"]
    assert two == str(max(1, os.sched_getaffinity(0).__len__() // 2 - 1))
    mine = {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    assert environment_for(dict(mine)) == mine
    assert environment_for({"ACCEL_CPU_THREADS": "off"}) == {"ACCEL_CPU_THREADS": "off"}
    assert environment_for({"ACCEL_CPU_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "PASSIVE"),
        ({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}, "ACTIVE"),
        ({"ACCEL_CPU_THREADS": "off"}, "OpenMP default"),
    ],
)
def test_the_command_sets_them_before_torch_loads(env, expected):
    """In a fresh process: what torch runs with after ``accel`` configured the threads."""
    code = (
        "from accel.threads import configure\n"
        "setting = configure()\n"
        "import torch\n"
        "print(setting.wait_policy, torch.get_num_threads(), setting.threads, sep='|')\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "ACCEL_CPU"))}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    policy, torch_threads, threads = out.stdout.strip().split("|")
    assert policy == expected
    if threads != "torch default":  # switched off
        assert int(torch_threads) == int(threads)


class _PerExpertMoE(torch.nn.Module):
    """A block routing each token to one of a list of expert modules (some get none)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = torch.nn.Linear(4, 3)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))


def test_find_unused_only_for_skippable_trainable_modules():
    assert may_skip("model.layers.0.mlp.experts.2.w1.weight")
    assert not may_skip("model.layers.0.mlp.experts.gate_up_proj")  # stacked: always used
    assert not may_skip("model.layers.0.mlp.gate.weight")
    assert find_unused_default(_PerExpertMoE())
    frozen = _PerExpertMoE()
    for p in frozen.experts.parameters():
        p.requires_grad_(False)
    assert not find_unused_default(frozen)  # LoRA elsewhere, experts frozen
    assert not find_unused_default(tiny_model("llama"))

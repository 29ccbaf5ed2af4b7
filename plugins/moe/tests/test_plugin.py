"""The scattermoe plugin through accel: config and flag, the same training trajectory as
transformers' eager experts, the refusals before anything loads, LoRA on experts and router
saved as a vanilla PEFT adapter."""

from __future__ import annotations

import json
import re

import pytest
import torch

import accel
from accel import ConfigError, UnsupportedModelError
from accel.registry import discover_plugins
from accel.trainer.run import build_framework, parse_argv


def _world(monkeypatch, size: int) -> None:
    """A launch of ``size`` processes as the plugin sees it (the trainer's own state stays
    single-process: these tests build the framework only)."""
    import accel_moe.parallel

    monkeypatch.setattr(accel_moe.parallel, "world_size", lambda: size)


def _settings(argv: list[str]):
    available = discover_plugins()
    return build_framework(parse_argv(argv, available), available).get("scattermoe").settings


@pytest.mark.parametrize(
    "value, ep, replicate",
    [("2", 2, False), ("1", 1, False), ("True", 1, False), ("False", 1, True)],
)
def test_fast_moe_flag_meaning(value, ep, replicate, monkeypatch):
    _world(monkeypatch, 2)
    settings = _settings(["--model_name_or_path", "m", "--fast_moe", value])
    assert (settings.ep_size, settings.replicate_experts) == (ep, replicate)


# fms-acceleration's sample configuration for ScatterMoE with padding-free and fused ops,
# as it ships (comments shortened)
FMS_SAMPLE = """\
# FMS Acceleration Plugin Configuration.
plugins:
  training:
    attention:
      # this controls the confgurations for padding free computation flows
      padding_free:
        method: huggingface
    fused_ops_and_kernels:
      fast_loss: true
      fast_rms_layernorm: true
      fast_rope_embeddings: true
    moe:
      # expert-parallel for MoE
      scattermoe:
        # The level of expert parallel sharding.
        # - 1 means no sharding
        # - if > 1, please ensure that this divides the world_size.
        ep_degree: {ep}
"""


@pytest.mark.parametrize("ep", [1, 4])
def test_fms_acceleration_sample_config_is_accepted(ep, tmp_path, monkeypatch):
    _world(monkeypatch, 4)
    path = tmp_path / "moe.yaml"
    path.write_text(FMS_SAMPLE.format(ep=ep))
    available = discover_plugins()
    argv = ["--model_name_or_path", "m", "--acceleration_config", str(path)]
    framework = build_framework(parse_argv(argv, available), available)
    assert {"scattermoe", "padding_free", "fused_ops"} <= set(framework.names)
    assert framework.get("scattermoe").settings.ep_size == ep


@pytest.mark.parametrize(
    "world, value, message",
    [
        (1, "2", "needs a distributed launch"),
        (3, "2", "does not divide the number of processes (3)"),
        (2, "0", "ep_degree must be a positive integer"),
    ],
)
def test_launch_refusals(world, value, message, monkeypatch):
    _world(monkeypatch, world)
    available = discover_plugins()
    with pytest.raises(ConfigError, match=re.escape(message)):
        argv = ["--model_name_or_path", "m", "--fast_moe", value]
        build_framework(parse_argv(argv, available), available).get("scattermoe").check_run()


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_accel_arguments_translates_an_ep_sample_without_a_launch(ep, tmp_path):
    """fms-acceleration's ScatterMoE ep2/ep4/ep8 samples are configs, not launches: the
    launch check belongs to training (check_run), so one process can translate them."""
    import os
    import subprocess
    import sys

    path = tmp_path / f"moe-ep{ep}.yaml"
    path.write_text(FMS_SAMPLE.format(ep=ep))
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    done = subprocess.run(
        [sys.executable, "-m", "accel.cli", "arguments", str(path)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"--fast_moe {ep}" in done.stdout


def argv(args: dict) -> list[str]:
    return [word for key, value in args.items() for word in (f"--{key}", str(value))]


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.log_history if "loss" in h]


def test_training_trajectory_matches_eager(run_args, tmp_path):
    """Same steps, same losses and grad norms as the eager experts (fp32)."""
    eager = accel.train({**run_args, "output_dir": str(tmp_path / "eager")})
    ours = accel.train({**run_args, "output_dir": str(tmp_path / "moe"), "fast_moe": True})
    assert ours.framework.names == ["scattermoe"]
    assert len(_losses(ours)) == 4
    assert _losses(ours) == pytest.approx(_losses(eager), rel=1e-5)
    norms = [[h["grad_norm"] for h in r.log_history if "grad_norm" in h] for r in (eager, ours)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    assert _losses(ours)[-1] < _losses(ours)[0]


def test_experts_not_divisible_refused_before_loading(run_args, tmp_path, monkeypatch):
    # 4 experts over an expert-parallel degree of 3
    with pytest.raises(ConfigError, match="4 experts per layer, which 3 processes"):
        from transformers import AutoConfig

        from accel_moe.parallel import check_model

        check_model(AutoConfig.from_pretrained(run_args["model_name_or_path"]), 3)


def test_architecture_without_experts_interface_is_refused(tmp_path, run_args):
    from accel.testing import save_tiny_model

    save_tiny_model(tmp_path / "llama")
    with pytest.raises(UnsupportedModelError, match="scattermoe.*model_type 'llama'"):
        accel.train(
            {
                **run_args,
                "model_name_or_path": str(tmp_path / "llama"),
                "output_dir": str(tmp_path / "o"),
                "fast_moe": True,
            }
        )


def test_cli_error_is_one_line(run_args, tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "accel.cli", "train", *argv(run_args),
         "--output_dir", str(tmp_path), "--fast_moe", "2"],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if k != "WORLD_SIZE"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "accel: error:" in done.stderr and "needs a distributed launch" in done.stderr
    assert "Traceback" not in done.stderr


def test_lora_on_attention_experts_and_router_is_a_vanilla_peft_adapter(run_args, tmp_path):
    """Trained under ScatterMoE, loaded with plain transformers + PEFT (eager experts): same
    logits as the trained model."""
    result = accel.train(
        {
            **run_args,
            "output_dir": str(tmp_path / "out"),
            "save_model_dir": str(tmp_path / "adapter"),
            "peft_method": "lora",
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
            "plugins": {
                "training": {"moe": {"scattermoe": {"lora_experts": True, "lora_router": True}}}
            },
        }
    )
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    targets = adapter["target_parameters"]
    assert any(t.endswith("experts.gate_up_proj") for t in targets)
    assert any(t.endswith("experts.down_proj") for t in targets)
    assert any(t.endswith("gate.weight") for t in targets)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("experts" in k for k in saved) and any("gate" in k for k in saved)
    assert _losses(result)[-1] < _losses(result)[0]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run_args["model_name_or_path"])
    plain = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(4, 60, (2, 9))
    from accel_moe.experts import register

    register()
    base2 = AutoModelForCausalLM.from_pretrained(
        run_args["model_name_or_path"], experts_implementation="scattermoe"
    )
    ours = PeftModel.from_pretrained(base2, str(tmp_path / "adapter")).eval()
    untuned = AutoModelForCausalLM.from_pretrained(run_args["model_name_or_path"]).eval()
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        before = untuned(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - before).abs().max() > 1e-3  # the adapter changed something


def test_distributed_config_for_ep(monkeypatch):
    """EP 2 over 4 processes: FSDP over all 4 (the engine needs ep | fsdp), or over fsdp_size
    with the shard groups replicated."""
    from transformers.distributed import DistributedConfig

    from accel_moe.parallel import distributed_config

    _world(monkeypatch, 4)
    monkeypatch.setenv("WORLD_SIZE", "4")  # read by DistributedConfig's own checks
    config = distributed_config(2, False, None)
    assert (config.ep_size, config.fsdp_size, config.dp_replicate_size) == (2, 4, 1)
    assert config.ep_implementation == "all_to_all"
    config = distributed_config(2, False, DistributedConfig(fsdp_size=2, dp_replicate_size=2))
    assert (config.ep_size, config.fsdp_size, config.dp_replicate_size) == (2, 2, 2)
    assert distributed_config(1, False, None) is None


@pytest.mark.parametrize(
    "ep, replicate, fsdp, message",
    [
        (1, True, 2, "--fast_moe False keeps every expert whole"),
        (4, False, 2, "must divide fsdp_size (2)"),
    ],
)
def test_distributed_config_refusals(ep, replicate, fsdp, message, monkeypatch):
    from transformers.distributed import DistributedConfig

    from accel_moe.parallel import distributed_config

    _world(monkeypatch, 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    current = DistributedConfig(fsdp_size=fsdp, dp_replicate_size=4 // fsdp)
    with pytest.raises(ConfigError, match=re.escape(message)):
        distributed_config(ep, replicate, current)


def test_ep_with_accelerate_fsdp_is_refused_at_training_time(monkeypatch):
    """Reading the flags needs no launch; the run's check (before the model loads) refuses."""
    _world(monkeypatch, 2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    available = discover_plugins()
    framework = build_framework(
        parse_argv(["--model_name_or_path", "m", "--fast_moe", "2"], available), available
    )
    assert framework.get("scattermoe").settings.ep_size == 2
    with pytest.raises(ConfigError, match="drop the accelerate FSDP config"):
        framework.check_run(run_config=None, model_config=None)

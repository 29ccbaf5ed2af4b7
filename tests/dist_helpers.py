"""Helpers of the multi-process tests: launching torchrun / accelerate launch on CPU, reading
what the ranks recorded (tests/dist_worker.py) and comparing weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("dist_worker.py")
FSDP2_CONFIG = Path(__file__).parent / "data" / "fsdp2.yaml"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(port: int, *target: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N --master_port PORT TARGET...`` (TARGET: ``-m mod args`` or a
    script and its arguments)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_port", str(port), *target]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())


def accelerate_launch(port: int, *target: str, options: tuple[str, ...] = ()) -> Any:
    """``accelerate launch OPTIONS --main_process_port PORT TARGET...``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *options]
    cmd += ["--main_process_port", str(port), *target]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())


def write_args(path: Path, args: dict[str, Any]) -> str:
    path.write_text(json.dumps(args))
    return str(path)


def summary_of(stdout: str) -> dict[str, str]:
    """The ``key : value`` lines of the training summary rank 0 printed."""
    text = stdout.split("accel training summary", 1)[1]
    return {
        k.strip(): v.strip()
        for k, v in (line.split(" : ", 1) for line in text.splitlines() if " : " in line)
    }


def records(out_dir: Path, nproc: int = 2) -> list[dict[str, Any]]:
    import torch

    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def saved_weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (model_dir / "adapter_config.json").is_file() else None
    return load_file(model_dir / (name or "model.safetensors"))


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def losses(log_history: list[dict[str, Any]]) -> list[float]:
    return [h["loss"] for h in log_history if "loss" in h]


def jsonl_losses(path: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def failure(done: subprocess.CompletedProcess) -> str:
    return (done.stdout[-2000:] + "\n----\n" + done.stderr[-4000:]).strip()

"""A real 2-process DDP run on CPU (torchrun, gloo) through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def torchrun(args_file: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        "29533",
        "-m",
        "accel.cli",
        "train",
        str(args_file),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_two_process_ddp_training(base_args, tmp_path):
    out_dir = tmp_path / "ddp"
    args = {
        **base_args,
        "output_dir": str(out_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "save_model_dir": str(tmp_path / "model"),
        "ddp_backend": "gloo",
    }
    path = tmp_path / "args.json"
    path.write_text(json.dumps(args))
    done = torchrun(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("accel training summary") == 1  # printed by rank 0 only
    summary = {
        k.strip(): v.strip()
        for k, v in (line.split(" : ", 1) for line in done.stdout.splitlines() if " : " in line)
    }
    assert summary["processes"] == "2"
    assert summary["train_steps"] == "3"
    logs = [json.loads(x) for x in (out_dir / "training_logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3]  # one line per event, not per rank
    assert (tmp_path / "model" / "config.json").is_file()

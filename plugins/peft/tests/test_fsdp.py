"""FSDP2 over a QLoRA model on CPU: 2 gloo processes under torchrun, ``fully_shard`` per
decoder layer. The packed 4-bit weights are sharded (DTensor), and the mean loss and the
LoRA weights after three steps equal one process training on the whole batch.

This drives ``fully_shard`` directly: on CPU accelerate never enters FSDP for the Trainer,
and transformers' sharded loading (``fsdp_size``) does not load quantized weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from fsdp_worker import build, full_batch, train

PORT = "29780"


def test_fsdp2_shards_4bit_weights_and_matches_one_process(assets, tmp_path):
    out = tmp_path / "fsdp.pt"
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", PORT,
        str(worker), str(assets / "llama"), str(out),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = torch.load(out)
    assert sharded["packed_placements"] == "(Shard(dim=0),)"

    model = build(str(assets / "llama"))
    single = [loss.item() for loss in train(model, full_batch())]
    torch.testing.assert_close(sharded["losses"], single, rtol=1e-5, atol=1e-6)
    lora = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert lora.keys() == sharded["lora"].keys()
    for name, value in lora.items():
        torch.testing.assert_close(sharded["lora"][name], value, rtol=1e-4, atol=1e-6)

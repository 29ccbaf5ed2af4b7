"""FSDP2 over a QLoRA and a GPTQ-LoRA model on CPU: 2 gloo processes under torchrun,
``fully_shard`` per decoder layer. The packed 4-bit weights are sharded (DTensor, dim 0),
and the mean loss and the LoRA weights after three steps are identical on both ranks and
equal one process training on the whole batch.

This drives ``fully_shard`` directly: on CPU accelerate never enters FSDP for the Trainer,
and transformers' sharded loading (``fsdp_size``) does not load quantized weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_worker import PACKED, build, full_batch, train

PORTS = {"bnb": "29800", "gptq": "29801"}


@pytest.fixture(params=["bnb", "gptq"])
def quantized(request, assets):
    """(kind, model folder): the GPTQ checkpoint is written only for the gptq case."""
    kind = request.param
    model = request.getfixturevalue("gptq_dir") if kind == "gptq" else assets / "llama"
    return kind, model


def test_fsdp2_shards_packed_weights_and_matches_one_process(quantized, tmp_path):
    kind, model_dir = quantized
    out = tmp_path / "fsdp.pt"
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", PORTS[kind],
        str(worker), kind, str(model_dir), str(out),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = torch.load(out)
    assert sharded["placements"] == {name: "(Shard(dim=0),)" for name in PACKED[kind]}
    for name, (rows, *rest) in sharded["full_shapes"].items():
        assert sharded["local_shapes"][name] == ((rows + 1) // 2, *rest), name  # half each

    model = build(kind, str(model_dir))
    single = [loss.item() for loss in train(model, full_batch())]
    torch.testing.assert_close(sharded["losses"], single, rtol=1e-5, atol=1e-6)
    lora = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    rank0, rank1 = sharded["lora"]
    assert lora.keys() == rank0.keys() == rank1.keys()
    for name, value in lora.items():
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0)  # identical
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in lora.items() if "lora_B" in k)

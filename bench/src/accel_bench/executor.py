"""One bench run: an entity's trainer arguments, its own process, its outcome and properties.

Every run is a fresh process (``python -m accel_bench.worker``; ``torchrun --nproc_per_node
N`` for ``number_gpus`` N > 1, each rank with ``OMP_NUM_THREADS=1`` on a CPU machine), so
its memory peak is its own and a crash cannot take the matrix down. The entity maps to the
trainer's own arguments (fms-hf-tuning's names), as in the reference's command line::

    --per_device_train_batch_size batch_size/number_gpus --max_seq_length model_max_length
    --dataset_text_field output --response_template "\\n### Response:"
    --learning_rate 1e-05 --weight_decay 0.0 --warmup_ratio 0.03 --lr_scheduler_type cosine
    (transformers 5 spells the ratio ``warmup_steps 0.03``)
    --logging_steps 1 --save_strategy no --gradient_checkpointing ... --peft_method ...

and every flag the installed plugins declare (``--fast_kernels``, ``--padding_free``,
``--fast_moe``, ...; see :func:`.scenario.plugin_flags`) passes through unchanged.
``distributed_backend: FSDP`` shards with transformers' FSDP2 at load time (``fsdp_size``:
it engages on CPU/gloo and on CUDA alike; accelerate's FSDP never engages on CPU), ``DDP``
is accelerate's DDP.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .outcome import COMPLETED, FAILED, INVALID, is_out_of_memory, killed_by_oom_killer
from .scenario import Entity


@dataclass
class RunOutcome:
    status: str  # completed, invalid, failed
    properties: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    error: dict[str, Any] | None = None
    seconds: float = 0.0


def _flag_values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def trainer_arguments(
    entity: Entity, model_dir: str, data_path: str, output_dir: str, peft_method: str
) -> dict[str, Any]:
    """The ``accel.train`` keyword arguments of ``entity`` (see the module docstring)."""
    from .datasets import RESPONSE_TEMPLATE
    from .models import target_modules

    v = entity.values
    processes = max(1, int(v["number_gpus"]))
    args: dict[str, Any] = {
        "model_name_or_path": model_dir,
        "torch_dtype": v["torch_dtype"],
        "training_data_path": data_path,
        "dataset_text_field": "output",
        "response_template": RESPONSE_TEMPLATE,
        "add_eos_token": False,  # token counts are the reference's: tokens(entry["output"])
        "max_seq_length": int(v["model_max_length"]),
        "per_device_train_batch_size": int(v["batch_size"]) // processes,
        "gradient_accumulation_steps": int(v["gradient_accumulation_steps"]),
        "num_train_epochs": float(v["num_train_epochs"]),
        "max_steps": int(v["max_steps"]),
        "learning_rate": float(v["learning_rate"]),
        "weight_decay": 0.0,
        "warmup_steps": 0.03,  # the reference's --warmup_ratio 0.03 (transformers 5 spelling)
        "lr_scheduler_type": "cosine",
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "output_dir": output_dir,
        "optim": v["optim"],
        "bf16": bool(v["bf16"]),
        "seed": int(v["seed"]),
        "gradient_checkpointing": bool(v["gradient_checkpointing"]),
        "disable_tqdm": True,
        "report_to": "none",
        "resume_from_checkpoint": "False",
        "peft_method": peft_method,
    }
    if v["gradient_checkpointing"]:
        args["gradient_checkpointing_kwargs"] = {
            "use_reentrant": bool(v["gradient_checkpointing_use_reentrant"])
        }
    if v["torch_dtype"] == "float16" and v.get("auto_gptq"):
        args["fp16"] = True  # the reference's GPTQ-LoRA command: --fp16 true
    if peft_method == "lora":
        args["r"] = int(v["r"])
        args["lora_alpha"] = int(v["lora_alpha"])
        args["target_modules"] = list(
            v["target_modules"] or target_modules(entity.values["model_name"])
        )
    if peft_method == "pt":
        args["num_virtual_tokens"] = int(v["num_virtual_tokens"])
    from .scenario import plugin_flags

    for flag in plugin_flags():  # what the plugins declare, passed through as given
        if v.get(flag) not in (None, False, 0, [], ""):
            args[flag] = _flag_values(v[flag])
    if data_path.endswith((".yaml", ".yml")):  # a mixture: its data config, not one file
        del args["training_data_path"]
        args["data_config"] = data_path
    if processes > 1 and v.get("distributed_backend") == "FSDP" and not v.get("fast_moe"):
        args["fsdp_size"] = processes
    return args


def command(entity: Entity, run_file: Path, port: int) -> list[str]:
    processes = int(entity.values["number_gpus"])
    if processes > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(port),
            "-m",
            "accel_bench.worker",
            str(run_file),
        ]
    return [sys.executable, "-m", "accel_bench.worker", str(run_file)]


def _environment(entity: Entity) -> dict[str, str]:
    env = dict(os.environ)
    if int(entity.values["number_gpus"]) > 1:
        env["OMP_NUM_THREADS"] = "1"  # N processes on a few cores oversubscribe otherwise
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _devices(entity: Entity) -> list[int]:
    if entity.values["gpu_model"] == "cpu" or int(entity.values["number_gpus"]) <= 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = int(entity.values["number_gpus"])
    if visible:
        ids = [int(x) for x in visible.split(",") if x.strip().isdigit()]
        return ids[:count]
    return list(range(count))


#: written into every run folder accel bench creates; a folder without it is not ours
RUN_MARKER = ".accel-bench-run"


def fresh_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` empty for a new attempt, deleting only a folder accel bench made."""
    if run_dir.exists():
        if not (run_dir / RUN_MARKER).is_file():
            from accel.errors import ConfigError

            raise ConfigError(
                f"{run_dir} exists and was not written by accel bench; move it away or choose "
                "another --output"
            )
        shutil.rmtree(run_dir)  # a previous attempt's files (ours: the marker says so)
    run_dir.mkdir(parents=True)
    (run_dir / RUN_MARKER).write_text("")


def execute(
    entity: Entity,
    run_dir: Path,
    train_args: dict[str, Any],
    port: int,
    timeout: float | None = None,
    clear: bool = True,
) -> RunOutcome:
    """Run ``entity`` once in its own process(es) and classify what happened. ``clear``:
    empty ``run_dir`` first (False: the caller did, and put the run's inputs there)."""
    from .sampler import ResourceSampler

    if clear:
        fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_file = run_dir / "run.json"
    bench = {
        k: entity.values.get(k)
        for k in ("stop_after_seconds", "auto_stop_method", "memory_limit_mb")
    }
    run_file.write_text(json.dumps({"train": train_args, "bench": bench}, indent=1))
    log = run_dir / "log.txt"
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            command(entity, run_file, port),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=_environment(entity),
            start_new_session=True,  # its own process group: torchrun and its ranks too
        )
        sampler = ResourceSampler(proc.pid, _devices(entity)).start()
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode = None
        except BaseException:  # interrupted: no run of ours outlives the matrix
            _kill_group(proc)
            sampler.stop()
            raise
        resources = sampler.stop()
    seconds = time.perf_counter() - start
    results = [json.loads(p.read_text()) for p in sorted(run_dir.glob("result-rank*.json"))]
    errors = [r["error"] for r in results if not r.get("ok")]
    if returncode is None:
        return RunOutcome(FAILED, reason=f"timed out after {timeout:.0f} s", seconds=seconds)
    for err in errors:
        if is_out_of_memory(err["type"], err["message"]):
            return RunOutcome(
                INVALID,
                {"is_valid": False},
                f"out of memory: {_one_line(err['message'])}",
                err,
                seconds,
            )
    if errors:
        err = errors[0]
        return RunOutcome(
            FAILED,
            reason=f"{err['type']}: {_one_line(err['message'])}",
            error=err,
            seconds=seconds,
        )
    if returncode != 0 or not any(r.get("ok") for r in results):
        tail = _log_tail(log)
        if killed_by_oom_killer(returncode, tail):
            return RunOutcome(
                INVALID,
                {"is_valid": False},
                "out of memory: the worker was killed by SIGKILL (the kernel's OOM killer)",
                {"type": "SIGKILL", "message": tail},
                seconds,
            )
        return RunOutcome(
            FAILED,
            reason=f"worker exited with {returncode}: {_one_line(tail)}",
            error={"type": "exit", "message": tail},
            seconds=seconds,
        )
    main = next(r for r in results if r.get("ok") and "summary" in r)
    props = properties_of(entity, main, results, resources)
    return RunOutcome(COMPLETED, props, seconds=seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (the worker, or torchrun and every rank)."""
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def properties_of(
    entity: Entity,
    main: dict[str, Any],
    results: list[dict[str, Any]],
    resources: dict[str, float],
) -> dict[str, Any]:
    """The reference's measured properties of a completed run.

    - ``train_runtime``, ``train_samples_per_second``, ``train_steps_per_second``: the
      Trainer's metrics (seconds from the start to the end of its training loop);
    - ``train_tokens_per_second``: "How many tokens (including padding tokens) the run
      processed every second": the trainer's count of every position fed to the model, all
      processes summed, over ``train_runtime``; ``train_tokens_per_gpu_per_second`` is that
      divided by ``number_gpus`` (equal when number_gpus <= 1). Both omitted when
      ``stop_after_seconds`` > 0, as in the reference;
    - ``dataset_tokens_per_second``: tokens from the dataset per second where, for each
      entry, ``min(len(tokens(entry["output"])), tokenizer.model_max_length,
      max_seq_length)`` (note 3 of the reference; not Hugging Face's estimate): the
      non-padding positions of every batch, summed over processes — each processed entry
      contributes exactly its tokens truncated to ``max_seq_length`` (the bench tokenizer's
      ``model_max_length`` is larger than any bench ``model_max_length``, and no EOS is
      appended); ``dataset_tokens_per_second_per_gpu`` divides it by ``number_gpus``;
    - with ``auto_stop_method``, throughputs cover the stable phase only (after warm-up).
    """
    metrics, summary = main["metrics"], main["summary"]
    gpus = max(1, int(entity.values["number_gpus"]))
    runtime = float(metrics.get("train_runtime") or summary.get("runtime_s") or math.nan)
    # the trainer's global count of positions fed; the worker's per-rank counts (the same rule:
    # input_ids positions, attention-mask ones) give the non-padding part
    padded = int(summary.get("train_tokens") or 0)
    real = sum(int(r["tokens_this_rank"][1]) for r in results if r.get("ok"))
    steps = int(summary.get("train_steps") or 0)
    samples_per_s = float(metrics.get("train_samples_per_second") or math.nan)
    steps_per_s = float(metrics.get("train_steps_per_second") or math.nan)
    windows = [r.get("window") for r in results if r.get("ok") and r.get("window")]
    props: dict[str, Any] = {}
    if windows:  # auto stop: the stable phase, summed over ranks
        runtime = max(w["seconds"] for w in windows)
        padded = sum(w["tokens"] for w in windows)
        real = sum(w["real_tokens"] for w in windows)
        w_steps = windows[0]["steps"]
        v = entity.values
        samples = w_steps * int(v["batch_size"]) * int(v["gradient_accumulation_steps"])
        samples_per_s, steps_per_s = samples / runtime, w_steps / runtime
        props["warmup_seconds"] = round(windows[0]["warmup_seconds"], 2)
    props.update(
        {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(samples_per_s, 4),
            "train_steps_per_second": round(steps_per_s, 4),
        }
    )
    if float(entity.values.get("stop_after_seconds") or -1) <= 0:
        props["train_tokens_per_second"] = round(padded / runtime, 2)
        props["train_tokens_per_gpu_per_second"] = round(padded / runtime / gpus, 2)
    props["dataset_tokens_per_second"] = round(real / runtime, 2)
    props["dataset_tokens_per_second_per_gpu"] = round(real / runtime / gpus, 2)
    props["train_tokens"] = padded
    props["dataset_tokens"] = real
    props["train_steps"] = steps
    props["final_loss"] = summary.get("final_loss")
    first = summary.get("first_loss")  # "(not logged)" when the run logged no loss
    props["first_loss"] = first if isinstance(first, (int, float)) else None
    props.update(resources)
    if main.get("cuda_peak_bytes"):
        props["gpu_memory_peak_allocated_mb"] = round(main["cuda_peak_bytes"] / 2**20, 1)
    props["distributed"] = summary.get("distributed")
    props["is_valid"] = True
    return props

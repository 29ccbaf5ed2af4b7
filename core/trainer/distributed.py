"""Choosing and checking the distributed engine of a run (DDP, accelerate's FSDP, transformers' FSDP2).

accel writes no parallelism of its own. Its job here is to configure the engines so that the
launchers users already run (``torchrun``, ``accelerate launch``) do what they say, and to stop
before training when what was asked for did not engage:

- **DDP on a machine without an accelerator.** accelerate enters its multi-CPU mode only when
  ``use_cpu`` is set (``accelerate/state.py``, ``_prepare_backend``); without it ``torchrun``
  gives N independent single-process runs. :func:`prepare_training_values` sets ``use_cpu`` and
  the gloo backend when several processes were launched and no GPU-like device is present. It
  must run before transformers' ``TrainingArguments`` is built: its ``__post_init__`` touches
  ``self.device``, which creates accelerate's ``PartialState`` once and for all. On CUDA
  nothing changes (NCCL).
- **FSDP through accelerate** (``accelerate launch --config_file fsdp.yaml`` sets
  ``ACCELERATE_USE_FSDP``; transformers' ``--fsdp`` builds the plugin itself). accelerate turns
  FSDP on only for GPU-like distributed types, so on CPU it silently stays DDP.
  :func:`check_engaged` compares what the Trainer's accelerator set up with what was asked for.
- **FSDP2 at load time** (``fsdp_size``): ``from_pretrained(distributed_config=
  DistributedConfig(fsdp_size=N))``, transformers' own engine, which shards on CPU/gloo too.
  transformers refuses Trainer checkpoints of such a model; accel writes them as sharded DCP
  state (:mod:`accel.trainer.sharded_checkpoint`), and :func:`check_launch` refuses up front
  what that layout cannot serve.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FSDP_ENV = "ACCELERATE_USE_FSDP"


def world_size() -> int:
    """Processes the launcher started (torchrun and accelerate launch both set WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def gpu_like_available() -> bool:
    """Whether accelerate would pick a GPU-like backend (NCCL & co.) rather than gloo."""
    import torch

    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def prepare_training_values(values: MutableMapping[str, Any]) -> None:
    """Make a multi-process launch on a machine without an accelerator one DDP run on gloo.

    Called on the values of transformers' TrainingArguments before it is constructed. An
    explicit ``use_cpu`` or ``ddp_backend`` from the user is kept."""
    if world_size() <= 1 or gpu_like_available():
        return
    values.setdefault("use_cpu", True)
    if values.get("use_cpu") and not values.get("ddp_backend"):
        values["ddp_backend"] = "gloo"


def accelerate_fsdp_requested(args: Any) -> str | None:
    """How FSDP through accelerate was asked for, in the user's words; None if it was not."""
    if getattr(args, "fsdp", None):  # transformers turns the option string into True
        return "--fsdp"
    if os.environ.get(FSDP_ENV, "false").lower() in ("1", "true", "yes"):
        return "an accelerate FSDP config (ACCELERATE_USE_FSDP=true)"
    return None


def requested_fsdp_version(args: Any) -> int:
    """FSDP version asked for: ``fsdp_config['version']`` with ``--fsdp`` (transformers'
    default 2), else the launcher's FSDP_VERSION (accelerate's default 1)."""
    if getattr(args, "fsdp", None):
        return int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    return int(os.environ.get("FSDP_VERSION", "1"))


def check_launch(config: Any) -> None:
    """Refuse, before anything loads, distributed requests this launch cannot honour."""
    args = config.training
    world = world_size()
    asked = accelerate_fsdp_requested(args)
    fsdp_size = getattr(config.model, "fsdp_size", None)
    if asked and fsdp_size:
        raise ConfigError(
            f"fsdp_size {fsdp_size} (transformers' FSDP2 at load time) and {asked} (accelerate's "
            "FSDP) both shard the model; choose one"
        )
    if asked and world <= 1:
        raise ConfigError(
            f"FSDP was requested ({asked}) but this is a single process; launch several, e.g. "
            "`accelerate launch --config_file fsdp.yaml -m accel.cli train ...` or "
            "`torchrun --nproc_per_node N -m accel.cli train ...`"
        )
    if not fsdp_size:
        return
    if fsdp_size < 1 or world % fsdp_size or world == 1:
        raise ConfigError(
            f"fsdp_size {fsdp_size} needs a multi-process launch whose process count it divides "
            f"(this launch has {world}); run `torchrun --nproc_per_node {max(fsdp_size, 2)} "
            "-m accel.cli train ...`"
        )
    check_load_time_sharding_checkpoints(args, f"fsdp_size {fsdp_size}")


def check_load_time_sharding_checkpoints(args: Any, what: str) -> None:
    """Checkpoints of a model sharded at load time (``what``: fsdp_size, expert parallelism)
    are sharded DCP state (:mod:`accel.trainer.sharded_checkpoint`). Refuse, before training,
    what that cannot serve: reloading the best model at the end, and resuming from a
    checkpoint of another layout (a run that was not sharded at load time)."""
    save = str(getattr(args.save_strategy, "value", args.save_strategy))
    if save != "no" and getattr(args, "load_best_model_at_end", False):
        raise ConfigError(
            f"{what}: load_best_model_at_end cannot reload the checkpoints of a model sharded at "
            "load time; drop it (the best checkpoint stays in output_dir, `accel moe export` "
            "turns it into a plain model)"
        )
    from .checkpoints import newest_checkpoint
    from .sharded_checkpoint import MARKER, MODEL_DIR, has_layout

    resume = str(args.resume_from_checkpoint or "").strip()
    if resume.lower() in ("false", "no", "0"):
        return
    if resume.lower() in ("", "true", "yes", "1", "none"):
        found = newest_checkpoint(args.output_dir, warn=False)
        where = f"{found} (auto-resume)"
    else:
        # not a checkpoint at all: resolve_resume says so
        found = resume if (Path(resume) / "trainer_state.json").is_file() else None
        where = resume
    if found and not has_layout(found):
        raise ConfigError(
            f"{what}: cannot resume from {where}: it was written by a run that was not sharded "
            f"at load time (no {MODEL_DIR}/ and {MARKER}), whose optimizer state does not fit "
            "sharded parameters; resume it with the kind of run that wrote it, or set "
            "resume_from_checkpoint False to start fresh"
        )


def distributed_config(config: Any) -> Any:
    """The DistributedConfig to load the model with, or None. With fewer shards than
    processes, the shard groups are replicated (HSDP): transformers' mesh must cover every
    process."""
    fsdp_size = getattr(config.model, "fsdp_size", None)
    if not fsdp_size:
        return None
    from transformers.distributed import DistributedConfig

    return DistributedConfig(fsdp_size=fsdp_size, dp_replicate_size=world_size() // fsdp_size)


def check_engaged(trainer: Any, config: Any) -> None:
    """After the Trainer is built: the engine asked for is the one accelerate set up."""
    from accelerate.utils import DistributedType

    args = config.training
    accelerator = trainer.accelerator
    kind = accelerator.distributed_type
    world = world_size()
    asked = accelerate_fsdp_requested(args)
    if asked:
        if kind != DistributedType.FSDP or not trainer.is_fsdp_enabled:
            device = accelerator.device.type
            why = (
                "accelerate runs FSDP only on GPU-like devices. Run on GPUs, drop the FSDP "
                "request to train with DDP, or shard at load time with transformers' FSDP2 "
                "(--fsdp_size N, works on CPU)"
                if device == "cpu"
                else "check the accelerate config (distributed_type: FSDP) and that the run was "
                "started with `accelerate launch --config_file ...`"
            )
            raise ConfigError(
                f"FSDP was requested ({asked}) but accelerate set up {kind.value} on {device}: "
                + why
            )
        wanted, got = requested_fsdp_version(args), accelerator.state.fsdp_plugin.fsdp_version
        if wanted != got:
            raise ConfigError(f"FSDP version {wanted} was requested but accelerate set up {got}")
    if world > 1 and accelerator.num_processes != world:
        raise ConfigError(
            f"{world} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({kind.value}); on a machine without GPUs pass use_cpu True and ddp_backend gloo"
        )
    sharded = getattr(trainer.model, "is_distributed_loading_by_transformers", False) and any(
        _is_dtensor(p) for p in trainer.model.parameters()
    )
    if getattr(config.model, "fsdp_size", None) and not sharded:
        raise ConfigError(
            f"fsdp_size {config.model.fsdp_size} was requested but the model was not sharded "
            "at load time (a plugin that loads the model may not pass distributed_config)"
        )


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def describe(trainer: Any) -> str:
    """One word for the summary: the engine that really runs."""
    from accelerate.utils import DistributedType

    if getattr(trainer.model, "is_distributed_loading_by_transformers", False):
        return "fsdp2 (transformers, sharded at load time)"
    kind = trainer.accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{trainer.accelerator.state.fsdp_plugin.fsdp_version} (accelerate)"
    if kind == DistributedType.NO:
        return "none"
    return f"ddp ({trainer.accelerator.state.backend})"


def make_engaged_check_callback(trainer: Any) -> Any:
    """A callback that checks, once the model is wrapped and before the first step, that the
    parameters really are what the engine produces (DTensors for FSDP2, a DDP wrapper for DDP)."""
    from transformers import TrainerCallback

    class EngagedCheck(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            from accelerate.utils import DistributedType

            kind = trainer.accelerator.distributed_type
            wrapped = trainer.model_wrapped
            if kind == DistributedType.FSDP and trainer.accelerator.is_fsdp2:
                if not any(_is_dtensor(p) for p in wrapped.parameters()):
                    raise ConfigError("FSDP2 was set up but no parameter was sharded (DTensor)")
            elif (
                kind.value.startswith("MULTI_")
                and trainer.accelerator.num_processes > 1
                and not getattr(trainer.model, "is_distributed_loading_by_transformers", False)
            ):
                from torch.nn.parallel import DistributedDataParallel

                inner = getattr(wrapped, "_orig_mod", wrapped)  # torch.compile wraps DDP
                if not isinstance(inner, DistributedDataParallel):
                    raise ConfigError(
                        f"{kind.value} was set up but the model is not wrapped in DDP "
                        f"({type(inner).__name__})"
                    )

    return EngagedCheck()

"""Trainer checkpoints of a model sharded at load time, and their export to a plain HF model.

A model loaded with ``from_pretrained(distributed_config=...)`` (``fsdp_size``, expert
parallelism) holds DTensors on one or more device meshes. transformers refuses to checkpoint
its optimizer, so accel writes the sharded state itself with ``torch.distributed.checkpoint``
(DCP): every process writes its own shards, nothing is gathered, and
``get_state_dict``/``set_state_dict`` translate between the DTensors and the files. Layout of
``checkpoint-N`` (the folder names are accelerate's for FSDP sharded state dicts):

- ``pytorch_model_fsdp_0/``: DCP of ``{"model": state}``: every parameter of a full model, or
  only the trainable ones of a PEFT model (whose adapter is also saved as a plain PEFT
  adapter);
- ``optimizer_0/``: DCP of ``{"optimizer": state}``;
- ``load_time_sharding.json``: marks the layout (process count, mesh sizes);
- ``config.json``, the tokenizer, ``scheduler.pt``, ``rng_state_<rank>.pth`` and
  ``trainer_state.json`` (written last) as in every Trainer checkpoint.

DCP writes each folder's ``.metadata`` only once every process has written its shards, and
:mod:`accel.trainer.checkpoints` refuses a folder without it, so a killed save is never resumed
from. DCP reshards on load: a checkpoint may be resumed with another process count.

:func:`export_checkpoint` reads such a checkpoint in one process (no process group) and writes
the plain Hugging Face model that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MODEL_DIR = "pytorch_model_fsdp_0"
OPTIMIZER_DIR = "optimizer_0"
MARKER = "load_time_sharding.json"


def is_sharded_at_load(model: Any) -> bool:
    """Whether transformers sharded ``model`` (or the base model of a PEFT model) as it loaded."""
    if getattr(model, "is_distributed_loading_by_transformers", False):
        return True
    base = getattr(model, "get_base_model", None)
    return bool(base and getattr(base(), "is_distributed_loading_by_transformers", False))


def is_peft(model: Any) -> bool:
    """A PEFT model (its checkpoints hold the adapter plainly and only trainable weights as DCP)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _options(model: Any, **extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # a PEFT model keeps its frozen base weights as loaded: only the trainable ones are state
    return StateDictOptions(ignore_frozen_params=is_peft(model), **extra)


def save_state(model: Any, optimizer: Any, folder: str | Path, layout: dict[str, Any]) -> None:
    """Every process: write the model's and the optimizer's shards into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
    dcp.save({"model": model_state}, checkpoint_id=str(folder / MODEL_DIR))
    dcp.save({"optimizer": optim_state}, checkpoint_id=str(folder / OPTIMIZER_DIR))
    if _rank() == 0:
        _write_json(folder / MARKER, layout)


def load_model_state(model: Any, folder: str | Path) -> None:
    """Every process: restore the model's shards from a checkpoint written by :func:`save_state`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model, options=_options(model))}
    dcp.load(state, checkpoint_id=str(Path(folder) / MODEL_DIR))
    set_model_state_dict(model, state["model"], options=_options(model, strict=not is_peft(model)))


def load_optimizer_state(model: Any, optimizer: Any, folder: str | Path) -> None:
    """Every process: restore the optimizer's shards (the optimizer is built, not yet stepped)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {"optimizer": get_optimizer_state_dict(model, optimizer, options=_options(model))}
    dcp.load(state, checkpoint_id=str(Path(folder) / OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_options(model))


def has_layout(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file() and (Path(folder) / MODEL_DIR).is_dir()


def layout_of(model: Any, world_size: int) -> dict[str, Any]:
    """What :data:`MARKER` records: the process count and the mesh sizes of the run."""
    base = model.get_base_model() if is_peft(model) else model
    dist = getattr(getattr(base, "config", None), "distributed_config", None)
    sizes = {
        key: getattr(dist, key)
        for key in ("fsdp_size", "ep_size", "tp_size", "dp_replicate_size")
        if isinstance(getattr(dist, key, None), int)
    }
    return {"written_by": "accel", "processes": world_size, **sizes, "peft": is_peft(model)}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".accel-tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_full_state(folder: str | Path) -> dict[str, Any]:
    """The whole model state of a checkpoint as plain tensors, read in this one process."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(Path(folder) / MODEL_DIR))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and key.startswith("model.")
    }
    with warnings.catch_warnings():  # one process on purpose: DCP's warning says so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key.removeprefix("model."): value for key, value in state.items()}


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> str:
    """Write the plain Hugging Face model of a load-time-sharded checkpoint into ``output``
    (a new folder, written under a temporary name and renamed when complete)."""
    source, target = Path(checkpoint), Path(output)
    _check_export(source, target)
    layout = json.loads((source / MARKER).read_text())
    if layout.get("peft"):
        raise ConfigError(
            f"{source} is a PEFT checkpoint: its adapter is already saved there as a plain PEFT "
            "adapter (adapter_model.safetensors), which PeftModel.from_pretrained loads"
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    state = read_full_state(source)
    config = AutoConfig.from_pretrained(source)
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # assign: every tensor keeps the dtype it was trained in; tied weights are tied again
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ConfigError(
            f"{source}: the checkpoint does not fit {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    staging = target.with_name(f".{target.name}.accel-staging")
    if staging.exists():
        if not (staging / _STAGING_MARK).is_file():
            raise ConfigError(f"'{staging}' exists and was not made by accel; move it away")
        shutil.rmtree(staging)  # left by a killed export
    staging.mkdir()
    (staging / _STAGING_MARK).write_text("temporary folder of an accel export; safe to delete\n")
    try:
        model.save_pretrained(staging)
        _copy_tokenizer(source, staging)
        (staging / _STAGING_MARK).unlink()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target.resolve())


_STAGING_MARK = ".accel-temporary"


def _check_export(source: Path, target: Path) -> None:
    if not source.is_dir():
        raise ConfigError(f"'{source}' is not a checkpoint folder")
    if not has_layout(source):
        weights = any(source.glob("*.safetensors")) or any(source.glob("pytorch_model*.bin"))
        raise ConfigError(
            f"'{source}' is not a sharded checkpoint of a model sharded at load time (no {MARKER}"
            f" and {MODEL_DIR}/)"
            + ("; it already holds plain Hugging Face weights" if weights else "")
        )
    meta = source / MODEL_DIR / ".metadata"
    if not meta.is_file() or meta.stat().st_size == 0:
        raise ConfigError(f"{meta} is missing: the save of this checkpoint did not finish")
    if target.exists():
        raise ConfigError(f"output folder '{target}' exists; give a new folder")
    if not target.parent.is_dir() and target.parent != Path(""):
        target.parent.mkdir(parents=True, exist_ok=True)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)

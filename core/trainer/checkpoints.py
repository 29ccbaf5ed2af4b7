"""Which checkpoint a run resumes from, and whether it can be trusted.

A checkpoint is resumable only when it holds the whole training state transformers' Trainer
writes: ``trainer_state.json``, the model or adapter weights, the optimizer
(``optimizer.pt``; FSDP: ``optimizer.bin`` or an ``optimizer_0`` folder), ``scheduler.pt`` and
the RNG state (``rng_state.pth``, or ``rng_state_<rank>.pth`` per process). ``save_only_model``
writes only the weights and ``trainer_state.json``: such a checkpoint is refused, because
resuming from it would silently restart the optimizer and the learning-rate schedule. A model
sharded at load time is checkpointed as sharded DCP folders instead (``pytorch_model_fsdp_0``,
``optimizer_0``; :mod:`accel.trainer.sharded_checkpoint`), checked like accelerate's.

Every file is checked cheaply, before any model loads: JSON files parse, a safetensors file's
size equals what its header declares, torch files (``.pt``/``.pth``/``.bin``) are zip archives
whose directory is intact (a killed save truncates the end of a file, where both live).
Auto-resume skips a damaged or unfinished newest checkpoint with a warning and takes the
previous complete one; an explicit ``resume_from_checkpoint`` that is damaged is an error naming
the file. Checkpoints of another model (different architecture or shape, full weights vs an
adapter) are an error: training on would mix two runs in one folder.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError

logger = logging.getLogger("accel")

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = re.compile(
    r"^(model|adapter_model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$"
    r"|^(model|pytorch_model)\.(safetensors|bin)\.index\.json$"
    r"|^pytorch_model_fsdp(_\d+)?(_rank\d+)?(\.bin)?$"
    r"|^global_step\d+$"
)
_OPTIMIZER = re.compile(
    r"^optimizer\.(pt|bin)$|^optimizer_\d+(_rank\d+\.bin)?$|^rank\d+-of-\d+-optimizer\.pt$"
    r"|^global_step\d+$"
)
_RNG = re.compile(r"^rng_state(_(\d+))?\.pth$")
# Config keys that fix the shapes of a model's weights: a checkpoint whose values differ
# belongs to another model.
_SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "num_local_experts",
    "num_experts",
    "n_embd",
    "n_layer",
    "n_head",
)
_PEFT_TYPES = {"lora": "LORA", "alora": "LORA", "pt": "PROMPT_TUNING"}


class CheckpointProblem(Exception):
    """Why one checkpoint folder cannot be resumed from (internal; becomes a warning or error)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind  # "damaged", "not_checkpoint", "model_only", "foreign"


def resolve_resume(
    value: Any,
    output_dir: str,
    *,
    model_config: Any = None,
    tuning: Any = None,
    warn: bool = True,
) -> str | None:
    """``None``/"true": the newest resumable checkpoint in output_dir (if any); "false": none;
    anything else: that checkpoint path, which must be resumable.

    ``model_config`` (the run's model config) and ``tuning`` (its TuningArguments) let a
    checkpoint of another model be told apart; ``warn`` is false on all but the main process.
    """
    text = str(value).strip().lower() if value is not None else ""
    if text in ("false", "no", "0"):
        return None
    if text in ("", "true", "yes", "1", "none"):
        return newest_checkpoint(output_dir, model_config=model_config, tuning=tuning, warn=warn)
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint '{value}' is not a checkpoint directory")
    try:
        check_checkpoint(path, model_config=model_config, tuning=tuning)
    except CheckpointProblem as problem:
        fix = {
            "damaged": "; name an intact checkpoint, or leave resume_from_checkpoint unset to "
            "resume from the newest intact one in output_dir",
            "not_checkpoint": "; to start from a model's weights, pass it as model_name_or_path",
        }.get(problem.kind, "")
        raise ConfigError(f"resume_from_checkpoint '{value}': {problem}{fix}") from None
    return str(value)


def newest_checkpoint(
    output_dir: str,
    *,
    model_config: Any = None,
    tuning: Any = None,
    warn: bool = True,
) -> str | None:
    """The highest-numbered ``checkpoint-N`` in output_dir that can be resumed from.

    Damaged, unfinished or non-checkpoint folders are skipped with a warning; a model-only
    checkpoint or another model's checkpoint is an error (resuming past it would lose its
    progress; training on would mix two runs)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    skipped = 0
    for _, path in sorted(found, reverse=True):
        try:
            check_checkpoint(path, model_config=model_config, tuning=tuning)
        except CheckpointProblem as problem:
            if problem.kind in ("model_only", "foreign"):
                raise ConfigError(f"{path}: {problem}") from None
            if warn:
                hint = (
                    "rename it or move it out of output_dir to silence this"
                    if problem.kind == "not_checkpoint"
                    else "falling back to an earlier one; delete this folder once not needed"
                )
                logger.warning("skipping %s: %s (%s)", path, problem, hint)
                skipped += problem.kind == "damaged"
            continue
        return str(path)
    if skipped:
        logger.warning("no intact checkpoint left in %s: training starts from step 0", root)
    return None


def check_checkpoint(path: Path, *, model_config: Any = None, tuning: Any = None) -> None:
    """Raise :class:`CheckpointProblem` unless ``path`` holds a complete, intact training state
    of this run's model."""
    names = {p.name for p in path.iterdir()}
    weights = sorted(n for n in names if _WEIGHTS.match(n))
    optimizer = sorted(n for n in names if _OPTIMIZER.match(n))
    rng = sorted(n for n in names if _RNG.match(n))
    if TRAINER_STATE not in names:
        if not weights and not optimizer:
            raise CheckpointProblem(
                "not a checkpoint (no trainer_state.json, no weights)",
                "not_checkpoint",
            )
        raise CheckpointProblem(
            "trainer_state.json is missing: the save did not finish",
            "damaged",
        )
    for name in sorted(names):
        _check_file(path / name)
    state = _read_json(path / TRAINER_STATE)
    if not isinstance(state.get("global_step"), int):
        raise CheckpointProblem(
            "trainer_state.json has no global_step: not a Trainer checkpoint", "damaged"
        )
    if not weights:
        raise CheckpointProblem("no model or adapter weights in it", "damaged")
    _check_same_model(path, names, model_config, tuning)
    if not optimizer and "scheduler.pt" not in names and not rng:
        adapter = "adapter_config.json" in names
        raise CheckpointProblem(
            "holds the model weights only (saved with save_only_model True), not the optimizer, "
            "scheduler and RNG state needed to resume. To train on from these weights with a new "
            "optimizer, "
            + (
                "merge the adapter into its base model and pass that as model_name_or_path"
                if adapter
                else f"pass --model_name_or_path {path}"
            )
            + "; to start over, set resume_from_checkpoint False",
            "model_only",
        )
    missing = []
    if not optimizer:
        missing.append("the optimizer state (optimizer.pt)")
    if "scheduler.pt" not in names:
        missing.append("scheduler.pt")
    if not rng:
        missing.append("the RNG state (rng_state.pth)")
    elif "rng_state.pth" not in names:
        # N processes write rng_state_0..N-1.pth (one process: rng_state.pth), each its own,
        # with no barrier before trainer_state.json: a gap, or rng_state_0.pth alone, is a
        # process that died before writing its file.
        ranks = {int(m.group(2)) for m in map(_RNG.match, rng) if m and m.group(2)}
        absent = [i for i in range(max(ranks) + 1) if i not in ranks] or (
            [1] if ranks == {0} else []
        )
        missing += [f"rng_state_{i}.pth" for i in absent]
    if missing:
        raise CheckpointProblem(
            f"{' and '.join(missing)} missing: the save did not finish", "damaged"
        )


def _check_file(path: Path) -> None:
    """Cheap integrity checks by file type (folders: a torch.distributed.checkpoint needs its
    ``.metadata``, written last)."""
    name = path.name
    if path.is_dir():
        if (_WEIGHTS.match(name) or _OPTIMIZER.match(name)) and not name.startswith("global_step"):
            meta = path / ".metadata"
            if not meta.is_file() or meta.stat().st_size == 0:
                raise CheckpointProblem(
                    f"{name}/.metadata is missing: the save did not finish", "damaged"
                )
        return
    if name.endswith(".index.json"):
        shards = _read_json(path).get("weight_map")
        if not isinstance(shards, dict):
            raise CheckpointProblem(f"{name} is damaged (no weight_map)", "damaged")
        files = {str(f) for f in shards.values()}
        absent = sorted(f for f in files if not (path.parent / f).is_file())
        if absent:
            raise CheckpointProblem(f"{absent[0]}, listed in {name}, is missing", "damaged")
    elif name.endswith(".json"):
        _read_json(path)
    elif name.endswith(".safetensors"):
        _check_safetensors(path)
    elif name.endswith((".pt", ".pth", ".bin")):
        _check_torch_zip(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointProblem(f"{path.name} is damaged ({_reason(exc)})", "damaged") from None
    if not isinstance(data, dict):
        raise CheckpointProblem(f"{path.name} is damaged (not a JSON object)", "damaged")
    return data


def _check_safetensors(path: Path) -> None:
    """8-byte little-endian header length, a JSON header, and data that ends exactly at the
    file's end (safetensors' own layout)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            if size < 8:
                raise ValueError("shorter than its header")
            (length,) = struct.unpack("<Q", fh.read(8))
            if 8 + length > size:
                raise ValueError("truncated header")
            header = json.loads(fh.read(length))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointProblem(f"{path.name} is damaged ({_reason(exc)})", "damaged") from None
    if size != 8 + length + end:
        raise CheckpointProblem(
            f"{path.name} is truncated ({size} bytes, its header declares {8 + length + end})",
            "damaged",
        )


def _check_torch_zip(path: Path) -> None:
    """torch.save writes a zip archive; its central directory sits at the end of the file, so a
    truncated file fails to open. Each member must also lie inside the file."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    raise zipfile.BadZipFile(f"member {info.filename} lies past the end")
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointProblem(f"{path.name} is damaged ({_reason(exc)})", "damaged") from None


def _check_same_model(path: Path, names: set[str], model_config: Any, tuning: Any) -> None:
    """Refuse a checkpoint of another model: full weights vs an adapter, another adapter type or
    rank, or a config whose shape-defining values differ from this run's model."""
    adapter = "adapter_config.json" in names
    method = getattr(tuning, "peft_method", None)
    if method is not None:
        wants_adapter = method != "none"
        if adapter != wants_adapter:
            held = "a PEFT adapter" if adapter else "full model weights"
            run = f"peft_method {method}" if wants_adapter else "full fine-tuning"
            raise CheckpointProblem(_foreign(f"holds {held} but this run uses {run}"), "foreign")
    if adapter:
        cfg = _read_json(path / "adapter_config.json")
        expected = _PEFT_TYPES.get(str(method))
        if expected and cfg.get("peft_type") not in (None, expected):
            raise CheckpointProblem(
                _foreign(f"holds a {cfg.get('peft_type')} adapter, this run trains {expected}"),
                "foreign",
            )
        if expected == "LORA" and tuning is not None and cfg.get("r") not in (None, tuning.r):
            raise CheckpointProblem(
                _foreign(f"holds a LoRA adapter of r {cfg.get('r')}, this run uses r {tuning.r}"),
                "foreign",
            )
        base = cfg.get("base_model_name_or_path")
        base_config = Path(str(base)) / "config.json" if base else None
        held = _read_json(base_config) if base_config and base_config.is_file() else None
    else:
        held = _read_json(path / "config.json") if "config.json" in names else None
    if held is None or model_config is None:
        return
    ours = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    diffs = [
        f"{key} {held[key]} (this run: {ours[key]})"
        for key in _SHAPE_KEYS
        if key in held and key in ours and held[key] != ours[key]
    ]
    if diffs:
        raise CheckpointProblem(_foreign("is another model's: " + ", ".join(diffs)), "foreign")


def _foreign(what: str) -> str:
    return (
        f"{what}. Use another output_dir for this run, or set resume_from_checkpoint False to "
        "start fresh beside these checkpoints"
    )


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__

"""Writing the final model into ``save_model_dir`` without losing anything else there.

``save_model_dir`` may be ``output_dir`` itself (fms-hf-tuning's documented layout: the final
model, the checkpoints and ``training_logs.jsonl`` side by side) or a folder that holds the
user's own files. So the folder is never replaced as a whole:

1. every process calls ``trainer.save_model`` (FSDP gathers the weights) into a staging folder
   inside the target, ``.accel-staging``, marked as ours by a ``.accel-temporary`` file;
2. the main process moves the new files in one by one with ``os.replace`` (atomic per file:
   the staging folder is on the same filesystem), giving them the user's umask (safetensors
   writes weights 0600). A file there that the save would overwrite is replaced only if it is
   the previous model's (see 3.) or is named like a saved model's file (``config.json``,
   weights, tokenizer files, ...); any other — e.g. the user's ``README.md``, where PEFT writes
   a model card — is kept, and the model's file of that name is not written (with a warning);
3. files of the *previous* model that the new save did not rewrite are removed, and nothing
   else: the files listed in ``.accel-model-files.json``, the manifest each save writes; in a
   folder without a manifest, only the weight and adapter files of the Hugging Face save format
   (``model*.safetensors`` and its index, ``pytorch_model*.bin`` and its index,
   ``adapter_model.*``, ``adapter_config.json``), which beside the new model would make the
   folder load ambiguously. Sub-folders (checkpoints) and any other file are never touched.

Before the moves, the manifest lists old and new files together, so a save killed midway
leaves every model file recorded as the model's; the next save cleans up, and also removes a
staging folder left by a killed save (only one that carries our marker).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError

logger = logging.getLogger("accel")

STAGING = ".accel-staging"
MARKER = ".accel-temporary"
MANIFEST = ".accel-model-files.json"
_MANIFEST_TMP = MANIFEST + ".accel-tmp"
# Names a saved model's files have: overwriting one of these in save_model_dir replaces a model
# file, not a user's (README.md, which PEFT writes as a model card, is not among them).
_MODEL_FILE = re.compile(
    r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$"
    r"|^(adapter_config|config|generation_config|tokenizer|tokenizer_config|special_tokens_map"
    r"|added_tokens|preprocessor_config|processor_config|chat_template|vocab)\.json$"
    r"|^(tokenizer\.model|vocab\.txt|merges\.txt|chat_template\.jinja|training_args\.bin)$"
)
_HF_WEIGHTS = re.compile(
    r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$"
    r"|^(model|pytorch_model)\.(safetensors|bin)\.index\.json$"
    r"|^adapter_model\.(safetensors|bin)$|^adapter_config\.json$"
)


def save_final_model(trainer: Any, target: str) -> str:
    """Save the final model (and tokenizer) into ``target``; return its absolute path."""
    final = Path(target).resolve()
    staging = final / STAGING
    main = trainer.is_world_process_zero()
    if main:
        check_save_dir(str(final))
        final.mkdir(parents=True, exist_ok=True)
        remove_orphans(final)
        staging.mkdir()
        (staging / MARKER).write_text("temporary folder of an accel save; safe to delete\n")
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank calls it: FSDP gathers the weights
    trainer.accelerator.wait_for_everyone()
    if main:
        install(staging, final)
    trainer.accelerator.wait_for_everyone()
    return str(final)


def check_save_dir(path: str | None) -> None:
    """Cheap check before training: ``save_model_dir`` must be (or be creatable as) a writable
    folder."""
    if not path:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"save_model_dir '{path}' is a file; give a folder")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"save_model_dir '{path}' lies under the file '{existing}'")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"save_model_dir '{path}': '{existing}' is not writable")
    _check_staging(target / STAGING)


def _check_staging(staging: Path) -> None:
    if staging.is_dir() and not (staging / MARKER).is_file() and any(staging.iterdir()):
        raise ConfigError(
            f"'{staging}' exists and was not made by accel; move it away so the model can be saved"
        )


def install(staging: Path, final: Path) -> list[str]:
    """Move the staged model into ``final`` file by file, then drop the previous model's stale
    files (see the module docstring for which). Returns the files of the user's that were kept
    in place of one the save wrote (e.g. their own README.md where PEFT writes a model card)."""
    staged = sorted(
        p.relative_to(staging).as_posix()
        for p in staging.rglob("*")
        if p.is_file() and p.name != MARKER
    )
    apply_umask(p for p in staging.rglob("*") if p.name != MARKER)
    previous = read_manifest(final)
    if previous is None:
        previous = [p.name for p in final.iterdir() if p.is_file() and _HF_WEIGHTS.match(p.name)]
    ours = set(previous)
    kept = [rel for rel in staged if _is_users(final / rel, rel, ours)]
    new = [rel for rel in staged if rel not in kept]
    stale = sorted(ours - set(new))
    _write_manifest(final, sorted(ours | set(new)))  # a killed save stays cleanable
    for rel in new:
        dst = final / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dst)
    for rel in stale:
        path = final / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
        _remove_empty_parents(path.parent, final)
    _write_manifest(final, new)
    shutil.rmtree(staging)
    if kept:
        logger.warning(
            "kept your %s in %s: the model's own file%s of that name %s not written",
            ", ".join(kept),
            final,
            "s" if len(kept) > 1 else "",
            "were" if len(kept) > 1 else "was",
        )
    return kept


def _is_users(dst: Path, rel: str, ours: set[str]) -> bool:
    """An existing path the save would overwrite that is neither a previous model's file nor
    named like a file of a saved model (config.json, weights, tokenizer files, ...)."""
    if not (dst.exists() or dst.is_symlink()) or rel in ours:
        return False
    return dst.is_dir() or not _MODEL_FILE.match(dst.name)


def remove_orphans(folder: Path) -> None:
    """Remove what a killed save left in ``folder``: our marked staging folder and our
    manifest's temporary file. Anything we cannot prove is ours stays."""
    staging = folder / STAGING
    _check_staging(staging)
    if staging.is_dir():
        if (staging / MARKER).is_file():
            shutil.rmtree(staging)
        else:
            staging.rmdir()  # empty: killed right after creating it
    tmp = folder / _MANIFEST_TMP
    if tmp.is_file():
        tmp.unlink()


def read_manifest(folder: Path) -> list[str] | None:
    """The files the previous save wrote into ``folder`` (None when there is no manifest)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        return None
    # only plain relative names inside the folder: never follow a manifest outside it
    return [f for f in files if isinstance(f, str) and f and ".." not in Path(f).parts]


def _write_manifest(folder: Path, files: list[str]) -> None:
    tmp = folder / _MANIFEST_TMP
    tmp.write_text(json.dumps({"written_by": "accel", "files": files}, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def _remove_empty_parents(path: Path, stop: Path) -> None:
    while path != stop and stop in path.parents and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(paths: Iterable[Path]) -> None:
    """Give files and folders the permissions the user's umask asks for (0666/0777 masked)."""
    mask = current_umask()
    for path in paths:
        if path.is_symlink():
            continue
        mode = (0o777 if path.is_dir() else 0o666) & ~mask
        if path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)

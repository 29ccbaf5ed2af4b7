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

Before the moves, the manifest lists old and new files together and journals the install
(which files come in, which old ones go). A save killed during the moves leaves the target
holding part of each model and the staging folder the rest; the next start (of a run with
this ``save_model_dir``, or the next save) finishes that install from the journal, so the
folder is again one whole model, the new one. A save killed before its install began (while
the staging folder was being written) left the previous model untouched: the next start
removes the staging folder (only one that carries our marker).
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
        recover(final)
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
    # the journal: a save killed from here on is finished by the next start (recover)
    _write_manifest(final, sorted(ours | set(new)), {"new": new, "stale": stale})
    _finish(staging, final, new, stale)
    if kept:
        logger.warning(
            "kept your %s in %s: the model's own file%s of that name %s not written",
            ", ".join(kept),
            final,
            "s" if len(kept) > 1 else "",
            "were" if len(kept) > 1 else "was",
        )
    return kept


def _finish(staging: Path, final: Path, new: list[str], stale: list[str]) -> None:
    """Move in the staged files not moved yet, remove the previous model's stale files, record
    the new model in the manifest, drop the staging folder. Safe to repeat after a kill."""
    for rel in new:
        src, dst = staging / rel, final / rel
        if src.is_file() or src.is_symlink():  # else moved already
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    for rel in stale:
        path = final / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
        _remove_empty_parents(path.parent, final)
    _write_manifest(final, [rel for rel in new if (final / rel).exists()])
    if staging.is_dir():
        shutil.rmtree(staging)


def recover(folder: Path) -> str | None:
    """Make ``folder`` one whole model again after a killed save: finish an install its
    journal records ("finished"), else remove a staging folder of ours ("removed", the
    previous model was never touched); None when there was nothing to do."""
    journal = _journal(folder)
    staging = folder / STAGING
    if journal is not None and (not staging.exists() or (staging / MARKER).is_file()):
        _finish(staging, folder, *journal)
        (folder / _MANIFEST_TMP).unlink(missing_ok=True)
        logger.warning("finished the model save that was interrupted in %s", folder)
        return "finished"
    had_staging = staging.is_dir()
    remove_orphans(folder)
    return "removed" if had_staging else None


def recover_interrupted_save(path: str | None) -> None:
    """At the start of a run (main process): finish or drop a save a killed run left in
    ``save_model_dir``, before anything reads or replaces that folder."""
    if not path or os.environ.get("RANK", "0") != "0" or not Path(path).is_dir():
        return
    recover(Path(path).resolve())


def _journal(folder: Path) -> tuple[list[str], list[str]] | None:
    """(files coming in, old files going) of an install that did not finish, if any."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    journal = data.get("installing") if isinstance(data, dict) else None
    if not isinstance(journal, dict):
        return None
    lists = [journal.get("new"), journal.get("stale")]
    if not all(isinstance(x, list) for x in lists):
        return None
    new, stale = ([f for f in x if _plain(f)] for x in lists)
    return new, stale


def _plain(name: object) -> bool:
    """A plain relative name inside the folder: never follow a manifest outside it."""
    return isinstance(name, str) and bool(name) and ".." not in Path(name).parts


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
    return [f for f in files if _plain(f)]


def _write_manifest(
    folder: Path, files: list[str], installing: dict[str, list[str]] | None = None
) -> None:
    data: dict[str, Any] = {"written_by": "accel", "files": files}
    if installing is not None:
        data["installing"] = installing
    tmp = folder / _MANIFEST_TMP
    tmp.write_text(json.dumps(data, indent=1) + "\n")
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

"""Writing a new model folder atomically: everything goes to a hidden sibling folder first and
is renamed into place only when complete, so a failed or interrupted run leaves the target as
it was. Only a missing or empty target is accepted: nothing a user wrote is replaced."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from accel.api import ConfigError


def check_output_dir(path: str, key: str = "output_dir") -> Path:
    target = Path(path).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        what = "is a file" if not target.is_dir() else "is not empty"
        raise ConfigError(
            f"{key} '{path}' {what}; pass a new folder (nothing existing is overwritten)"
        )
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} '{path}' cannot be written (folder '{parent}' is not writable)")
    return target


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A fresh staging folder next to ``target``; renamed to ``target`` when the block ends
    without an error, removed (it is ours) when it raises."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        if target.exists():  # an empty folder (checked) may be replaced by the complete one
            target.rmdir()
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

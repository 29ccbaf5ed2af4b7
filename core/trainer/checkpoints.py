"""Which checkpoint a run resumes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError


def resolve_resume(value: Any, output_dir: str) -> str | None:
    """``None``/"true": newest complete checkpoint in output_dir (if any); "false": none;
    anything else: that checkpoint path, which must exist."""
    text = str(value).strip().lower() if value is not None else ""
    if text in ("false", "no", "0"):
        return None
    if text in ("", "true", "yes", "1", "none"):
        return newest_checkpoint(output_dir)
    if not Path(value).is_dir():
        raise ConfigError(f"resume_from_checkpoint '{value}' is not a checkpoint directory")
    return str(value)


def newest_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered ``checkpoint-N`` that was completely written (has trainer_state.json)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(suffix), path))
    return str(max(found)[1]) if found else None

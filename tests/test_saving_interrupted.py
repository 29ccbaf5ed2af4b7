"""A save killed in the middle leaves, after the next start, one whole model: the new one if
its install had begun (finished from the journal), else the previous one untouched.

The kill is real: a subprocess runs the install with ``os.replace`` wrapped so that it sends
itself SIGKILL right after the first file moved out of the staging folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from accel.testing import tiny_model
from accel.trainer.saving import MANIFEST, MARKER, STAGING, install, recover_interrupted_save

KILLED_INSTALL = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from accel.trainer import saving

    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if saving.STAGING in Path(src).parts:  # a model file moved in: die now
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    saving.install(Path(sys.argv[1]), Path(sys.argv[2]))
    """
)


def _model(seed: int) -> torch.nn.Module:
    return tiny_model("llama", seed=seed, hidden_size=32, intermediate_size=64, vocab_size=64)


def _stage(final: Path, model: torch.nn.Module, **save: object) -> Path:
    staging = final / STAGING
    staging.mkdir(parents=True)
    (staging / MARKER).write_text("")
    model.save_pretrained(staging, **save)
    return staging


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def previous(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A folder holding model A, saved sharded (several weight files and an index), plus a
    file of the user's."""
    final = tmp_path / "final"
    model = _model(1)
    install(_stage(final, model, max_shard_size="20KB"), final)
    (final / "NOTES.txt").write_text("mine")
    assert len(list(final.glob("model-*-of-*.safetensors"))) > 1
    return final, model


def test_killed_between_moves_is_finished_on_the_next_start(previous, tmp_path):
    final, old = previous
    new = _model(2)
    staging = _stage(final, new)  # model B: one weight file
    staged = sorted(p.name for p in staging.iterdir() if p.name != MARKER)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_INSTALL, str(staging), str(final)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # what the kill left: B's first file in place, A's weights still there, the rest staged
    assert (final / staged[0]).is_file() and not (staging / staged[0]).exists()
    assert (
        list(final.glob("model-*-of-*.safetensors")) and not (final / "model.safetensors").exists()
    )
    assert (staging / "model.safetensors").is_file()

    recover_interrupted_save(str(final))  # what the start of the next run does

    assert not staging.exists()
    files = sorted(p.name for p in final.iterdir())
    assert files == sorted([*staged, MANIFEST, "NOTES.txt"])
    assert json.loads((final / MANIFEST).read_text()) == {"written_by": "accel", "files": staged}
    assert _same(_state(final), new.state_dict()) and not _same(new.state_dict(), old.state_dict())
    assert (final / "NOTES.txt").read_text() == "mine"


def test_killed_before_the_install_keeps_the_previous_model(previous):
    final, old = previous
    before = sorted(p.name for p in final.iterdir())
    staging = _stage(final, _model(2))
    (staging / "model.safetensors").write_bytes(b"\0" * 10)  # cut off while being written
    recover_interrupted_save(str(final))
    assert not staging.exists()
    assert sorted(p.name for p in final.iterdir()) == before
    assert _same(_state(final), old.state_dict())

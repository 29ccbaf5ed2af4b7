"""``accel plot loss``: a PNG of one or several runs' training logs, read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


def _run_folder(folder: Path, steps: int, scale: float, tokens_per_step: int = 512) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append(
            {
                "step": step,
                "epoch": step / steps,
                "timestamp": 1000.0 + 0.5 * step,
                "loss": scale * 3.0 / step,
                "grad_norm": 1.0 + 0.1 * step,
                "learning_rate": 1e-3 * (1 - step / steps),
                "tokens_seen": tokens_per_step * step,
            }
        )
    lines.append({"step": steps, "train_runtime": 1.0, "train_loss": 1.0})  # not a step record
    (folder / "training_logs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_two_runs_side_by_side_make_one_png(tmp_path):
    from matplotlib.image import imread

    from accel.plots import plot_runs, read_training_log

    a = _run_folder(tmp_path / "plain", 12, 1.0)
    b = _run_folder(tmp_path / "fast", 8, 0.8, tokens_per_step=1024)
    series = read_training_log(a)
    assert [s for s, _ in series["loss"]] == list(range(1, 13))
    assert series["tokens_per_s"][0] == (2, pytest.approx(1024.0))  # 512 tokens per 0.5 s
    target = plot_runs([a, b], tmp_path / "runs.png")
    image = imread(target)
    assert image.shape[0] > 500 and image.shape[1] > 800  # 11 x 7.5 inches at 100 dpi
    assert image[..., :3].std() > 0.05  # lines were drawn, not a blank canvas
    assert not list(tmp_path.glob(".runs.png.*"))  # no temporary file left


def test_command_line_and_clear_errors(tmp_path):
    run = _run_folder(tmp_path / "run", 5, 1.0)

    def accel(*args):
        return subprocess.run(
            [sys.executable, "-m", "accel.cli", *args], capture_output=True, text=True, timeout=120
        )

    done = accel("plot", "loss", str(run))
    assert done.returncode == 0, done.stderr
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")
    missing = accel("plot", "loss", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.startswith("accel: error:")
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "training_logs.jsonl").write_text('{"step": 1, "eval_loss": 2.0}\n')
    none = accel("plot", "loss", str(empty))
    assert none.returncode == 2 and "no training-loss record" in none.stderr
    bad = accel("plot", "loss", str(run), "--output", str(tmp_path / "x.jpg"))
    assert bad.returncode == 2 and "PNG" in bad.stderr

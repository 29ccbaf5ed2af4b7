"""``accel launch``: real 2-process runs on CPU (gloo) through torch's launcher, as a user types
them. A mistake is one ``accel: error:`` line and exit 2 — before any worker starts when the
launcher can see it, and also when only the workers can; a crashed worker is named with its
exit code (exit 1) and its traceback stays; a good run trains, saves and reports once.

Cross-rank weight equality of DDP runs is checked in tests/test_distributed.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import failure, summary_of, write_args

STEPS = 2


def launch(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``accel launch ARGV`` in a fresh process, outside any launch (no rank variables)."""
    base = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        base.pop(key, None)
    for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):  # the test process's, set by accel
        if key not in (env or {}):
            base.pop(key, None)
    cmd = [sys.executable, "-m", "accel.cli", "launch", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=base)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("accel: error:")]


def assert_no_launcher_report(done: subprocess.CompletedProcess) -> None:
    output = done.stdout + done.stderr
    assert "Traceback" not in output, failure(done)
    assert "ChildFailedError" not in output, failure(done)


@pytest.fixture
def run_json(tiny_model_dir: Path, train_jsonl: Path, tmp_path: Path) -> str:
    from accel.testing import cipher_run_args

    args = cipher_run_args(
        tiny_model_dir,
        train_jsonl,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        output_dir=str(tmp_path / "out"),
        save_model_dir=str(tmp_path / "model"),
    )
    return write_args(tmp_path / "run.json", args)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("{run}", "--max_stepz", "3"), "'--max_steps'"),  # a train flag
        (("--nproc_per_nod", "2", "{run}"), "'--nproc_per_node'"),  # a launcher option
    ],
    ids=["train-flag", "launcher-option"],
)
def test_a_bad_flag_is_one_line_before_any_worker_starts(run_json, tmp_path, argv, named):
    logs = tmp_path / "logs"
    argv = [a.format(run=run_json) for a in argv]
    done = launch("--nproc_per_node", "2", "--log_dir", str(logs), *argv)
    assert done.returncode == 2, failure(done)
    [line] = error_lines(done)
    assert named in line
    assert_no_launcher_report(done)
    assert not logs.exists()  # the agent makes a folder per worker here: none was started


def test_an_error_only_the_workers_see_is_one_line_exit_2(run_json, tmp_path):
    """The process count is known inside the launch only: both ranks refuse fsdp_size 3 and
    the launcher prints the refusal once."""
    logs = tmp_path / "logs"
    done = launch("--nproc_per_node", "2", "--log_dir", str(logs), run_json, "--fsdp_size", "3")
    assert done.returncode == 2, failure(done)
    [line] = error_lines(done)
    assert "fsdp_size 3" in line and "this launch has 2" in line
    assert_no_launcher_report(done)
    assert len(list(logs.glob("*/attempt_0/[01]"))) == 2  # both workers ran


def test_two_processes_train_save_once_and_report_once(run_json, tmp_path):
    """The README's form: run config file after the launcher options, a flag overriding it."""
    done = launch("--nproc_per_node", "2", run_json, "--logging_steps", "1")
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("accel training summary") == 1, failure(done)  # rank 0 only
    summary = summary_of(done.stdout)
    assert summary["processes"] == "2"
    assert summary["distributed"] == "ddp (gloo)"
    assert summary["train_steps"] == str(STEPS)
    assert "accel's defaults" in summary["cpu_threads"]  # worked out for 2 workers, not 1
    model = tmp_path / "model"
    assert summary["model_saved_to"] == str(model)
    assert (model / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".model.*"))  # one save, no staging folder left behind
    assert not error_lines(done)


def test_a_crashed_worker_is_named_with_its_exit_code(run_json, tmp_path):
    """Not a user error: rank 1 raises before training (a fault injected at start-up through
    sitecustomize). The launcher names the rank and its exit code; the worker's own
    traceback is kept; torch's ChildFailedError report is not printed."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import accel.trainer.run\n"
        "    def crash(*args, **kwargs):\n"
        "        raise RuntimeError('injected fault in rank 1')\n"
        "    accel.trainer.run.main_from_argv = crash\n"
    )
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)
    done = launch("--nproc_per_node", "2", run_json, env={"PYTHONPATH": path})
    assert done.returncode == 1, failure(done)
    assert "RuntimeError: injected fault in rank 1" in done.stderr  # the worker's traceback
    [line] = [s for s in done.stderr.splitlines() if s.startswith("accel: worker failed:")]
    assert line.startswith("accel: worker failed: rank 1 (local rank 1"), line
    assert "exited with code 1" in line
    assert "ChildFailedError" not in done.stdout + done.stderr
    assert not error_lines(done)

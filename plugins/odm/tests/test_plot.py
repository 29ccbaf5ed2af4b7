"""``accel plot odm``: a real odm run's ``odm.jsonl`` becomes a PNG through the command line;
bad folders and logs are one ``accel: error:`` line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from odm_fixtures import odm_args, odm_lines, write_datasets, write_odm_config

import accel
from accel.testing import save_tiny_model

pytest.importorskip("matplotlib", reason="accel plot odm needs matplotlib (accel-odm[plot])")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def accel_cli(*args: str, block: str | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it; ``block`` makes one package unimportable, as if it were
    not installed."""
    code = "import sys\n"
    if block:
        code += f"sys.modules[{block!r}] = None\n"
    code += f"from accel.cli.main import main\nsys.exit(main({list(args)!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A short odm run of the real trainer (6 updates), leaving its odm.jsonl."""
    root = tmp_path_factory.mktemp("odm-plot")
    model_dir = save_tiny_model(root / "model")
    cfg = write_odm_config(root, write_datasets(root), gamma=0.3, eta=0.5)
    accel.train(odm_args(model_dir, cfg, root / "out"))
    return root / "out"


def test_plot_writes_a_png_of_the_run(run_dir, tmp_path):
    from matplotlib.image import imread

    from accel_odm.plot import DPI, HEIGHT, WIDTH

    assert len(odm_lines(run_dir)) == 6
    done = accel_cli("plot", "odm", str(run_dir))
    assert done.returncode == 0, done.stderr
    target = run_dir / "odm.png"  # the default output
    assert str(target) in done.stdout
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    image = imread(target)
    assert image.shape == (int(HEIGHT * DPI), int(WIDTH * DPI), 4)
    assert image[..., :3].std() > 0.05  # lines drawn, not a blank canvas
    assert not list(run_dir.glob(".*.tmp"))  # the temporary file was renamed

    other = tmp_path / "plots" / "mix.png"  # --output, in a folder that does not exist yet
    done = accel_cli("plot", "odm", str(run_dir), "--output", str(other))
    assert done.returncode == 0, done.stderr
    assert imread(other).shape == image.shape


def one_error_line(done: subprocess.CompletedProcess, *words: str) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("accel: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_plot_errors_name_the_folder_the_file_and_the_line(run_dir, tmp_path):
    one_error_line(accel_cli("plot", "odm", str(tmp_path / "nowhere")), "nowhere", "not exist")
    static = tmp_path / "static"
    static.mkdir()
    one_error_line(accel_cli("plot", "odm", str(static)), "odm.jsonl", "--odm")

    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (run_dir / "odm.jsonl").read_text().splitlines()
    (broken / "odm.jsonl").write_text("")
    one_error_line(accel_cli("plot", "odm", str(broken)), "no updates")
    (broken / "odm.jsonl").write_text("\n".join([lines[0], lines[1][:40], *lines[2:]]) + "\n")
    one_error_line(accel_cli("plot", "odm", str(broken)), "line 2", "not JSON")
    short = json.loads(lines[2])
    short["probabilities"] = short["probabilities"][:-1]
    (broken / "odm.jsonl").write_text("\n".join([*lines[:2], json.dumps(short)]) + "\n")
    one_error_line(accel_cli("plot", "odm", str(broken)), "line 3", "'probabilities'")
    assert not (broken / "odm.png").exists()  # nothing written for a bad log

    one_error_line(accel_cli("plot", "odm", str(run_dir), "--output", "x.jpg"), "x.jpg", ".png")
    one_error_line(accel_cli("plot", "scatter", str(run_dir)), "kind", "odm")


def test_plot_names_the_install_command_of_what_is_missing(run_dir, tmp_path):
    target = tmp_path / "never.png"
    line = one_error_line(
        accel_cli("plot", "odm", str(run_dir), "--output", str(target), block="matplotlib"),
        "matplotlib",
        "pip install",
    )
    assert "accel-odm[plot]" in line
    one_error_line(
        accel_cli("plot", "odm", str(run_dir), block="accel_odm"), "accel-odm", "install"
    )
    assert not target.exists()

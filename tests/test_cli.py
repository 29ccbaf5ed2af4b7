"""The `accel` command line, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from accel.registry import CATALOG, discover_plugins

REPO = Path(__file__).resolve().parents[1]


def missing_entry():
    """A first-party plugin package that is not installed here, or None."""
    installed = set(discover_plugins())
    return next((e for e in CATALOG if not set(e.plugins) <= installed), None)


def accel(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accel.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_is_lazy_and_lists_commands():
    code = (
        "import sys\nfrom accel.cli.main import main\ntry:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout
    for command in ("plugins", "install", "configs", "arguments", "train"):
        assert command in out.stdout


def test_plugins_lists_installed_and_installable():
    out = accel("plugins", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    installed = {row["name"] for row in data["installed"]}
    assert installed == set(discover_plugins())
    missing = {row["package"] for row in data["not_installed"]}
    entry = missing_entry()
    assert missing == {e.distribution for e in CATALOG if not set(e.plugins) <= installed}
    text = accel("plugins").stdout
    assert "Installed plugins:" in text
    if entry is None:
        return  # every first-party plugin is installed
    row = next(r for r in data["not_installed"] if r["package"] == entry.distribution)
    assert row["install"] == f"python -m accel.cli install {entry.package}"
    assert f"--{entry.flags[0]}" in row["flags"]
    assert "Available, not installed:" in text


def test_install_unknown_plugin_is_a_clear_error():
    out = accel("install", "fused_opz")
    assert out.returncode == 2
    assert "unknown plugin 'fused_opz'" in out.stderr and "Did you mean 'fused_ops'" in out.stderr
    assert "Traceback" not in out.stderr


def test_install_dry_run_uses_checkout_and_constraints():
    out = accel("install", "fused-ops", "--dry-run", "--force")
    assert out.returncode == 0, out.stderr
    assert "plugins/fused_ops" in out.stdout and "constraints.txt" in out.stdout
    assert out.stdout.startswith("accel: would run: ") and "pip install -q" in out.stdout
    assert "running" not in out.stdout


def test_install_in_a_checkout_keeps_the_editable_install():
    """The test venv has the checkout's plugins editable: installing again changes nothing."""
    from accel.cli.install import editable_source

    if editable_source("accel-fused-ops") != (REPO / "plugins" / "fused_ops").resolve():
        pytest.skip("accel-fused-ops is not installed editable from this checkout")
    out = accel("install", "fused_ops", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "installed already (editable" in out.stdout and "would run" not in out.stdout
    forced = accel("install", "fused_ops", "--force", "--dry-run")
    assert " -e " in forced.stdout  # the core is editable here, so the reinstall is too


def test_install_plugin_not_in_checkout():
    absent = next((e for e in CATALOG if not (REPO / e.checkout_folder).is_dir()), None)
    if absent is None:
        pytest.skip("every first-party plugin is in this checkout")
    out = accel("install", absent.package, "--dry-run")
    assert out.returncode == 2 and "not in this checkout" in out.stderr


def test_configs_and_arguments():
    out = accel("configs")
    assert out.returncode == 0 and "fast-kernels" in out.stdout and "padding-free" in out.stdout
    if "fused_ops" not in discover_plugins():
        pytest.skip("fused_ops plugin not installed")
    out = accel("arguments", "fast-kernels")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "--fast_kernels True True True False"
    out = accel("arguments", "fused-lora-gptq")
    flags = out.stdout.split("\n")[0]
    assert "--fused_lora auto_gptq True" in flags and "--fast_kernels True True True False" in flags


def test_arguments_unknown_sample():
    out = accel("arguments", "fast-kernel")
    assert out.returncode == 2 and "Did you mean 'fast-kernels'" in out.stderr


def test_train_user_errors_exit_nonzero_without_traceback(tmp_path, train_jsonl):
    entry = missing_entry()
    if entry is not None:  # a flag of a plugin that is not installed names the install command
        out = accel(
            "train",
            "--model_name_or_path",
            "x",
            "--training_data_path",
            str(train_jsonl),
            "--data_formatter_template",
            "{{input}} {{output}}",
            f"--{entry.flags[0]}",
            "True",
        )
        assert out.returncode == 2
        assert f"python -m accel.cli install {entry.package}" in out.stderr
        assert "Traceback" not in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins:\n  training:\n    fused_ops_and_kernel: {}\n")
    out = accel(
        "train",
        "--model_name_or_path",
        "x",
        "--training_data_path",
        str(train_jsonl),
        "--data_formatter_template",
        "{{input}} {{output}}",
        "--acceleration_config",
        str(bad),
    )
    assert out.returncode == 2 and "Did you mean 'fused_ops_and_kernels'" in out.stderr


def test_train_help():
    out = accel("train", "--help")
    assert out.returncode == 0
    assert "--model_name_or_path" in out.stdout and "--fast_kernels" in out.stdout
    assert "--padding_free" in out.stdout  # listed even when its plugin is missing


def test_train_config_file_argument(base_args, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**base_args, "max_steps": 2}))
    out = accel("train", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accel training summary" in out.stdout and "final_loss" in out.stdout

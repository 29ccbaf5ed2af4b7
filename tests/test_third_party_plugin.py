"""A third-party plugin in its own package: built, installed (no network), discovered,
validated, listed by the CLI and run through a real tiny training run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "accel-hello"
version = "1.2.3"
dependencies = ["accel-core"]

[project.entry-points."accel.plugins"]
hello = "accel_hello:HelloPlugin"

[tool.setuptools.packages.find]
where = ["src"]
"""

PLUGIN = '''
"""A minimal third-party accel plugin: records every hook it sees into a JSON file."""
import json
import os
from dataclasses import dataclass
from typing import Literal

from transformers import TrainerCallback

from accel import AccelerationPlugin, Flag, PatchRule, hook


@dataclass
class HelloConfig:
    greeting: str = "hello"
    loudness: Literal["quiet", "loud"] = "quiet"


def _record(event, **data):
    path = os.environ["HELLO_RECORD"]
    with open(path, "a") as fh:
        fh.write(json.dumps({"event": event, **data}) + "\\n")


class _Callback(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        _record("train_end", steps=state.global_step)


class HelloPlugin(AccelerationPlugin):
    name = "hello"
    config_paths = ("training.hello",)
    config_schema = HelloConfig
    flags = (Flag("hello", "training.hello", "greeting and loudness", fields=("greeting", "loudness")),)
    model_types = ("llama",)

    @hook
    def augment_model(self, model, train_args, peft_config):
        _record("augment_model", greeting=self.config().greeting, model=type(model).__name__)
        return model, peft_config

    @hook
    def patch_rules(self, model):
        def counting(module, forward):
            def counted(hidden_states):
                module.hello_calls = getattr(module, "hello_calls", 0) + 1
                return forward(hidden_states)
            return counted
        return [PatchRule("count_norm", "hello", module_classes=("LlamaRMSNorm",), wrap=counting)]

    @hook
    def prepare_dataset(self, dataset):
        _record("prepare_dataset", rows=len(dataset))
        return dataset

    @hook
    def callbacks(self):
        return [_Callback()]

    @hook
    def export(self, model, output_dir):
        calls = sum(getattr(m, "hello_calls", 0) for m in model.modules())
        _record("export", output_dir=output_dir, norm_calls=calls)

    def exporter(self):  # an ordinary helper, not a hook
        return "helper"
'''


@pytest.fixture(scope="module")
def hello_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hello")
    pkg = root / "accel-hello"
    (pkg / "src" / "accel_hello").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "src" / "accel_hello" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    site = root / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(pkg),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def run(site: Path, *args: str, record: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if record is not None:
        env["HELLO_RECORD"] = str(record)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_discovered_and_listed(hello_site):
    out = run(hello_site, "-m", "accel.cli", "plugins", "--json")
    assert out.returncode == 0, out.stderr
    row = next(r for r in json.loads(out.stdout)["installed"] if r["name"] == "hello")
    assert row["package"] == "accel-hello" and row["version"] == "1.2.3"
    assert row["flags"] == ["--hello"] and row["config_paths"] == ["training.hello"]


def test_config_validated(hello_site, tmp_path, base_args):
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins:\n  training:\n    hello:\n      loudnes: loud\n")
    code = (
        "import sys\nfrom accel import AccelerationFramework, ConfigError\n"
        f"try:\n    AccelerationFramework({str(bad)!r})\nexcept ConfigError as e:\n    print(e)\n"
    )
    out = run(hello_site, "-c", code)
    assert "plugins.training.hello: unknown key 'loudnes'. Did you mean 'loudness'?" in out.stdout
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({**base_args, "hello": ["hi", "shouting"]}))
    out = run(hello_site, "-m", "accel.cli", "train", str(run_json))
    assert out.returncode == 2 and "loudness: got 'shouting'" in out.stderr


def test_hooks_run_in_real_training(hello_site, base_args, tmp_path):
    record = tmp_path / "record.jsonl"
    args = {
        **base_args,
        "max_steps": 2,
        "hello": ["howdy", "loud"],
        "fast_kernels": [False, True, False],  # fused_ops replaces the norms hello wraps
        "save_model_dir": str(tmp_path / "m"),
    }
    path = tmp_path / "args.json"
    path.write_text(json.dumps(args))
    out = run(hello_site, "-m", "accel.cli", "train", str(path), record=record)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "hello (accel-hello 1.2.3)" in out.stdout
    assert re.search(r"hello\.count_norm +-> 5 module\(s\)", out.stdout), out.stdout
    assert re.search(r"fused_ops\.rms_norm +-> 5 module\(s\)", out.stdout), out.stdout
    events = [json.loads(x) for x in record.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names == ["augment_model", "prepare_dataset", "train_end", "export"]
    assert events[0] == {"event": "augment_model", "greeting": "howdy", "model": "LlamaForCausalLM"}
    assert events[2]["steps"] == 2
    assert events[3]["norm_calls"] >= 2 * 5  # the wrapper ran in every training forward
    assert events[3]["output_dir"] == str((tmp_path / "m").resolve())  # what was saved

    # nothing saved: no export
    record.unlink()
    unsaved = {k: v for k, v in args.items() if k != "save_model_dir"}
    path.write_text(json.dumps({**unsaved, "output_dir": str(tmp_path / "unsaved")}))
    out = run(hello_site, "-m", "accel.cli", "train", str(path), record=record)
    assert out.returncode == 0, out.stderr[-3000:]
    names = [json.loads(x)["event"] for x in record.read_text().splitlines()]
    assert names == ["augment_model", "prepare_dataset", "train_end"]

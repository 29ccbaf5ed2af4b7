"""Every class of bad input is one clear error, raised before anything heavy loads.

Most checks run in-process through the parser and the pre-flight checks; a few go through the
command line to prove the user sees one ``accel: error:`` line, exit status 2 and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from accel.errors import ConfigError
from accel.trainer.demo import RESPONSE_TEMPLATE, TEMPLATE
from accel.trainer.parsing import parse_argv, parse_mapping
from accel.trainer.preflight import check_before_loading

NOISE = (
    "Failed to load",  # torchao .so files, bitsandbytes' gemm_4bit_forward kernel
    "_pytree",
    "is an Enum subclass",
    "GPT-QModel",
    "Traceback",
)


def accel(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accel.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_error_line(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("accel: error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def args(base_args: dict) -> list[str]:
    """``base_args`` as command-line flags."""
    return [part for k, v in base_args.items() for part in (f"--{k}", str(v))]


def check(argv_or_mapping: list[str] | dict) -> None:
    config = (
        parse_argv(argv_or_mapping)
        if isinstance(argv_or_mapping, list)
        else parse_mapping(argv_or_mapping)
    )
    check_before_loading(config)


# --- command line: argparse errors, no abbreviations ------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--torch_dtype", "flot32"], r"--torch_dtype: got 'flot32'.*Did you mean 'float32'"),
        (["--learning_rate", "abc"], r"--learning_rate: got 'abc', expected a number"),
        (["--max_steps", "2.5"], r"--max_steps: got '2.5', expected an integer"),
        (["--gradient_checkpointing", "maybe"], r"got 'maybe', expected true or false"),
        (["--learning_rate"], r"--learning_rate needs a value"),
        (["--resume", "x"], r"unknown argument '--resume'.*'--resume_from_checkpoint'"),
        (["--learning_rat", "0.1"], r"unknown argument '--learning_rat'.*'--learning_rate'"),
        (["--demo=yes"], r"--demo takes no value"),
        (["--save_strategy", "stepz"], r"save_strategy: got 'stepz'.*Did you mean 'steps'"),
    ],
)
def test_argparse_errors_are_one_line(args, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_argv(args + extra)


def test_cli_parse_errors_exit_2_with_one_line(args):
    assert_one_error_line(accel("trian"), "got 'trian'", "Did you mean 'train'")
    assert_one_error_line(accel("install", "--dry", "x"), "'--dry'", "Did you mean '--dry-run'")
    assert_one_error_line(  # a cut-off flag lists every flag it begins
        accel("train", *args, "--fast", "True"), "'--fast'", "'--fast_kernels', '--fast_moe'"
    )
    assert_one_error_line(
        accel("train", *args, "--learning_rat", "0.1"), "--learning_rat", "--learning_rate"
    )


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rate": -1e-3}, "learning_rate is -0.001; it must be >= 0"),
        ({"attn_implementation": "sdpaa"}, "attn_implementation 'sdpaa' .*Did you mean 'sdpa'"),
        ({"output_dir": ""}, "output_dir is empty"),
        ({"report_to": ["wandbx"]}, "report_to 'wandbx' .*Did you mean 'wandb'"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size is 0; it must be at"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps is 0"),
        ({"max_seq_length": 0}, "max_seq_length is 0; it must be at least 1"),
        ({"max_steps": 0}, "max_steps is 0"),
        ({"peft_method": "lora", "r": 0}, r"r is 0; it must be at least 1"),
        (
            {"peft_method": "lora", "lora_dropout": 1.0},
            r"lora_dropout is 1.0; it must be in \[0, 1\)",
        ),
        ({"peft_method": "lora", "lora_dropout": -0.1}, r"lora_dropout is -0.1"),
        ({"peft_method": "pt", "num_virtual_tokens": 0}, "num_virtual_tokens is 0"),
        ({"learning_rate": "fast"}, "learning_rate: got 'fast', expected a number"),
        ({"max_steps": True}, "max_steps: got True, expected an integer"),
        ({"r": "eight"}, "r: got 'eight', expected an integer"),
    ],
)
def test_out_of_range_and_mistyped_values(base_args, change, message):
    with pytest.raises(ConfigError, match=message):
        check({**base_args, **change})


def test_numeric_strings_mean_the_same_in_json_and_on_the_command_line(base_args, args, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**base_args, "learning_rate": "1e-3", "max_steps": "3"}))
    from_file = parse_argv([str(path)])
    from_flags = parse_argv(args + ["--learning_rate", "1e-3", "--max_steps", "3"])
    for config in (from_file, from_flags):
        assert config.training.learning_rate == 1e-3 and config.training.max_steps == 3


# --- paths ----------------------------------------------------------------------------------


def test_output_dir_must_be_a_writable_folder(base_args, train_jsonl, tmp_path):
    with pytest.raises(ConfigError, match=r"output_dir '.*train.jsonl' is a file"):
        check({**base_args, "output_dir": str(train_jsonl)})
    with pytest.raises(ConfigError, match=r"cannot be created: '.*train.jsonl' is a file"):
        check({**base_args, "output_dir": str(train_jsonl / "sub")})
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="output_dir .* is not writable"):
            check({**base_args, "output_dir": str(locked / "out")})


def test_run_config_file_errors_and_overriding_flags(base_args, tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(base_args))
    config = parse_argv([str(run), "--max_steps", "9", "--peft_method", "lora"])
    assert config.training.max_steps == 9 and config.tuning.peft_method == "lora"
    assert config.data.max_seq_length == base_args["max_seq_length"]  # from the file
    folder = tmp_path / "configs.json"
    folder.mkdir()
    with pytest.raises(ConfigError, match="run config '.*configs.json' is a folder"):
        parse_argv([str(folder)])
    txt = tmp_path / "run.txt"
    txt.write_text(json.dumps(base_args))
    with pytest.raises(ConfigError, match=r"must be JSON or YAML.*got '.txt'"):
        parse_argv([str(txt)])
    with pytest.raises(ConfigError, match="a run config file comes first"):
        parse_argv(["--max_steps", "3", str(run)])
    with pytest.raises(ConfigError, match="neither an option .* nor a run config file"):
        parse_argv(["train"])


# --- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"training_data_path '.*' holds no examples"),
        ("\n\n", r"holds no examples"),
        (
            '{"input": "a b", "output": "c d"}\n{"input": "a" "output": "b"}\n',
            r"data.jsonl:2: not valid",
        ),
        ('{"input": "a b", "output": "c d"}\n[1, 2]\n', r"data.jsonl:2: not a JSON object"),
        ('{"input": "a b", "output": null}\n', r"data.jsonl:1: column 'output' is null"),
        (
            '{"input": "a b", "output": "c"}\n{"input": "a"}\n',
            r"data.jsonl:2: column 'output' is missing",
        ),
        ('{"question": "a b", "output": "c d"}\n', r"uses \{\{input\}\}"),
    ],
)
def test_bad_jsonl_names_the_line(base_args, tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    with pytest.raises(ConfigError, match=message):
        check({**base_args, "training_data_path": str(data)})


def test_missing_validation_file_is_named_as_such(base_args, tmp_path):
    with pytest.raises(ConfigError, match=r"^validation_data_path '.*nope.jsonl' does not exist"):
        check({**base_args, "validation_data_path": str(tmp_path / "nope.jsonl")})


def test_template_without_placeholder_is_refused(base_args):
    with pytest.raises(ConfigError, match=r"has no \{\{column\}\} placeholder"):
        check({**base_args, "data_formatter_template": "### Input: text ### Response:"})


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_null_values_in_tables_name_file_column_and_row(base_args, cipher_rows, tmp_path, kind):
    import datasets

    rows = [dict(r) for r in cipher_rows[:4]]
    rows[2]["output"] = None
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        path = tmp_path / "train.parquet"
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(tmp_path / "arrow"))
        path = next((tmp_path / "arrow").glob("*.arrow"))
    with pytest.raises(ConfigError, match=rf"{path.name}, row 2: column 'output' is null"):
        check({**base_args, "training_data_path": str(path)})
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="could not read .*broken.parquet as parquet"):
        check({**base_args, "training_data_path": str(broken)})


def test_null_text_at_tokenization_names_column_and_row(tiny_model_dir, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    from accel.trainer.arguments import DataArguments
    from accel.trainer.data import tokenize_dataset

    rows = [{"text": "a b c"}, {"text": None}]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data_args = DataArguments(dataset_text_field="text")
    with pytest.raises(ConfigError, match=r"train.parquet, row 1: column 'text' is null"):
        tokenize_dataset(datasets.Dataset.from_list(rows), tok, data_args, "train.parquet")


def test_responses_cut_off_by_max_seq_length_say_so(tiny_model_dir, cipher_rows):
    import datasets
    from transformers import AutoTokenizer

    from accel.trainer.arguments import DataArguments
    from accel.trainer.data import tokenize_dataset

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data_args = DataArguments(
        data_formatter_template=TEMPLATE, response_template=RESPONSE_TEMPLATE, max_seq_length=6
    )
    with pytest.raises(ConfigError, match=r"every example of t .*truncation at max_seq_length 6"):
        tokenize_dataset(datasets.Dataset.from_list(cipher_rows[:8]), tok, data_args, "t")


# --- model and tokenizer --------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _broken_models(tiny: Path, tmp: Path) -> list[tuple[str, str]]:
    (tmp / "empty").mkdir()
    (tmp / "no-config").mkdir()
    (tmp / "no-config" / "notes.txt").write_text("x")
    corrupt = _copy(tiny, tmp / "corrupt")
    (corrupt / "config.json").write_text('{"model_type": "llama",')
    unknown = _copy(tiny, tmp / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "lama"}))
    weightless = _copy(tiny, tmp / "weightless")
    (weightless / "model.safetensors").unlink()
    truncated = _copy(tiny, tmp / "truncated")
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 64)
    no_tokenizer = _copy(tiny, tmp / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    return [
        (str(tmp / "missing"), r"model_name_or_path '.*missing' does not exist"),
        (str(tmp / "empty"), "is an empty folder"),
        (str(tmp / "no-config"), r"has no config.json \(it holds notes.txt\)"),
        (str(corrupt), r"corrupt/config.json:1: not valid JSON"),
        (str(unknown), r"model_type 'lama' is not known to transformers .*Did you mean 'llama'"),
        (str(weightless), "has a config.json but no weights"),
        (str(truncated), r"weights file .*model.safetensors is truncated"),
        (str(no_tokenizer), "has no tokenizer files .* pass tokenizer_name_or_path"),
        (str(tiny / "config.json"), "is a file; pass the model's folder"),
    ]


def test_broken_model_folders_are_named_before_loading(base_args, tiny_model_dir, tmp_path):
    for path, message in _broken_models(tiny_model_dir, tmp_path):
        with pytest.raises(ConfigError, match=message):
            check({**base_args, "model_name_or_path": path})


def test_damaged_weights_at_load_time_name_the_model(tiny_model_dir, tmp_path):
    """What the header check cannot see (damaged tensor data) still fails clearly at load."""
    from accel.trainer.loading import default_loader

    broken = _copy(tiny_model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\x00" * 8  # damage the header's JSON
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="damaged"):
        default_loader(str(broken))


def test_target_modules_matching_nothing_lists_the_linear_layers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from accel.trainer.arguments import TuningArguments
    from accel.trainer.tuning import build_peft_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuning = TuningArguments(peft_method="lora", target_modules=["q_proj", "qv_proj"])
    with pytest.raises(ConfigError) as err:
        build_peft_config(model, None, tuning)
    message = str(err.value)
    assert "target_modules 'qv_proj' matches no module of LlamaForCausalLM" in message
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message


def test_every_cheap_problem_is_reported_at_once(tmp_path):
    """No template, a misspelt flag value, a flag short of values and a missing model: one
    ``accel: error:`` line each, in one run, exit 2, no traceback."""
    out = accel(
        "train",
        "--model_name_or_path",
        str(tmp_path / "nope"),
        "--training_data_path",
        str(tmp_path / "missing.jsonl"),
        "--padding_free",
        "hugginface",
        "--fast_kernels",
        "True",
        "True",
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert all(line.startswith("accel: error: ") for line in lines), out.stderr
    for fragment in ("missing.jsonl", "nope", "hugginface", "--fast_kernels"):
        assert sum(fragment in line for line in lines) == 1, (fragment, out.stderr)
    assert len(lines) == 4 and "Traceback" not in out.stderr


def test_bad_values_fail_before_the_model_loads(args):
    """The checks run before transformers loads any model code (the CLI path, in-process)."""
    code = (
        "import sys\nfrom accel.cli.main import main\n"
        f"rc = main(['train', *{args!r}, '--per_device_train_batch_size', '0'])\n"
        "print('RC', rc, 'MODEL', 'transformers.models.llama.modeling_llama' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "RC 2 MODEL False" in out.stdout, out.stderr
    assert "per_device_train_batch_size is 0" in out.stderr


# --- a normal run: no library noise, rounded numbers, --output_dir respected ---------------------


def test_demo_run_is_quiet_rounded_and_saves_under_output_dir(tmp_path):
    out = accel(
        "train",
        "--demo",
        "--output_dir",
        str(tmp_path / "X"),
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
        "--peft_method",
        "lora",
        "--target_modules",
        "lm_head",
        "all-linear",
        "--disable_tqdm",
        "true",
        env={"ACCEL_CACHE": str(tmp_path / "cache"), "TRANSFORMERS_VERBOSITY": "warning"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for noise in NOISE:
        assert noise not in out.stdout + out.stderr, noise
    assert "'lm_head' is ignored" in out.stderr  # accel's own warnings still show
    assert (tmp_path / "X" / "model" / "adapter_config.json").is_file()
    final = next(line for line in out.stdout.splitlines() if line.startswith("final_loss"))
    digits = final.split(":")[1].strip().replace(".", "").lstrip("0")
    assert 0 < len(digits) <= 4, final
    assert f"{tmp_path / 'X' / 'model'}" in out.stdout
    for command in ("plugins", "configs"):
        listed = accel(command)
        assert listed.returncode == 0 and listed.stderr == "", listed.stderr


def test_a_run_that_logged_no_loss_says_so_in_the_summary(tmp_path):
    out = accel(
        "train", "--demo", "--output_dir", str(tmp_path / "X"), "--max_steps", "2",
        "--logging_first_step", "False", "--logging_steps", "10", "--disable_tqdm", "true",
        env={"ACCEL_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    pairs = [line.split(":", 1) for line in out.stdout.splitlines() if " : " in line]
    summary = {key.strip(): value.strip() for key, value in pairs}
    assert summary["first_loss"] == "(not logged)"
    assert float(summary["final_loss"]) > 0
    assert "None" not in out.stdout

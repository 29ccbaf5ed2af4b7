"""The thin trainer on a tiny real Llama: data formats, PEFT methods, saving, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import accel
from accel import ConfigError
from accel.trainer.parsing import parse_argv, parse_mapping


def test_full_finetune_loss_falls_and_logs_jsonl(base_args):
    result = accel.train({**base_args, "max_steps": 30, "learning_rate": 1e-2})
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # 4.2 -> ~2.8 here
    lines = (Path(base_args["output_dir"]) / "training_logs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert result.summary["train_steps"] == 30
    assert result.summary["dataset_tokens_per_s"] > 0
    assert result.summary["train_tokens_per_s"] >= result.summary["dataset_tokens_per_s"]


def test_response_template_masks_prompt(tiny_model_dir, cipher_rows):
    import datasets
    from transformers import AutoTokenizer

    from accel.trainer.arguments import DataArguments
    from accel.trainer.data import tokenize_dataset
    from accel.trainer.demo import RESPONSE_TEMPLATE, TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = datasets.Dataset.from_list(cipher_rows[:4])
    args = DataArguments(data_formatter_template=TEMPLATE, response_template=RESPONSE_TEMPLATE)
    out = tokenize_dataset(ds, tok, args, "test")
    row = out[0]
    kept = [t for t in row["labels"] if t != -100]
    expected = tok(cipher_rows[0]["output"], add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert kept == expected
    assert row["input_ids"][-len(kept) :] == kept


def test_pretokenized_parquet_and_lora_all_linear(base_args, tmp_path):
    import datasets

    rows = [{"input_ids": [2, 5, 6, 7, 8, 3], "labels": [-100, -100, 6, 7, 8, 3]}] * 16
    path = tmp_path / "tok.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    args = {
        **base_args,
        "training_data_path": str(path),
        "peft_method": "lora",
        "target_modules": ["all-linear"],
        "r": 4,
        "lora_alpha": 8,
    }
    args.pop("data_formatter_template"), args.pop("response_template")
    result = accel.train(args)
    assert result.summary["train_steps"] == 4


def test_lora_target_modules_semantics(tiny_model_dir, caplog):
    """fms-hf-tuning: all-linear excludes the output layer; lm_head is tuned only when named
    without all-linear; ["lm_head", "all-linear"] is all-linear alone, with a warning."""
    from transformers import AutoModelForCausalLM

    from accel.trainer.arguments import TuningArguments
    from accel.trainer.tuning import build_peft_config

    def adapted(targets):
        import peft

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        cfg = build_peft_config(
            model, None, TuningArguments(peft_method="lora", target_modules=targets)
        )
        pm = peft.get_peft_model(model, cfg)
        return {n.split(".")[-1] for n, m in pm.named_modules() if hasattr(m, "lora_A") and n}

    all_linear = adapted(["all-linear"])
    assert "lm_head" not in all_linear and {"q_proj", "down_proj"} <= all_linear
    with caplog.at_level("WARNING", logger="accel"):
        assert adapted(["lm_head", "all-linear"]) == all_linear  # no lm_head
    warning = next(r.getMessage() for r in caplog.records if "all-linear" in r.getMessage())
    assert "'lm_head' is ignored" in warning and "q_proj" in warning and "lm_head" in warning
    assert adapted(["q_proj", "lm_head"]) == {"q_proj", "lm_head"}
    assert adapted(["lm_head"]) == {"lm_head"}


def test_alora_and_prompt_tuning_train(base_args):
    result = accel.train(
        {
            **base_args,
            "peft_method": "alora",
            "invocation_string": "### Response:",
            "target_modules": ["q_proj", "v_proj"],
            "max_steps": 2,
        }
    )
    assert result.summary["train_steps"] == 2
    result = accel.train(
        {**base_args, "peft_method": "pt", "num_virtual_tokens": 4, "max_steps": 2}
    )
    assert result.summary["train_steps"] == 2


def test_alora_without_invocation_string_is_an_error(base_args):
    with pytest.raises(ConfigError, match="invocation_string"):
        accel.train({**base_args, "peft_method": "alora"})


def test_resume_from_newest_complete_checkpoint(base_args):
    args = {**base_args, "max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    accel.train(args)
    out = Path(args["output_dir"])
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    # a half-written newer checkpoint must not be picked
    (out / "checkpoint-9").mkdir()
    from accel.trainer.checkpoints import resolve_resume

    assert resolve_resume(None, str(out)) == str(out / "checkpoint-4")
    assert resolve_resume("False", str(out)) is None
    result = accel.train({**args, "max_steps": 6})
    assert result.summary["train_steps"] == 6
    logged = [json.loads(x) for x in (out / "training_logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]  # continued after 4
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        resolve_resume(str(out / "nope"), str(out))


def test_json_config_file_with_flag_lists(base_args, tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({**base_args, "peft_method": "lora", "target_modules": ["q_proj"]}))
    cfg = parse_argv([str(path)])
    assert cfg.tuning.peft_method == "lora" and cfg.training.max_steps == 4


def test_yaml_config_file_with_flag_lists(base_args, tmp_path):
    import yaml

    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump({**base_args, "fast_moe": [2], "r": 16}))
    cfg = parse_argv([str(path)])
    assert cfg.flags == {"fast_moe": [2]} and cfg.tuning.r == 16
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nr: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        parse_argv([str(bad)])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_metod": "lora"}, "unknown argument 'peft_metod'.*Did you mean 'peft_method'"),
        ({"peft_method": "lorra"}, "peft_method: got 'lorra'.*Did you mean 'lora'"),
        (
            {"dataset_text_field": "text", "data_formatter_template": None},
            "dataset_text_field 'text' is not a column",
        ),
        ({"data_formatter_template": "{{question}} {{output}}"}, r"uses \{\{question\}\}"),
        ({"response_template": "### Answer:"}, "response_template '### Answer:' was not found"),
        ({"training_data_path": "/nonexistent/data.jsonl"}, "does not exist"),
        ({"eval_strategy": "steps"}, "eval_strategy is 'steps' but there is no validation data"),
    ],
)
def test_user_errors(base_args, change, message):
    with pytest.raises(accel.AccelError, match=message):
        accel.train({**base_args, **change})


def test_flag_of_a_missing_plugin_names_the_install_command(base_args):
    """With a plugin left out of the discovered set (as when it is not installed), its flag
    names the command that installs it."""
    from accel.registry import CATALOG, discover_plugins
    from accel.trainer.run import build_framework

    entry = next(e for e in CATALOG if e.flags)
    available = {k: v for k, v in discover_plugins().items() if k not in entry.plugins}
    config = parse_mapping({**base_args, entry.flags[0]: [True]}, available)
    with pytest.raises(accel.AccelError, match=f"python -m accel.cli install {entry.package}"):
        build_framework(config, available)


def test_argv_unknown_flag_suggests(base_args):
    with pytest.raises(ConfigError, match="unknown argument '--learnin_rate'.*learning_rate"):
        parse_argv(["--model_name_or_path", "x", "--learnin_rate", "1"])


def test_arrow_text_field_validation_and_gradient_checkpointing(base_args, tmp_path, cipher_rows):
    import datasets

    rows = [{"text": f"### Input: {r['input']}\n### Response: {r['output']}"} for r in cipher_rows]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "arrow"))
    arrow_file = next((tmp_path / "arrow").glob("*.arrow"))
    args = {
        **base_args,
        "training_data_path": str(arrow_file),
        "validation_data_path": str(arrow_file),
        "dataset_text_field": "text",
        "data_formatter_template": None,
        "gradient_checkpointing": True,
        "peft_method": "lora",
        "eval_strategy": "steps",
        "eval_steps": 2,
        "max_steps": 2,
    }
    result = accel.train(args)
    assert any("eval_loss" in h for h in result.log_history)

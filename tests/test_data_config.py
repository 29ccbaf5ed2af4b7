"""Several datasets through ``data_config``: the file's checks, static mixing, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import accel
from accel import ConfigError
from accel.trainer.datamix import epoch_counts, read_data_config, static_mix


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def files(tmp_path, cipher_rows):
    cipher = write_rows(tmp_path / "cipher.jsonl", cipher_rows[:40])
    text = write_rows(
        tmp_path / "text.jsonl", [{"body": f"w{i % 7} w{(i * 3) % 7} w{i % 5}"} for i in range(12)]
    )
    return {"cipher": cipher, "text": text}


def two_datasets(files, **extra) -> dict:
    return {
        "dataprocessor": {"type": "default", "seed": 5},
        "datasets": [
            {"name": "cipher", "data_paths": [str(files["cipher"])], "sampling": 0.75},
            {
                "name": "text",
                "data_paths": [str(files["text"])],
                "sampling": 0.25,
                "dataset_text_field": "body",
            },
        ],
        **extra,
    }


# -- static mixing -------------------------------------------------------------------------


def test_epoch_counts_follow_the_stopping_strategy():
    # sizes 40 and 12 at 0.75 / 0.25: all datasets whole at least once -> N = max(54, 48) = 54, 40.5 + 13.5 (ties go to the first)
    assert epoch_counts([40, 12], [0.75, 0.25], "all_exhausted") == [41, 13]
    assert epoch_counts([40, 12], [0.75, 0.25], "first_exhausted") == [36, 12]
    # largest remainder keeps the total exact
    assert sum(epoch_counts([10, 10, 10], [1 / 3] * 3, "all_exhausted")) == 30
    # a zero weight takes no examples and does not set the epoch length
    assert epoch_counts([5, 100], [1.0, 0.0], "all_exhausted") == [5, 0]


def test_static_mix_is_deterministic_restarts_and_keeps_counts():
    order, counts = static_mix([3, 10], [0.5, 0.5], seed=1)
    assert counts == [10, 10]
    assert order == static_mix([3, 10], [0.5, 0.5], seed=1)[0]
    assert order != static_mix([3, 10], [0.5, 0.5], seed=2)[0]
    small = [i for i in order if i < 3]
    assert len(small) == 10
    # re-shuffle and restart: each pass over the small dataset holds all of its rows once
    passes = [sorted(small[k : k + 3]) for k in range(0, 9, 3)]
    # passes are read in mix order; rows of one pass are a permutation of the dataset
    stream = [i for i in order if i < 3]
    assert all(sorted(stream[k : k + 3]) == [0, 1, 2] for k in range(0, 9, 3)), passes
    big = sorted(i for i in order if i >= 3)
    assert big == list(range(3, 13))  # the big dataset is read whole once
    # without weights: concatenation, every example once
    assert static_mix([2, 3], None, seed=0) == ([0, 1, 2, 3, 4], [2, 3])


# -- bad configs: one error naming the dataset and the key, before the model loads ---------


BAD = [
    (
        lambda c, f: c["datasets"][0].update(data_paths=["/nope/x.jsonl"]),
        "dataset 'cipher' data_paths '/nope/x.jsonl' does not exist",
    ),
    (
        lambda c, f: c["datasets"][1].update(sampl=0.3),
        "dataset 'text': unknown key 'sampl'. Did you mean 'sampling'?",
    ),
    (
        lambda c, f: c["datasets"][1].update(sampling=-1),
        "dataset 'text': sampling is -1; weights must be >= 0",
    ),
    (lambda c, f: [d.update(sampling=0) for d in c["datasets"]], "every sampling weight is 0"),
    (lambda c, f: c["datasets"][1].update(name="cipher"), "dataset name 'cipher' is used twice"),
    (lambda c, f: c["datasets"][1].pop("sampling"), "dataset 'text' has no sampling weight"),
    (
        lambda c, f: c["dataprocessor"].update(type="odn"),
        "dataprocessor.type 'odn' is not one of default, odm. Did you mean 'odm'?",
    ),
    (
        lambda c, f: c["datasets"][0].update(data_handlers=[]),
        "dataset 'cipher': key 'data_handlers' is not supported",
    ),
    (
        lambda c, f: c["datasets"][1].update(dataset_text_field="missing"),
        "dataset_text_field 'missing' is not a column of data_config: dataset 'text' data_paths",
    ),
    (
        lambda c, f: c["datasets"][1].update(split={"train": 0.5, "validation": 0.01}),
        "dataset 'text' has no validation rows after split",
    ),
]


@pytest.mark.parametrize("edit, message", BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_bad_data_config_is_one_clear_error(base_args, files, tmp_path, edit, message):
    config = two_datasets(files)
    edit(config, files)
    args = {**base_args, "data_config": str(write_config(tmp_path / "dc.yaml", config))}
    args.pop("training_data_path")
    if "after split" not in message:  # the others are found before any model is looked at
        args["model_name_or_path"] = str(tmp_path / "no-model-here")
    with pytest.raises(ConfigError) as err:
        accel.train(args)
    assert message in str(err.value)


def test_data_config_and_training_data_path_together_is_an_error(base_args, files, tmp_path):
    path = write_config(tmp_path / "dc.yaml", two_datasets(files))
    with pytest.raises(ConfigError, match="training_data_path and data_config are both given"):
        accel.train({**base_args, "data_config": str(path)})


def test_odm_type_without_the_plugin_names_the_flag(base_args, files, tmp_path):
    config = two_datasets(files)
    config["dataprocessor"]["type"] = "odm"
    args = {**base_args, "data_config": str(write_config(tmp_path / "dc.yaml", config))}
    args.pop("training_data_path")
    with pytest.raises(ConfigError, match="needs the odm plugin: pass --odm"):
        accel.train(args)


def test_read_data_config_accepts_fms_keys(files, tmp_path):
    config = two_datasets(files)
    config["dataprocessor"] = {"type": "default", "sampling_stopping_strategy": "first_exhausted"}
    cfg = read_data_config(str(write_config(tmp_path / "dc.yaml", config)))
    assert cfg.seed == 42 and cfg.strategy == "first_exhausted"
    assert cfg.weights() == [0.75, 0.25]
    assert cfg.datasets[1].formatting == {"dataset_text_field": "body"}


# -- training ------------------------------------------------------------------------------


def test_two_datasets_train_with_their_own_formatting(base_args, files, tmp_path):
    """The cipher dataset uses the trainer-level template; the text dataset its own field.
    The mix holds 41 + 13 examples per epoch; with a held-out split per dataset, evaluation
    reports a loss per dataset."""
    config = two_datasets(files)
    config["datasets"][0]["split"] = {"train": 0.8, "validation": 0.2}
    config["datasets"][1]["split"] = {"train": 0.75, "validation": 0.25}
    args = {
        **base_args,
        "data_config": str(write_config(tmp_path / "dc.yaml", config)),
        "max_steps": 3,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "per_device_eval_batch_size": 4,
    }
    args.pop("training_data_path")
    result = accel.train(args)
    # sizes after split: 32 and 9 -> N = max(32 / .75, 9 / .25) = 43 (rounded up) -> 32 + 11
    counts = result.summary["examples_per_dataset"]
    assert set(counts) == {"cipher", "text"}
    # 3 steps x 8 = 24 of the 43 examples of an epoch, in the epoch's proportions
    assert counts == {"cipher": round(32 * 24 / 43), "text": round(11 * 24 / 43)}
    logged = {k for h in result.log_history for k in h}
    assert {"eval_cipher_loss", "eval_text_loss"} <= logged
    assert result.summary["train_steps"] == 3


def test_static_mix_dataset_matches_the_epoch_definition(tiny_model_dir, files, tmp_path):
    from transformers import AutoTokenizer

    from accel.trainer.arguments import DataArguments
    from accel.trainer.datamix import build_datasets, mix_of
    from accel.trainer.demo import RESPONSE_TEMPLATE, TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = read_data_config(str(write_config(tmp_path / "dc.yaml", two_datasets(files))))
    base = DataArguments(data_formatter_template=TEMPLATE, response_template=RESPONSE_TEMPLATE)
    train, evals = build_datasets(cfg, tok, base)
    mix = mix_of(train)
    assert evals is None
    assert mix.per_epoch == [41, 13] and len(train) == 54
    # the text rows have labels on every token (no response template of their own)
    text_rows = [r for r in train if r["labels"][0] != -100]
    assert len(text_rows) == 13
    again, _ = build_datasets(cfg, tok, base)
    assert again["input_ids"] == train["input_ids"]


def test_cli_prints_one_error_line_and_exits_2(files, tmp_path, capsys):
    from accel.cli.main import main

    config = two_datasets(files)
    config["datasets"][1]["sampling"] = -0.5
    path = write_config(tmp_path / "dc.yaml", config)
    code = main(
        [
            "train",
            "--model_name_or_path",
            str(tmp_path),
            "--data_config",
            str(path),
            "--dataset_text_field",
            "body",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    # the folder given as the model is not one either: both problems, one line each
    assert err[0] == (
        f"accel: error: data_config '{path}': dataset 'text': sampling is -0.5; "
        "weights must be >= 0"
    )
    assert len(err) == 2 and err[1].startswith("accel: error: model_name_or_path")

"""accel bench without training: datasets, scenarios, the is_valid rules, argument mapping,
sampling, comparison, and the command line's errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from accel.errors import ConfigError
from accel_bench import datasets, models
from accel_bench.compare import compare
from accel_bench.executor import RUN_MARKER, fresh_run_dir, trainer_arguments
from accel_bench.scenario import invalid_reasons, parse_scenarios
from accel_bench.worker import auto_stop_due


@pytest.fixture(autouse=True)
def bench_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path_factory.getbasetemp() / "bench-cache"
    monkeypatch.setenv("ACCEL_CACHE", str(root))
    return root


def test_chars_dataset_has_the_reference_shape_and_is_deterministic(tmp_path: Path) -> None:
    first = datasets.dataset_path("news-chars-512-entries-8", seed=3, root=tmp_path / "a")
    again = datasets.dataset_path("news-chars-512-entries-8", seed=3, root=tmp_path / "b")
    other = datasets.dataset_path("news-chars-512-entries-8", seed=4, root=tmp_path / "a")
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:
        text = row["output"]
        assert len(text) == 512 + 127 + 512  # "samples of 512 + 127 (prompt) + 512 characters"
        assert text[512 : 512 + 127] == datasets.PROMPT
        assert datasets.RESPONSE_TEMPLATE in datasets.PROMPT
    assert not list((tmp_path / "a").rglob(".*"))  # no temporary files left behind


def test_token_datasets_reach_their_token_count_with_the_bench_tokenizer() -> None:
    tokenizer = models.build_tokenizer()
    rows = datasets.generate_rows(datasets.parse_dataset_id("news-tokens-700plus-entries-5"))
    for row in rows:
        ids = tokenizer(row["output"])["input_ids"]
        assert len(ids) >= 700
        assert tokenizer.unk_token_id not in ids  # every generated word is in the vocabulary
    spec = datasets.parse_dataset_id("news-chars-300-entries-40")
    for row in datasets.generate_rows(spec):
        assert tokenizer.unk_token_id not in tokenizer(row["output"])["input_ids"]


def test_longtail_dataset_mixes_short_and_long_entries() -> None:
    rows = datasets.generate_rows(datasets.parse_dataset_id("news-longtail-1024-entries-200"))
    lengths = sorted(len(r["output"]) for r in rows)
    assert lengths[-1] <= 2 * 1024 + 127
    assert lengths[-1] > 4 * lengths[0]
    median = lengths[len(lengths) // 2]
    assert lengths[-1] > 2.5 * median  # a long tail above the median


def test_reference_token_counts_truncate_at_max_seq_length(tmp_path: Path) -> None:
    path = datasets.dataset_path("news-chars-128-entries-6", root=tmp_path)
    tokenizer = models.build_tokenizer()
    full = [
        len(tokenizer(json.loads(x)["output"])["input_ids"]) for x in path.read_text().splitlines()
    ]
    assert datasets.reference_token_counts(path, tokenizer, 10_000) == full
    assert datasets.reference_token_counts(path, tokenizer, 40) == [min(n, 40) for n in full]


def test_bad_dataset_id_names_the_patterns() -> None:
    with pytest.raises(ConfigError, match="news-chars-<N>-entries-<M>"):
        datasets.parse_dataset_id("news-chars-512")


BASE = {"model_name": "tiny-llama", "model_max_length": 64, "number_gpus": 2, "batch_size": 4}


def test_mixture_parts_differ_in_length_and_content_and_are_deterministic(
    tmp_path: Path,
) -> None:
    first = datasets.mixture_paths("news-mix-3-entries-8", seed=2, root=tmp_path / "a")
    again = datasets.mixture_paths("news-mix-3-entries-8", seed=2, root=tmp_path / "b")
    other = datasets.mixture_paths("news-mix-3-entries-8", seed=3, root=tmp_path / "c")
    assert [name for name, _ in first] == ["part0", "part1", "part2"]
    assert [p.read_bytes() for _, p in first] == [p.read_bytes() for _, p in again]
    assert [p.read_bytes() for _, p in first] != [p.read_bytes() for _, p in other]
    assert not list((tmp_path / "a").rglob(".*"))  # no temporary files left behind
    vocabularies = []
    for i, (_, path) in enumerate(first):
        rows = [json.loads(line)["output"] for line in path.read_text().splitlines()]
        assert len(rows) == 8
        chars = datasets.MIX_BASE_CHARS * 2**i
        assert {len(r) for r in rows} == {2 * chars + len(datasets.PROMPT)}
        assert all(r[chars:].startswith(datasets.PROMPT) for r in rows)
        words = {w for r in rows for w in datasets.tokens_of(r.replace(datasets.PROMPT, " "))}
        vocabularies.append({w for w in words if len(w) > 1 and w.isalpha()})
    # the parts draw from disjoint vocabulary slices (short words end a text exactly)
    assert len(vocabularies[0] & vocabularies[2]) < 0.2 * len(vocabularies[0])
    # the bench tokenizer's counts follow the lengths: part i's entries are ~2x part i-1's
    tokenizer = models.build_tokenizer()
    counts = [sum(datasets.reference_token_counts(p, tokenizer, 10_000)) for _, p in first]
    assert counts[0] < counts[1] < counts[2]
    # generate_rows of the id: the parts one after the other
    spec = datasets.parse_dataset_id("news-mix-3-entries-8")
    assert len(datasets.generate_rows(spec, 2)) == 24
    assert datasets.dataset_path("news-mix-3-entries-8", 2, tmp_path / "a") == first[0][1]


def test_mixture_data_config_with_and_without_odm(tmp_path: Path) -> None:
    from accel.trainer.datamix import read_data_config

    root = tmp_path / "cache"
    on = datasets.write_data_config(
        "news-mix-2-entries-4", tmp_path / "run1" / "data_config.yaml", "train_loss", root=root
    )
    off = datasets.write_data_config(
        "news-mix-2-entries-4", tmp_path / "run2" / "data_config.yaml", None, root=root
    )
    with_odm, without = read_data_config(str(on)), read_data_config(str(off))
    assert with_odm.type == "odm" and dict(with_odm.options) == {"reward_type": "train_loss"}
    assert without.type == "default" and not without.options
    parts = datasets.mixture_paths("news-mix-2-entries-4", root=root)
    for config in (with_odm, without):  # the same files: the run without odm is the baseline
        assert [d.name for d in config.datasets] == ["part0", "part1"]
        assert [d.data_paths for d in config.datasets] == [(str(p),) for _, p in parts]
        assert all(d.sampling is None for d in config.datasets)
    assert not list(tmp_path.rglob(".data_config*"))


def test_odm_entity_maps_to_the_data_config_and_the_flag() -> None:
    (scenario,) = parse_scenarios(
        {
            "experiment": "finetune_full_benchmark",
            "entities": [
                {**BASE, "dataset_id": "news-mix-3-entries-64"},
                {**BASE, "dataset_id": "news-mix-3-entries-64", "odm": "train_loss"},
            ],
        },
        gpu_model="cpu",
    )
    off, on = (
        trainer_arguments(e, "m", "r/data_config.yaml", "o", "none") for e in scenario.entities
    )
    assert off["data_config"] == on["data_config"] == "r/data_config.yaml"
    assert "training_data_path" not in off and "odm" not in off
    assert on["odm"] == ["train_loss"]
    assert scenario.varying() == ["odm"]
    plain = trainer_arguments(scenario.entities[0], "m", "d.jsonl", "o", "none")
    assert plain["training_data_path"] == "d.jsonl" and "data_config" not in plain


def test_odm_family_is_skipped_with_the_install_command_when_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib import metadata

    from accel_bench import runner

    (scenario,) = parse_scenarios(
        {
            "experiment": "finetune_full_benchmark",
            "entities": [{**BASE, "dataset_id": "news-mix-2-entries-8", "odm": "entropy"}],
        },
        gpu_model="cpu",
    )
    assert runner.missing_plugins(scenario.entities[0]) == []  # installed in this venv
    real = metadata.distribution

    def without_odm(name: str) -> metadata.Distribution:
        if name == "accel-odm":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(runner.metadata, "distribution", without_odm)
    (missing,) = runner.missing_plugins(scenario.entities[0])
    assert missing.startswith("accel-odm (") and "install odm" in missing


def _values(**changes: object) -> dict:
    (scenario,) = parse_scenarios(
        {"experiment": "finetune_full_benchmark", "entities": [{**BASE, **changes}]},
        gpu_model="cpu",
    )
    return scenario.entities[0].values


@pytest.mark.parametrize(
    ("changes", "experts", "reason"),
    [
        ({"batch_size": 5}, None, "batch_size 5 cannot be evenly divided by number_gpus 2"),
        ({"number_nodes": 3}, None, "number_gpus 2 cannot be evenly divided by number_nodes 3"),
        ({"number_nodes": 0}, None, "number_nodes must be greater than 0"),
        ({"batch_size": 0}, None, "batch_size must be greater than 0"),
        ({"gpu_model": ""}, None, "gpu_model is not a non-empty string"),
        ({"fast_moe": 4, "batch_size": 4}, 4, "fast_moe 4 does not divide number_gpus 2"),
        (
            {"fast_moe": 2, "model_name": "tiny-mixtral"},
            3,
            "does not divide the model's num_local_experts (3)",
        ),
        ({"fast_moe": 2}, None, "does not divide the model's num_local_experts (None)"),
    ],
)
def test_each_is_valid_rule(changes: dict, experts: int | None, reason: str) -> None:
    reasons = invalid_reasons(_values(**changes), experts)
    assert len(reasons) == 1, reasons
    assert reason in reasons[0]


def test_valid_entities_and_the_machine_gpu_model() -> None:
    assert invalid_reasons(_values(), None) == []
    assert invalid_reasons(_values(fast_moe=2, model_name="tiny-mixtral"), 4) == []
    assert invalid_reasons(_values(number_gpus=0, gpu_model=""), None) == []  # rule 5: gpus > 0
    values = _values()
    assert values["gpu_model"] == "cpu"  # filled with this machine's device
    assert values["distributed_backend"] == "FSDP"  # the reference's multi-GPU default
    assert models.num_experts("tiny-mixtral") == 4
    assert models.num_experts("tiny-qwen3-moe") == 4
    assert models.num_experts("tiny-llama") is None


def test_space_is_crossed_and_ids_are_stable() -> None:
    raw = {
        "scenarios": [
            {
                "experiment": "finetune_gtpq-lora_benchmark",  # the reference's spelling
                "name": "g",
                "defaults": BASE,
                "entities": [{"batch_size": 2}],
                "space": {"r": [4, 8], "model_max_length": [32, 64]},
                "baseline": 1,
            }
        ]
    }
    (scenario,) = parse_scenarios(raw, gpu_model="cpu")
    assert scenario.experiment == "finetune_gptq-lora_benchmark"
    assert len(scenario.entities) == 5
    assert scenario.entities[1].is_baseline and not scenario.entities[0].is_baseline
    assert {(e.values["r"], e.values["model_max_length"]) for e in scenario.entities[1:]} == {
        (4, 32),
        (4, 64),
        (8, 32),
        (8, 64),
    }
    assert scenario.entities[1].values["torch_dtype"] == "float16"  # fixed by the family
    (again,) = parse_scenarios(raw, gpu_model="NVIDIA-H100")
    assert [e.entity_id for e in again.entities] == [e.entity_id for e in scenario.entities]
    assert set(scenario.varying()) == {"batch_size", "r", "model_max_length"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"experiment": "finetune_ful_benchmark", "entities": [BASE]},
            "Did you mean 'finetune_full_benchmark'",
        ),
        (
            {"experiment": "finetune_full_benchmark", "entities": [{**BASE, "batchsize": 2}]},
            "unknown parameter 'batchsize'",
        ),
        (
            {"experiment": "finetune_full_benchmark", "entities": [{"model_name": "tiny-llama"}]},
            "missing required parameter(s) model_max_length, number_gpus, batch_size",
        ),
        (
            {"experiment": "finetune_full_benchmark", "entities": [{**BASE, "batch_size": "8"}]},
            "batch_size must be an integer",
        ),
        (
            {
                "experiment": "finetune_full_benchmark",
                "entities": [{**BASE, "model_name": "tiny-lama"}],
            },
            "Did you mean 'tiny-llama'",
        ),
        (
            {"experiment": "finetune_full_benchmark", "entities": [{**BASE, "dataset_id": "news"}]},
            "is not a bench dataset",
        ),
        (
            {"experiment": "finetune_full_benchmark", "space": {"r": []}, "defaults": BASE},
            "non-empty list",
        ),
        ({"experiment": "finetune_full_benchmark", "entities": [BASE, BASE]}, "listed twice"),
        (
            {
                "experiment": "finetune_full_benchmark",
                "entities": [{**BASE, "auto_stop_method": "X"}],
            },
            "auto_stop_method",
        ),
        ({"entities": [BASE]}, "missing `experiment:`"),
        (
            {"experiment": "finetune_full_benchmark", "entities": [{**BASE, "odm": "train_loss"}]},
            "use a mixture id news-mix-<K>-entries-<M>",
        ),
        (
            {
                "experiment": "finetune_full_benchmark",
                "entities": [{**BASE, "dataset_id": "news-mix-2-entries-8", "odm": "gradnorm"}],
            },
            "odm 'gradnorm' is not one of train_loss",
        ),
        (
            {
                "experiment": "finetune_full_benchmark",
                "entities": [{**BASE, "dataset_id": "news-mix-1-entries-8"}],
            },
            "K = 2..6 datasets",
        ),
    ],
)
def test_scenario_errors(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenarios(raw, gpu_model="cpu")
    assert message in str(info.value)


def test_entity_maps_to_the_trainer_arguments() -> None:
    (scenario,) = parse_scenarios(
        {
            "experiment": "finetune_lora_benchmark",
            "entities": [
                {
                    **BASE,
                    "batch_size": 8,
                    "fast_kernels": [True, True, True],
                    "padding_free": "huggingface",
                    "multipack": 16,
                    "r": 16,
                },
                {**BASE, "distributed_backend": "ddp"},
            ],
        },
        gpu_model="cpu",
    )
    first = trainer_arguments(scenario.entities[0], "m", "d.jsonl", "o", "lora")
    assert first["per_device_train_batch_size"] == 4  # effective 8 over 2 processes
    assert first["max_seq_length"] == 64
    assert first["fast_kernels"] == [True, True, True]
    assert first["padding_free"] == ["huggingface"] and first["multipack"] == [16]
    assert first["r"] == 16 and first["lora_alpha"] == 16
    assert first["target_modules"] == ["q_proj", "v_proj"]
    assert first["fsdp_size"] == 2  # FSDP: transformers' FSDP2 at load time
    assert first["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert first["gradient_accumulation_steps"] == 4 and first["learning_rate"] == 1e-5
    second = trainer_arguments(scenario.entities[1], "m", "d.jsonl", "o", "lora")
    assert "fsdp_size" not in second and "fast_kernels" not in second


def test_a_run_folder_is_cleared_only_when_accel_bench_made_it(tmp_path: Path) -> None:
    """Resuming clears a failed attempt's folder; a folder the user put there is refused, kept."""
    ours = tmp_path / "runs" / "e1"
    fresh_run_dir(ours)
    (ours / "log.txt").write_text("a failed attempt")
    fresh_run_dir(ours)
    assert sorted(p.name for p in ours.iterdir()) == [RUN_MARKER]
    theirs = tmp_path / "runs" / "e2"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="e2 exists and was not written by accel bench"):
        fresh_run_dir(theirs)
    assert (theirs / "notes.txt").read_text() == "mine"


def test_out_of_memory_classification() -> None:
    from accel_bench.outcome import is_out_of_memory, killed_by_oom_killer

    assert is_out_of_memory("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate")
    assert is_out_of_memory("RuntimeError", "CUDA error: an illegal memory access was encountered")
    assert is_out_of_memory("RuntimeError", "DefaultCPUAllocator: can't allocate memory: you tried")
    assert is_out_of_memory("builtins.MemoryError", "")
    assert not is_out_of_memory("RuntimeError", "NCCL Error 2: unhandled system error")
    assert not is_out_of_memory("accel.errors.ConfigError", "fsdp_size 2 needs a multi-process")
    assert killed_by_oom_killer(-9) and killed_by_oom_killer(137)
    assert killed_by_oom_killer(1, "... Signal 9 (SIGKILL) received by PID 123")
    assert not killed_by_oom_killer(1, "Traceback ...") and not killed_by_oom_killer(0)


def test_auto_stop_rule() -> None:
    assert not auto_stop_due(100.0, None, 50)  # still warming up
    assert not auto_stop_due(150.0, 61.0, 40)  # 89 s of the 120 s stable phase
    assert not auto_stop_due(200.0, 61.0, 9)  # 139 s but only 9 steps
    assert auto_stop_due(182.0, 61.0, 10)


def test_sampler_sees_memory_and_cpu_of_the_process_tree(tmp_path: Path) -> None:
    from accel_bench.sampler import ResourceSampler

    report = tmp_path / "cpu.txt"
    grandchild = (
        "import time\n"
        "b = bytearray(300 * 2**20)\n"
        "t = time.time()\n"
        "while time.time() - t < 1.5: b[::4096]\n"
        f"open({str(report)!r}, 'w').write(str(time.process_time()))\n"
        "time.sleep(0.5)\n"  # alive for the sampler's last look
    )
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    sampler = ResourceSampler(proc.pid, interval=0.1).start()
    proc.wait()
    props = sampler.stop()
    wall = sampler.end_time - sampler.start_time
    own = float(report.read_text())  # the grandchild's own CPU seconds
    sampled = sum(sampler.cpu_seconds.values())
    assert sampled >= own * 0.95  # the grandchild's CPU time is counted (and the parent's)
    assert props["cpu_compute_utilization"] == pytest.approx(100 * sampled / wall, rel=0.01)
    assert props["cpu_memory_peak_rss_mb"] > 300  # the grandchild's 300 MiB counted
    assert props["gpu_compute_utilization_avg"] == 0.0  # no GPU: 0.0, as the reference


def test_compare_flags_a_planted_regression() -> None:
    ref = [
        {
            "entity_id": "a",
            "scenario": "s",
            "status": "completed",
            "dataset_tokens_per_second": "1000",
            "cpu_memory_peak_rss_mb": "500",
            "train_runtime": "10",
        },
        {
            "entity_id": "b",
            "scenario": "s",
            "status": "completed",
            "dataset_tokens_per_second": "10",
        },
        {"entity_id": "c", "scenario": "s", "status": "completed"},
    ]
    now = [
        {
            "entity_id": "a",
            "status": "completed",
            "dataset_tokens_per_second": "920",
            "cpu_memory_peak_rss_mb": "600",
            "train_runtime": "10.5",
        },
        {"entity_id": "b", "status": "failed"},
    ]
    regressions, notes = compare(now, ref, tolerance=0.10)
    found = {(r.entity_id, r.what) for r in regressions}
    assert found == {("a", "cpu_memory_peak_rss_mb"), ("b", "status")}  # -8% and +5% pass
    assert notes == ["s c: in the reference, not measured in this run"]
    assert compare(now, ref, tolerance=0.05)[0][0].what == "dataset_tokens_per_second"


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accel_bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_cli_scenario_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent("""
        experiment: finetune_lora_benchmark
        entities:
          - {model_name: tiny-llama, model_max_length: 64, number_gpus: 1, batch_size: 4, lora_rank: 8}
    """)
    )
    done = _bench(str(bad), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("accel: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "unknown parameter 'lora_rank'" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing ran
    done = _bench(str(tmp_path / "missing.yaml"), "--output", "o", cwd=tmp_path)
    assert done.returncode == 2 and "does not exist" in done.stderr
    bad.write_text("experiment: [unclosed\n")
    done = _bench(str(bad), "--output", "o", cwd=tmp_path)
    assert done.returncode == 2 and "not valid YAML" in done.stderr
    bad.write_text(
        "experiment: finetune_full_benchmark\nentities:\n  - {model_name: tiny-llama, "
        "model_max_length: 64, number_gpus: 1, batch_size: 4, odm: train_loss}\n"
    )
    done = _bench(str(bad), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "odm train_loss mixes several datasets" in done.stderr
    assert not (tmp_path / "out").exists()

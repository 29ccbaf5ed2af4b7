"""accel bench with real training runs (each its own process): a matrix end to end through
the command line, resumed after a stop; an out-of-memory run (invalid) and a run that fails
(retried); --compare against the committed-style results.csv with a planted regression."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from accel_bench import datasets, models
from accel_bench.outcome import COMPLETED, FAILED, INVALID
from accel_bench.runner import Matrix
from accel_bench.scenario import parse_scenarios


@pytest.fixture
def bench_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path_factory.getbasetemp() / "bench-cache"
    monkeypatch.setenv("ACCEL_CACHE", str(root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return root


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accel.cli", "bench", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=cwd,
    )


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as fh:
        return {r["entity_id"]: r for r in csv.DictReader(fh)}


SCENARIO = """
experiment: finetune_full_benchmark
name: e2e
defaults:
  model_name: tiny-llama
  model_max_length: 64
  number_gpus: 1
  dataset_id: news-chars-64-entries-24
  gradient_accumulation_steps: 1
  gradient_checkpointing: false
  torch_dtype: float32
entities:
  - {batch_size: 3, number_gpus: 2}
  - {batch_size: 4}
  - {batch_size: 8, learning_rate: 0.001}
baseline: 1
"""


def test_matrix_end_to_end_resume_and_compare(bench_cache: Path, tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "out"
    first = _bench(str(scenario), "--output", str(out), "--max-runs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stopped at --max-runs" in first.stdout
    rows = _rows(out / "results.csv")
    assert sorted(r["status"] for r in rows.values()) == [COMPLETED, INVALID]
    (invalid,) = [r for r in rows.values() if r["status"] == INVALID]
    assert invalid["is_valid"] == "False"
    assert "batch_size 3 cannot be evenly divided by number_gpus 2" in invalid["reason"]
    (done,) = [r for r in rows.values() if r["status"] == COMPLETED]

    # the reference's dataset tokens: per entry min(len(tokens(output)), model_max_length,
    # max_seq_length), here over one whole epoch (every entry once)
    tokenizer = models.build_tokenizer()
    data = datasets.dataset_path("news-chars-64-entries-24")
    expected = sum(datasets.reference_token_counts(data, tokenizer, 64))
    assert int(done["dataset_tokens"]) == expected
    assert int(done["train_tokens"]) >= expected  # padding included
    assert int(done["train_steps"]) == 6  # 24 entries / batch 4
    runtime = float(done["train_runtime"])
    assert float(done["dataset_tokens_per_second"]) == pytest.approx(expected / runtime, rel=1e-3)
    assert float(done["train_tokens_per_gpu_per_second"]) == float(done["train_tokens_per_second"])
    assert float(done["cpu_memory_peak_rss_mb"]) > 100 and float(done["final_loss"]) > 0
    assert done["is_valid"] == "True"
    worker = json.loads(next((out / "runs").glob("*/result-rank0.json")).read_text())
    assert worker["tokens_this_rank"][0] == int(done["train_tokens"])  # the trainer's own count

    records_before = (out / "results.jsonl").read_text().splitlines()
    # interrupted (SIGTERM, as a cancelled CI job) while the next run is in progress: the run
    # is killed with its process group, what was recorded stays
    started = [p.parent for p in (out / "runs").glob("*/run.json")]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accel.cli",
            "bench",
            str(scenario),
            "--output",
            str(out),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not [
        p for p in (out / "runs").glob("*/run.json") if p.parent not in started
    ]:
        time.sleep(0.2)
    time.sleep(1.0)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "the next run did not start"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "accel: interrupted" in err, err
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert (out / "results.jsonl").read_text().splitlines() == records_before

    second = _bench(str(scenario), "--output", str(out), cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 run(s) this time (1 completed); 2 already done" in second.stdout
    records = (out / "results.jsonl").read_text().splitlines()
    assert records[:2] == records_before and len(records) == 3  # resumed, nothing redone
    report = (out / "report.md").read_text()
    (base_row,) = [line for line in report.splitlines() if "(baseline)" in line]
    assert "batch_size=4" in base_row and "| completed |" in base_row and "| 1.00x |" in base_row
    assert "- command: `accel bench " in report
    assert (out / "plots" / "e2e.png").read_bytes()[:4] == b"\x89PNG"

    # --compare: against itself nothing regressed; a planted 2x better reference regresses
    ref = tmp_path / "reference.csv"
    shutil.copy(out / "results.csv", ref)
    same = _bench(str(scenario), "--output", str(out), "--compare", str(ref), cwd=tmp_path)
    assert same.returncode == 0 and "no regression" in same.stdout, same.stdout + same.stderr
    planted = list(csv.DictReader(ref.open()))
    target = next(r for r in planted if r["status"] == COMPLETED)
    target["dataset_tokens_per_second"] = str(2 * float(target["dataset_tokens_per_second"]))
    with ref.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(planted[0]))
        writer.writeheader()
        writer.writerows(planted)
    worse = _bench(str(scenario), "--output", str(out), "--compare", str(ref), cwd=tmp_path)
    assert worse.returncode == 1, worse.stdout + worse.stderr
    assert "1 regression(s)" in worse.stdout
    assert f"{target['entity_id']}: dataset_tokens_per_second" in worse.stdout
    assert "(-50.0%)" in worse.stdout


def test_out_of_memory_is_invalid_other_errors_fail_and_are_retried(
    bench_cache: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(models.model_path("tiny-llama"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # a cut-off download, say
    raw = yaml_scenario(f"""
        experiment: finetune_full_benchmark
        name: errors
        defaults: {{number_gpus: 1, gradient_accumulation_steps: 1, max_steps: 2,
                    gradient_checkpointing: false, torch_dtype: float32}}
        entities:
          - {{model_name: tiny-llama, model_max_length: 512, batch_size: 64,
              dataset_id: news-chars-1024-entries-64, memory_limit_mb: 1}}
          - {{model_name: {str(broken)!r}, model_max_length: 64, batch_size: 4,
              dataset_id: news-chars-64-entries-24}}
    """)
    out = tmp_path / "out"
    summary = Matrix(parse_scenarios(raw), out, progress=False).run()
    assert summary.statuses == {INVALID: 1, FAILED: 1}
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    oom, failed = records
    assert oom["status"] == INVALID and oom["properties"] == {"is_valid": False}
    assert oom["reason"].startswith("out of memory: ")
    assert "can't allocate memory" in oom["error"]["message"]  # torch's own allocator error
    assert failed["status"] == FAILED and failed["properties"] == {}  # failed: no properties
    assert "out of memory" not in failed["reason"]

    # the next invocation keeps the invalid entity and retries the failed one (max_runs=0:
    # it stops right at the retry instead of paying for a run that fails the same way)
    again = Matrix(parse_scenarios(raw), out, max_runs=0, progress=False).run()
    assert again.skipped_done == 1 and again.stopped_early and again.ran == 0


def yaml_scenario(text: str) -> dict:
    import yaml

    return yaml.safe_load(textwrap.dedent(text))


ODM_SCENARIO = """
experiment: finetune_full_benchmark
name: odm-e2e
defaults:
  model_name: tiny-llama
  model_max_length: 64
  number_gpus: 1
  batch_size: 4
  dataset_id: news-mix-2-entries-8
  gradient_accumulation_steps: 1
  gradient_checkpointing: false
  torch_dtype: float32
  max_steps: 3
entities:
  - {odm: train_loss}
"""


def test_odm_entity_trains_a_mixture_through_its_data_config(
    bench_cache: Path, tmp_path: Path
) -> None:
    scenario = tmp_path / "odm.yaml"
    scenario.write_text(ODM_SCENARIO)
    out = tmp_path / "out"
    result = _bench(str(scenario), "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = _rows(out / "results.csv").values()
    assert row["status"] == COMPLETED, row["reason"]
    assert int(row["train_steps"]) == 3 and int(row["dataset_tokens"]) > 0
    (run,) = (out / "runs").iterdir()
    config = (run / "data_config.yaml").read_text()  # the run's own data config
    assert "type: odm" in config and "reward_type: train_loss" in config
    train = json.loads((run / "run.json").read_text())["train"]
    assert train["data_config"] == str(run / "data_config.yaml") and train["odm"] == ["train_loss"]
    # the odm plugin ran: it logs its per-dataset probabilities at every update
    lines = [json.loads(x) for x in (run / "train" / "odm.jsonl").read_text().splitlines()]
    assert lines and all(line["datasets"] == ["part0", "part1"] for line in lines)
    assert all(len(line["probabilities"]) == 2 for line in lines)

"""The matrix: every entity of every scenario, one run at a time, results kept as they end.

For each entity, in order: already completed or invalid in the output folder -> skipped
(resume); an acceleration flag whose plugin package is not installed -> skipped with the
install command; breaks an is_valid rule -> recorded invalid without running; else its
dataset and model are prepared (generated / built once, cached) and it runs in its own
process. ``finetune_full_stability`` runs the entity ``repeats`` times and records the
fractions that completed, ran out of memory, or failed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .executor import RunOutcome, execute, fresh_run_dir, trainer_arguments
from .outcome import COMPLETED, FAILED, INVALID
from .scenario import FAMILIES, Entity, Scenario, invalid_reasons, plugin_flags
from .store import ResultsStore, write_atomic


@dataclass
class MatrixSummary:
    ran: int = 0
    skipped_done: int = 0
    skipped: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    report: Path | None = None
    plots: list[Path] = field(default_factory=list)
    stopped_early: bool = False


def missing_plugins(entity: Entity) -> list[str]:
    """Install commands of the plugin packages the entity's flags need and lack."""
    from accel.registry import catalog_for_flag, install_command

    missing = []
    for flag in plugin_flags():
        if entity.values.get(flag) in (None, False, 0, [], ""):
            continue
        entry = catalog_for_flag(flag)
        if entry is None:
            continue
        try:
            metadata.distribution(entry.distribution)
        except metadata.PackageNotFoundError:
            text = f"{entry.distribution} ({install_command(entry)})"
            if text not in missing:
                missing.append(text)
    return missing


def _prepare(entity: Entity, run_dir: Path) -> tuple[str, str]:
    """The model folder and the training data: the dataset's JSONL file, or for a mixture
    (``news-mix-...``) a data config written into the run's folder."""
    from .datasets import dataset_path, is_mixture, write_data_config
    from .models import gptq_path, model_path

    v = entity.values
    data = dataset_path(str(v["dataset_id"]), int(v["dataset_seed"]))
    if v.get("auto_gptq"):
        model = gptq_path(str(v["model_name"]), calibration=data)
    else:
        model = model_path(str(v["model_name"]))
    if is_mixture(str(v["dataset_id"])):
        config = run_dir / "data_config.yaml"
        data = write_data_config(
            str(v["dataset_id"]), config, v.get("odm"), int(v["dataset_seed"]), int(v["seed"])
        )
    return str(model), str(data)


def _record(entity: Entity, outcome: RunOutcome, attempt: int, started: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "entity_id": entity.entity_id,
        "experiment": entity.experiment,
        "scenario": entity.scenario,
        "status": outcome.status,
        "reason": outcome.reason,
        "attempt": attempt,
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(outcome.seconds, 2),
        "entity": entity.given,
        "values": entity.values,
        # failed runs record no properties (the reference's rule)
        "properties": outcome.properties if outcome.status != FAILED else {},
    }
    if outcome.error:
        record["error"] = {k: outcome.error.get(k) for k in ("type", "message")}
    return record


class Matrix:
    def __init__(
        self,
        scenarios: Sequence[Scenario],
        output: str | Path,
        *,
        master_port: int = 29600,
        ports: int = 50,
        timeout: float | None = None,
        max_runs: int | None = None,
        progress: bool = True,
    ) -> None:
        self.scenarios = list(scenarios)
        self.output = Path(output)
        self.store = ResultsStore(self.output)
        self.master_port, self.ports = master_port, ports
        self.timeout = timeout
        self.max_runs = max_runs
        self.progress = progress
        self._port_index = 0

    def _port(self) -> int:
        port = self.master_port + self._port_index % self.ports
        self._port_index += 1
        return port

    def _run_once(self, entity: Entity, run_dir: Path) -> RunOutcome:
        fresh_run_dir(run_dir)
        try:
            model, data = _prepare(entity, run_dir)
        except Exception as err:  # preparing is part of the measurement: failed, retried
            return RunOutcome(
                FAILED,
                reason=f"preparing the run failed: {err}",
                error={"type": type(err).__name__, "message": str(err)},
            )
        peft_method = FAMILIES[entity.experiment]["peft_method"]
        args = trainer_arguments(entity, model, data, str(run_dir / "train"), peft_method)
        return execute(entity, run_dir, args, self._port(), self.timeout, clear=False)

    def _stability(self, entity: Entity, run_dir: Path) -> RunOutcome:
        repeats = max(1, int(entity.values["repeats"]))
        outcomes = [self._run_once(entity, run_dir / f"repeat-{i}") for i in range(repeats)]
        oom = sum(o.status == INVALID for o in outcomes)
        other = sum(o.status == FAILED for o in outcomes)
        ok = sum(o.status == COMPLETED for o in outcomes)
        props = {
            "f_gpu_oom": round(oom / repeats, 4),
            "f_other_error": round(other / repeats, 4),
            "f_no_error": round(ok / repeats, 4),
            "is_valid": True,
        }
        reasons = sorted({o.reason for o in outcomes if o.reason})
        return RunOutcome(
            COMPLETED, props, "; ".join(reasons)[:500], seconds=sum(o.seconds for o in outcomes)
        )

    def run(self) -> MatrixSummary:
        from .models import num_experts

        summary = MatrixSummary()
        entities = [e for s in self.scenarios for e in s.entities]
        bar = _progress(len(entities), self.progress)
        try:
            for entity in entities:
                bar.set_description(f"{entity.scenario} {entity.entity_id}")
                if self.store.is_done(entity.entity_id):
                    summary.skipped_done += 1
                    bar.update(1)
                    continue
                missing = missing_plugins(entity)
                if missing:
                    summary.skipped.append(
                        f"{entity.scenario} {entity.entity_id}: needs {', '.join(missing)}"
                    )
                    bar.update(1)
                    continue
                if int(entity.values["number_nodes"] or 1) > 1 and not invalid_reasons(
                    entity.values, None
                ):
                    summary.skipped.append(
                        f"{entity.scenario} {entity.entity_id}: number_nodes > 1 needs a cluster;"
                        " accel bench runs on this machine"
                    )
                    bar.update(1)
                    continue
                if self.max_runs is not None and summary.ran >= self.max_runs:
                    summary.stopped_early = True
                    break
                started = datetime.now(timezone.utc).isoformat(timespec="seconds")
                experts = (
                    num_experts(str(entity.values["model_name"]))
                    if entity.values.get("fast_moe")
                    else None
                )
                reasons = invalid_reasons(entity.values, experts)
                if reasons:
                    outcome = RunOutcome(INVALID, {"is_valid": False}, "; ".join(reasons))
                else:
                    run_dir = self.output / "runs" / entity.entity_id
                    if FAMILIES[entity.experiment].get("stability"):
                        outcome = self._stability(entity, run_dir)
                    else:
                        outcome = self._run_once(entity, run_dir)
                    summary.ran += 1
                attempt = self.store.attempts(entity.entity_id) + 1
                self.store.append(_record(entity, outcome, attempt, started))
                summary.statuses[outcome.status] = summary.statuses.get(outcome.status, 0) + 1
                bar.update(1)
                if outcome.status != COMPLETED:
                    bar.write(f"accel bench: {entity.entity_id} {outcome.status}: {outcome.reason}")
        finally:
            bar.close()
        return summary

    def write_report(self, command: str, summary: MatrixSummary, plot: bool = True) -> None:
        from .report import render

        latest = self.store.latest()
        report = self.output / "report.md"
        write_atomic(report, render(self.scenarios, latest, command, summary.skipped))
        summary.report = report
        if plot:
            from .plot import plot_scenario

            for scenario in self.scenarios:
                target = plot_scenario(
                    scenario, latest, self.output / "plots" / f"{scenario.name}.png"
                )
                if target is not None:
                    summary.plots.append(target)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def elapsed(start: float) -> str:
    return f"{time.perf_counter() - start:.0f} s"

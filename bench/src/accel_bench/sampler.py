"""Background sampling of a run's resources: CPU, memory of the process tree, and GPUs.

The reference collects these with AIM during the run and reports them aggregated (notes 1
and 2 of its measured properties):

- ``cpu_compute_utilization``: percent, 100 = one full core, averaged over the run, of the
  training processes (the worker and, under torchrun, every rank: CPU seconds of the whole
  process tree divided by wall seconds);
- ``cpu_memory_utilization``: average resident memory of the process tree as a percent of
  the machine's memory; ``cpu_memory_peak_rss_mb`` / ``cpu_memory_avg_rss_mb`` beside it;
- on CUDA, per sample the average over the run's devices of utilization, memory used and
  power (nvidia-smi's or pynvml's figures), then ``_min``/``_avg``/``_max`` over the samples;
  ``gpu_memory_utilization_peak`` is the highest single device's memory percent. All are 0.0
  when no GPU is used, as in the reference.

Sampling runs in a thread of the parent (``interval`` seconds, 0.5 by default), so the worker's
own timings are untouched.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import Any

GPU_PROPERTIES = (
    "gpu_compute_utilization",
    "gpu_memory_utilization",
    "gpu_power_watts",
    "gpu_power_percent",
)


def _gpu_reader(devices: list[int]) -> Any:
    """A function returning, per device in ``devices``, (util %, mem %, watts, power %)."""
    if not devices:
        return None
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in devices]

        def read_nvml() -> list[tuple[float, float, float, float]]:
            rows = []
            for h in handles:
                util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                watts = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
                limit = pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0
                rows.append(
                    (
                        float(util),
                        100.0 * mem.used / mem.total,
                        watts,
                        100.0 * watts / limit if limit else 0.0,
                    )
                )
            return rows

        return read_nvml
    except Exception:  # no pynvml, or no driver: fall back to nvidia-smi
        pass
    if not shutil.which("nvidia-smi"):
        return None
    query = "index,utilization.gpu,memory.used,memory.total,power.draw,power.limit"

    def read_smi() -> list[tuple[float, float, float, float]]:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        rows = []
        for line in out.strip().splitlines():
            cells = [c.strip() for c in line.split(",")]
            try:
                index = int(cells[0])
                util, used, total, watts, limit = (float(c) for c in cells[1:6])
            except (ValueError, IndexError):
                continue
            if index in devices:
                rows.append(
                    (util, 100.0 * used / total, watts, 100.0 * watts / limit if limit else 0.0)
                )
        return rows

    return read_smi


class ResourceSampler:
    """Samples the process tree rooted at ``pid`` (and ``devices``) until :meth:`stop`."""

    def __init__(self, pid: int, devices: list[int] | None = None, interval: float = 0.5) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.total_memory = psutil.virtual_memory().total
        self.cpu_seconds: dict[int, float] = {}
        self.rss: list[float] = []
        self.gpu: list[list[tuple[float, float, float, float]]] = []
        self._read_gpu = _gpu_reader(list(devices or []))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="accel-bench-sampler", daemon=True)
        self.start_time = time.perf_counter()
        self.end_time = self.start_time

    def start(self) -> ResourceSampler:
        self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        for proc in procs:
            try:
                times = proc.cpu_times()
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
            seconds = times.user + times.system
            self.cpu_seconds[proc.pid] = max(seconds, self.cpu_seconds.get(proc.pid, 0.0))
        if rss:
            self.rss.append(rss)
        if self._read_gpu is not None:
            try:
                rows = self._read_gpu()
            except Exception:
                rows = []
            if rows:
                self.gpu.append(rows)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        """Stop sampling; the aggregated properties."""
        self._sample()
        self.end_time = time.perf_counter()
        self._stop.set()
        self._thread.join(timeout=5)
        return self.properties()

    def properties(self) -> dict[str, float]:
        wall = max(self.end_time - self.start_time, 1e-9)
        out: dict[str, float] = {
            "cpu_compute_utilization": round(100.0 * sum(self.cpu_seconds.values()) / wall, 2),
            "cpu_memory_utilization": round(
                100.0 * (sum(self.rss) / len(self.rss)) / self.total_memory, 3
            )
            if self.rss
            else 0.0,
            "cpu_memory_peak_rss_mb": round(max(self.rss) / 2**20, 1) if self.rss else 0.0,
            "cpu_memory_avg_rss_mb": round(sum(self.rss) / len(self.rss) / 2**20, 1)
            if self.rss
            else 0.0,
        }
        for i, name in enumerate(GPU_PROPERTIES):
            per_sample = [sum(r[i] for r in rows) / len(rows) for rows in self.gpu]
            out[f"{name}_min"] = round(min(per_sample), 2) if per_sample else 0.0
            out[f"{name}_avg"] = round(sum(per_sample) / len(per_sample), 2) if per_sample else 0.0
            out[f"{name}_max"] = round(max(per_sample), 2) if per_sample else 0.0
        peaks = [r[1] for rows in self.gpu for r in rows]
        out["gpu_memory_utilization_peak"] = round(max(peaks), 2) if peaks else 0.0
        return out

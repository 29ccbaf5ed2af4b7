"""The CI cut of the convergence matrix (benchmarks/convergence/convergence.py --quick).

A small build of the real-text corpus (the Python, prose and licence domains and the noise
control, a twentieth of each, a 1024-token BPE vocabulary); the benchmark's 2-layer Llama
trained 20 steps on 64 examples of each real domain, in this process: a repeat of the plain
run (must be bit-identical), fast kernels, padding-free, fused LoRA on a plain base against
LoRA, fused LoRA on an nf4 base against plain QLoRA, and odm at gamma 1 against static
training on the same draws. Each row must be within the benchmark's own tolerance (``ROWS``;
the reasons in benchmarks/convergence/README.md) and must have trained; a kernel, collator or
sampler that changes the arithmetic by more than rounding, or trains other examples, fails its
row. The distributed, GPTQ and MoE rows run only in the full benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "convergence"))
import convergence  # noqa: E402

#: the domains whose sources are read quickly (the C headers and the config files of the
#: installed packages take most of a full build's minute to walk)
DOMAINS = ("python", "prose", "licenses", "noise")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("convergence")
    settings = convergence.quick_settings(root / "corpus")
    runs = convergence.needed_runs(list(convergence.QUICK_ROWS))
    convergence.prepare(root, settings, runs, scale=0.05, vocab_size=1024, domains=DOMAINS)
    return convergence.execute(root, settings, runs, inline=True)


@pytest.mark.parametrize("row", convergence.QUICK_ROWS)
def test_row_within_its_tolerance(results: dict[str, dict], row: str) -> None:
    got = convergence.compare(convergence.ROWS[row], results)
    assert got["steps"] == convergence.quick_settings("").steps
    assert not got["failures"], f"{row}: {got['failures']} ({got})"

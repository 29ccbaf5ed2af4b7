"""The GPU check's report: ``OUTDIR/report.md`` from the raw files its steps left in OUTDIR.

    python benchmarks/gpu/check_report.py tests OUTDIR     # tests.xml (JUnit) -> tests.json
    python benchmarks/gpu/check_report.py report OUTDIR    # every raw file -> report.md

``scripts/gpu-check.sh`` calls ``report`` after every step, so the report of a run cut short
shows every step that finished and names the others. Raw files (each optional): ``env.json``,
``steps.jsonl`` (one line per step: name, status, seconds, detail), ``tests.json``,
``kernels.json``, ``e2e.json``, ``wheels-skipped.txt``. Written atomically (temp + rename).
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarise_tests(junit: Path) -> dict[str, Any]:
    """Counts and the failing cases of a pytest ``--junitxml`` file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[dict[str, str]] = []
    skip_reasons: dict[str, int] = {}
    root = ET.parse(junit).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = (outcome.get("message") or "").strip()[:160]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or "").strip().splitlines()
            detail = (outcome.text or "").strip().splitlines()
            failures.append(
                {
                    "test": name,
                    "kind": outcome.tag,
                    "message": message[0][:300] if message else "",
                    "tail": "\n".join(detail[-12:]),
                }
            )
    seconds = sum(float(s.get("time", 0) or 0) for s in root.iter("testsuite"))
    return {
        "counts": counts,
        "seconds": round(seconds, 1),
        "failures": failures,
        "skip_reasons": skip_reasons,
    }


def _steps_section(outdir: Path) -> list[str]:
    lines = ["## Steps", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    path = outdir / "steps.jsonl"
    steps = []
    if path.is_file():
        steps = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    for s in steps:
        lines.append(
            f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {s.get('detail', '')} |"
        )
    if not steps:
        lines.append("| (none recorded) | | | |")
    return lines


def _env_section(outdir: Path) -> list[str]:
    env = _load(outdir / "env.json") or {}
    lines = ["## Machine and versions", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] or ["- (env.json missing)"]
    skipped = outdir / "wheels-skipped.txt"
    if skipped.is_file() and skipped.read_text().strip():
        lines += ["", "Not carried (so their cases skip):", ""]
        lines += [f"- {x}" for x in skipped.read_text().splitlines() if x.strip()]
    return lines


def _tests_section(outdir: Path) -> list[str]:
    lines = ["## a) Kernel tests compiled for real (TRITON_INTERPRET unset)", ""]
    tests = _load(outdir / "tests.json")
    if not tests:
        return lines + ["Not run, or no result file (see Steps and tests.log)."]
    c = tests["counts"]
    lines.append(
        f"**{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
        f"{c['skipped']} skipped** in {tests['seconds']} s ({', '.join(tests.get('files', []))})"
    )
    if tests["failures"]:
        lines += ["", "| test | kind | message |", "|---|---|---|"]
        for f in tests["failures"][:60]:
            message = f["message"].replace("|", "\\|")
            lines.append(f"| `{f['test']}` | {f['kind']} | {message} |")
        if len(tests["failures"]) > 60:
            lines.append(f"| ... {len(tests['failures']) - 60} more in tests.json | | |")
    if tests.get("skip_reasons"):
        lines += ["", "Skip reasons:", ""]
        for reason, n in sorted(tests["skip_reasons"].items(), key=lambda kv: -kv[1])[:15]:
            lines.append(f"- {n} x {reason or '(no message)'}")
    return lines


def _kernels_section(outdir: Path) -> list[str]:
    lines = [
        "## b) Kernels: accel vs torch eager, torch.compile, Liger-Kernel (forward + backward)",
        "",
    ]
    data = _load(outdir / "kernels.json")
    if not data:
        return lines + ["Not run, or no result file (see Steps and kernels.log)."]
    from kernels_bench import table

    lines.append(
        f"compile backend: {data.get('compile_backend')}; bandwidth against "
        f"{data.get('h100_bytes_per_s', 0) / 1e12:.2f} TB/s; {data.get('seconds', '?')} s"
    )
    lines += ["", table(data["rows"])]
    if data.get("not_run"):
        lines += ["", f"Not run (time budget): {len(data['not_run'])} case(s)."]
    return lines


def _e2e_section(outdir: Path) -> list[str]:
    lines = ["## c) End to end: accel.train, ~1B Llama, with and without accelerations", ""]
    data = _load(outdir / "e2e.json")
    if not data:
        return lines + ["Not run, or no result file (see Steps and e2e.log)."]
    from e2e import table

    model = data.get("model", {})
    lines.append(
        f"model: {model.get('parameters', 0) / 1e9:.2f}B parameters ({model.get('num_hidden_layers')} "
        f"layers, hidden {model.get('hidden_size')}, vocab {model.get('vocab_size')}); "
        f"{data.get('steps')} steps; settings {data.get('settings')}; data {data.get('data')}"
    )
    lines += ["", table(data)]
    failed = {k: v for k, v in data["variants"].items() if v.get("log_tail")}
    for name, v in failed.items():
        lines += ["", f"`{name}` log tail:", "", "```", v["log_tail"][-2000:], "```"]
    return lines


def render(outdir: Path) -> str:
    dry = (outdir / "DRY_RUN").is_file()
    title = "# GPU check" + (" (dry run on CPU: numbers mean nothing)" if dry else "")
    parts = [
        [title, ""],
        _env_section(outdir),
        _steps_section(outdir),
        _tests_section(outdir),
        _kernels_section(outdir),
        _e2e_section(outdir),
    ]
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("tests", "report"):
        print("usage: check_report.py tests|report OUTDIR", file=sys.stderr)
        return 2
    outdir = Path(argv[1])
    if argv[0] == "tests":
        summary = summarise_tests(outdir / "tests.xml")
        summary["files"] = os.environ.get("GPU_CHECK_TEST_FILES", "").split()
        _write_atomic(outdir / "tests.json", json.dumps(summary, indent=1))
        c = summary["counts"]
        print(
            f"tests: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
        )
        return 0
    _write_atomic(outdir / "report.md", render(outdir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

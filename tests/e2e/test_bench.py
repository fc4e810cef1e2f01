"""A short run of the benchmark harness (`python -m bench --quick`): every target it starts answers without
errors, and the reports it writes hold the measurements. Figures are not asserted: speed is measured by
`make bench`, never by a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_measures_each_target_and_writes_its_reports(pki, demo_models, tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "bench", "--quick", "--targets", "a,b,e,f,e-rest", "--certs", str(pki.dir)]
    command += ["--models", str(demo_models), "--out", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=180, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    document = json.loads((out / "results.json").read_text())
    runs = document["results"]["sweep"]
    targets = ["a", "b", "e", "f", "e-rest"]
    assert {(r["target"], r["in_flight"]) for r in runs} == {(t, n) for t in targets for n in (1, 4)}
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in runs)
    assert all(r["server_cpu_us_per_request"] > 0 for r in runs if r["target"] != "a")
    report = (out / "results.md").read_text()
    assert "(e) / (b) req/s at 16 in flight | not measured" in report  # the quick run has no 16-in-flight level
    assert "**4 in flight**" in report and "(f) gateway, fully secured, PredictStream" in report
    assert (out / "results.png").stat().st_size > 10_000


def test_call_path_tool_drives_secured_calls_through_the_boundary(pki, demo_models):
    # The stand-in context raises when a call is refused, so a figure means every call was answered.
    command = [sys.executable, "-m", "bench.callpath", "--calls", "40", "--reps", "1", "--in-flight", "4", "--lines"]
    command += ["--certs", str(pki.dir), "--models", str(demo_models)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "loop-thread CPU per call, 4 in flight, flat form: median" in result.stdout
    assert "Python lines executed per call:" in result.stdout and "pipeline.py:predict" in result.stdout


def test_call_path_tool_takes_out_each_part_it_names(pki, demo_models):
    from bench.profile import variants

    parts = sorted(variants())
    command = [sys.executable, "-m", "bench.callpath", "--calls", "20", "--reps", "1"]
    command += [arg for part in parts for arg in ("--without", part)]  # every replacement still serves the call
    command += ["--certs", str(pki.dir), "--models", str(demo_models)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]  # AttributeError: a part renamed
    assert f"flat form, without {', '.join(parts)}: median" in result.stdout


def test_every_step_of_the_step_table_is_in_the_code():
    from bench.steps import step_targets

    assert len(list(step_targets())) > 30  # AttributeError names a step renamed or removed from the call path

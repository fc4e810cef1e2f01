"""Benchmark outputs: results.json (every run), results.md (medians, ratios to (b) and (c)), results.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.run import median_by


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def markdown(results: list[dict[str, Any]], labels: dict[str, str], environment: dict[str, Any]) -> str:
    """One table per in-flight level, medians over repetitions."""
    rps, p50, p99 = median_by(results, "rps"), median_by(results, "p50_ms"), median_by(results, "p99_ms")
    cpu, inf = median_by(results, "server_cpu_us_per_request"), median_by(results, "inferences_per_s")
    levels = sorted({level for _, level in rps})
    lines = [
        f"Medians of {environment['reps']} interleaved repetitions, {environment['window_s']} s windows, "
        f"{environment['cpus']} CPUs, grpcio {environment['grpcio']}, onnxruntime {environment['onnxruntime']}, "
        f"batch {environment['batch']}, {environment['clients']} client processes.",
        "",
    ]
    for level in levels:
        lines += [
            f"**{level} in flight**",
            "",
            "| target | req/s | inferences/s | p50 ms | p99 ms | server CPU us/req | vs (b) | vs (c) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, label in labels.items():
            if (key, level) not in rps:
                continue
            r = rps[(key, level)]
            lines.append(
                f"| {label} | {r:,.0f} | {inf[(key, level)]:,.0f} | {p50[(key, level)]:.3f} | {p99[(key, level)]:.3f} "
                f"| {cpu[(key, level)]:.0f} | {_ratio(r, rps.get(('b', level)))} | {_ratio(r, rps.get(('c', level)))} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, results: list[dict[str, Any]], labels: dict[str, str]) -> None:
    """Throughput and p99 against in-flight count, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rps, p99 = median_by(results, "rps"), median_by(results, "p99_ms")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in labels.items():
        levels = sorted(level for k, level in rps if k == key)
        left.plot(levels, [rps[(key, n)] for n in levels], marker="o", label=label)
        right.plot(levels, [p99[(key, n)] for n in levels], marker="o", label=label)
    for axis, title in ((left, "requests/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("in flight")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(
    out: Path, results: list[dict[str, Any]], labels: dict[str, str], environment: dict[str, Any]
) -> None:
    """Write results.json, results.md and results.png into ``out``."""
    (out / "results.json").write_text(json.dumps({"environment": environment, "results": results}, indent=1))
    (out / "results.md").write_text(markdown(results, labels, environment))
    plot(out / "results.png", results, labels)

"""Benchmark outputs: results.json (every run), results.md (medians, ratios, the targets), results.png (sweep)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.run import median_by

Results = dict[str, list[dict[str, Any]]]


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def _sweep(results: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    rps, p50, p99 = median_by(results, "rps"), median_by(results, "p50_ms"), median_by(results, "p99_ms")
    cpu = median_by(results, "server_cpu_us_per_request")
    lines = []
    for level in sorted({level for _, level in rps}):
        lines += [
            f"**{level} in flight**",
            "",
            "| target | req/s | p50 ms | p99 ms | server CPU us/req | vs (b) | vs (c) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, label in labels.items():
            if (key, level) not in rps:
                continue
            r = rps[(key, level)]
            cpu_text = "in-process" if key == "a" else f"{cpu[(key, level)]:.0f}"
            lines.append(
                f"| {label} | {r:,.0f} | {p50[(key, level)]:.3f} | {p99[(key, level)]:.3f} | {cpu_text} "
                f"| {_ratio(r, rps.get(('b', level)))} | {_ratio(r, rps.get(('c', level)))} |"
            )
        lines.append("")
    return lines


def _compare(results: list[dict[str, Any]], labels: dict[str, str], base: str, title: str) -> list[str]:
    rps, p50, p99 = median_by(results, "rps"), median_by(results, "p50_ms"), median_by(results, "p99_ms")
    inf, cpu = median_by(results, "inferences_per_s"), median_by(results, "server_cpu_us_per_request")
    lines = [
        title,
        "",
        f"| target | req/s | inferences/s | p50 ms | p99 ms | server CPU us/req | vs {base} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (key, level), r in rps.items():
        at = (key, level)
        lines.append(
            f"| {labels[key]} | {r:,.0f} | {inf[at]:,.0f} | {p50[at]:.3f} | {p99[at]:.3f} | {cpu[at]:.0f} "
            f"| {_ratio(r, rps.get((base, level)))} |"
        )
    return [*lines, ""]


def _sizes(results: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    rps = median_by(results, "rps", by="request_bytes")
    p99 = median_by(results, "p99_ms", by="request_bytes")
    cpu = median_by(results, "server_cpu_us_per_request", by="request_bytes")
    keys = sorted({key for key, _ in rps})
    lines = [
        "**Request size** (an identity model, FP32 `[1, N]` in and out, 16 in flight)",
        "",
        "| request | " + " | ".join(f"{labels[k].split(' ')[0]} req/s | p99 ms | CPU us/req" for k in keys) + " |",
        "|---:|" + "---:|---:|---:|" * len(keys),
    ]
    for size in sorted({size for _, size in rps}):
        cells = " | ".join(f"{rps[(k, size)]:,.0f} | {p99[(k, size)]:.2f} | {cpu[(k, size)]:.0f}" for k in keys)
        lines.append(f"| {size // 1024:,} KiB | {cells} |")
    return [*lines, ""]


def targets(results: Results) -> list[str]:
    """The issue's targets, each with the measured figure and whether it is met."""
    sweep = results.get("sweep", [])
    rps, p50 = median_by(sweep, "rps"), median_by(sweep, "p50_ms")
    checks: list[tuple[str, float | None, float, str]] = []

    def ratio(a: tuple[str, int], b: tuple[str, int]) -> float | None:
        return rps[a] / rps[b] if a in rps and b in rps else None

    # The async core's targets (issue 11).
    checks.append(("(e) / (c) req/s at 16 in flight", ratio(("e", 16), ("c", 16)), 0.9, ">="))
    checks.append(("(e) / (b) req/s at 16 in flight", ratio(("e", 16), ("b", 16)), 1.4, ">="))
    gap = p50[("e", 1)] - p50[("c", 1)] if ("e", 1) in p50 and ("c", 1) in p50 else None
    checks.append(("p50 (e) - p50 (c) at 1 in flight, ms", gap, 0.1, "<="))
    checks.append(("(e) / (d) req/s at 16 in flight", ratio(("e", 16), ("d", 16)), 0.9, ">="))
    checks.append(("(f) / (e) req/s at 16 in flight", ratio(("f", 16), ("e", 16)), 1.5, ">="))
    batching = median_by(results.get("batching", []), "inferences_per_s")
    on, off = batching.get(("e-batch", 64)), batching.get(("e", 64))
    checks.append(("batching on / off inferences/s at 64 in flight", on / off if on and off else None, 1.3, ">="))
    lines = ["| target | measured | wanted | met |", "|---|---:|---:|---|"]
    for name, value, wanted, sense in checks:
        if value is None:
            lines.append(f"| {name} | not measured | {sense} {wanted} | |")
            continue
        met = value >= wanted if sense == ">=" else value <= wanted
        lines.append(f"| {name} | {value:.2f} | {sense} {wanted} | {'yes' if met else 'no'} |")
    return [*lines, ""]


def markdown(results: Results, labels: dict[str, str], environment: dict[str, Any], extras: dict[str, Any]) -> str:
    """Every section's tables, medians over repetitions."""
    lines = [
        f"Medians of {environment['reps']} interleaved repetitions, {environment['window_s']} s windows after "
        f"{environment['warmup_s']} s warm-up, {environment['cpus']} CPUs ({environment['machine']}), Python "
        f"{environment['python']}, grpcio {environment['grpcio']}, onnxruntime {environment['onnxruntime']}, "
        f"{environment['clients']} client processes with {environment.get('connections', 1)} connections each, on the "
        f"same machine. Command: `{environment['command']}`.",
        "",
        *targets(results),
        *_sweep(results.get("sweep", []), labels),
    ]
    if results.get("ablations"):
        lines += _compare(results["ablations"], labels, "e", "**One step of the secure path changed (16 in flight)**")
    if results.get("batching"):
        lines += _compare(results["batching"], labels, "e", "**Dynamic batching (64 in flight, 1-row requests)**")
    if results.get("sizes"):
        lines += _sizes(results["sizes"], labels)
    if extras.get("memory_kib_per_version"):
        lines += ["**Resident memory per loaded model version**", "", "| model | KiB |", "|---|---:|"]
        lines += [f"| {name} | {kib:,.0f} |" for name, kib in extras["memory_kib_per_version"].items()]
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, results: list[dict[str, Any]], labels: dict[str, str]) -> None:
    """Throughput and p99 against in-flight count, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rps, p99 = median_by(results, "rps"), median_by(results, "p99_ms")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in sorted({key for key, _ in rps}):
        levels = sorted(level for k, level in rps if k == key)
        left.plot(levels, [rps[(key, n)] for n in levels], marker="o", label=labels[key])
        right.plot(levels, [p99[(key, n)] for n in levels], marker="o", label=labels[key])
    for axis, title in ((left, "requests/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("in flight")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    left.set_yscale("log")
    right.set_yscale("log")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(
    out: Path, results: Results, labels: dict[str, str], environment: dict[str, Any], extras: dict[str, Any]
) -> None:
    """Write results.json, results.md and results.png into ``out``."""
    document = {"environment": environment, "results": results, "extras": extras}
    (out / "results.json").write_text(json.dumps(document, indent=1))
    (out / "results.md").write_text(markdown(results, labels, environment, extras))
    plot(out / "results.png", results.get("sweep", []), labels)

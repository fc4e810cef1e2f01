"""Rewrite README.md's performance table from a side-by-side harness result (gateway_check.json).

    ../shared/perf/run.sh --reps 3 --only floor,aio-stream2,gw,gw-raw
    .venv/bin/python scripts/perf_table.py $PERF_WORK/results/gateway_check.json   # rewrites README.md

The table sits between the README's `perf-table` markers; everything else in the file is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
LABELS = {
    "tutorial": "grpcio tutorial server, insecure, ORT default threads",
    "floor": "grpcio server, mutual TLS, ORT 1 thread (the floor)",
    "aio-floor": "grpc.aio server, mutual TLS, no security work",
    "aio-secure": "minimal secure grpc.aio server (token, binding, policy, audit)",
    "aio-stream1": "the same through a stream-unary handler",
    "aio-stream2": "minimal secure grpc.aio server with the gateway's boundary shape (`aio-stream2`)",
    "aio-intercept": "the same with a server interceptor",
    "gw": "the gateway: mTLS, bound JWT, policy, hash-chained audit record (`gw`)",
    "gw-raw": "the same, request as a raw FP32 tensor (`gw-raw`)",
    "gw-oip": "the gateway's Open Inference Protocol ModelInfer (`gw-oip`)",
    "mlserver": "MLServer 1.7.1, insecure, same model (`mlserver`)",
}


def table(result: dict[str, Any]) -> str:
    """The markdown table: one row per target the run measured, in LABELS' order, ratios to the floor."""
    floor = result.get("floor_c16", {}).get("rps")
    rows = [
        "| target | req/s, 16 in flight | server CPU us/call | p50 ms, 1 in flight | vs floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for target, label in LABELS.items():
        busy, alone = result.get(f"{target}_c16"), result.get(f"{target}_c1")
        if busy is None:
            continue
        p50 = f"{alone['p50_ms']:.2f}" if alone else "-"
        # The harness's own ratio (the median of each repetition's) where it gives one, else of the medians.
        vs_floor = 1.0 if target == "floor" else result.get(f"{target}_vs_floor_c16")
        if vs_floor is None and floor:
            vs_floor = busy["rps"] / floor
        ratio = f"{vs_floor:.2f}x" if vs_floor is not None else "-"
        rows.append(f"| {label} | {busy['rps']:,.0f} | {busy['server_cpu_us_per_req']:.0f} | {p50} | {ratio} |")
    when = f"{result.get('time', '?')[:10]}, commit {str(result.get('commit', '?'))[:7]}"
    reps = result.get("reps", "?")
    return "\n".join([*rows, "", f"Medians of {reps} interleaved repetitions ({when})."])


def rewrite(readme: str, new_table: str) -> str:
    """``readme`` with the text between the markers replaced by ``new_table``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {BEGIN} ... {END} block")
    return readme[: start + len(BEGIN)] + "\n" + new_table + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    """Exit 0 after rewriting the README; 2 on a missing or unreadable result or README block."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="the harness's gateway_check.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
        args.readme.write_text(rewrite(args.readme.read_text(), table(result)))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

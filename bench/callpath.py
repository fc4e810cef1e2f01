"""The gateway's own Python per secured Predict call, with grpc taken out: event-loop thread CPU us per call.

    python -m bench.callpath [--in-flight 1] [--calls 2000] [--reps 5] [--form flat|tensor] [--profile tottime]
                             [--lines] [--without seal|write|audit|ort|token|tracing ...]

The fully secured gateway starts in this process (mutual TLS credentials, token, policy, ONNX Runtime, audit trail,
as bench.profile starts it), and its call boundary's Predict handler is driven on its event loop with a stand-in for
grpc's ServicerContext: the alice client certificate, a bound token, the request bytes, then the end of the stream.
Everything the gateway does per call runs (entry, authentication from the remembered verdict, admission, bounded
reads, decode, policy, validation, ORT, encode, the audit record committed to its file); grpc's own work does not.
So the figure moves with the gateway's code alone and is steady to a few percent, where a load test's server CPU
per call wanders by tens of microseconds: the tool for cutting the call path step by step (before and after, in
turn, on one machine). ``--profile`` adds a cProfile listing (which roughly doubles every figure it shows);
``--lines`` counts the Python lines one call executes, by function (how much bytecode the path runs).
``--without PART`` takes a part out as ``bench.profile`` does in the real server (the audit's seal or write,
the whole audit write, ONNX Runtime...): run with and without it in turn, and the difference is what it costs.

Not a substitute for ../shared/perf/run.sh: in a real server, grpc's callbacks run between the steps and the same
Python costs more (about 1.7x over issue 22's second pass: docs/design/call-path.md); the harness is what the
project is judged by.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import pstats
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.profile import started_gateway, variants
from bench.run import ROOT, issue_token

PREDICT = "/gateway.v1.InferenceService/Predict"


class _Context:
    """What the call boundary asks of grpc's ServicerContext on a call that succeeds, answered without grpc."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], pem: bytes, request: bytes) -> None:
        self._metadata = metadata
        self._auth = {"x509_pem_cert": [pem], "transport_security_type": [b"ssl"]}
        self._messages = [request]

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def time_remaining(self) -> float:
        return 60.0

    async def read(self) -> Any:
        # grpc's read waits for the message's event, which the loop delivers in a later turn: so does this one
        # (calls in flight then interleave as in a server instead of each running to its end in one step).
        await asyncio.sleep(0)
        return self._messages.pop() if self._messages else grpc.aio.EOF

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"the call was refused: {code.name} {details}")


def _request(form: str) -> bytes:
    from gateway import tensors
    from gateway._pb.gateway.v1 import gateway_pb2 as pb

    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    if form == "flat":  # the tutorial's form, the shared harness's gw request
        return pb.PredictRequest(model_name="mlp", input_data=x.ravel()).SerializeToString()
    return pb.PredictRequest(model_name="mlp", inputs=[tensors.encode("input", x)]).SerializeToString()


def measure(args: argparse.Namespace) -> list[float]:
    """Loop-thread CPU us per call, one figure per repetition (and the profile, if asked, printed)."""
    from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc
    from gateway.boundary import HandlerCollector
    from gateway.server import InferenceServicer

    certs = args.certs
    with started_gateway(certs, args.models) as gateway:
        collector = HandlerCollector()
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(gateway.pipeline), collector)
        handler = gateway.boundary.generic_handler(collector.services).service(_Details()).stream_unary
        metadata = (("authorization", f"Bearer {issue_token(certs)}"), ("user-agent", "grpc-python"))
        pem = (certs / "clients" / "alice" / "alice.crt").read_bytes()
        request = _request(args.form)

        async def calls(count: int) -> None:
            for _ in range(count):
                if not await handler(None, _Context(metadata, pem, request)):
                    raise RuntimeError("an empty answer")

        async def run(count: int) -> float:
            per_task = max(1, count // args.in_flight)
            started = time.thread_time()
            await asyncio.gather(*(calls(per_task) for _ in range(args.in_flight)))
            return (time.thread_time() - started) / (per_task * args.in_flight) * 1e6

        async def session() -> list[float]:
            await run(min(args.calls, 500))  # warm-up: the verdict remembered, ORT's first runs
            figures = [await run(args.calls) for _ in range(args.reps)]
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                await run(args.calls)
                profile.disable()
                pstats.Stats(profile).sort_stats(args.profile).print_stats(40)
            if args.lines:
                counts: Counter[str] = Counter()
                sys.settrace(functools.partial(_count_lines, counts))
                try:
                    await run(args.calls)
                finally:
                    sys.settrace(None)
                calls = max(1, args.calls // args.in_flight) * args.in_flight
                print(f"Python lines executed per call: {sum(counts.values()) / calls:,.0f}; the most, by function:")
                for where, count in counts.most_common(30):
                    print(f"{count / calls:8.1f}  {where}")
            return figures

        loop = gateway._loop  # the handler must run on the gateway's own loop
        if loop is None:
            raise RuntimeError("the gateway has no event loop")
        parts = variants()
        with contextlib.ExitStack() as taken_out:
            for name in args.without or ():
                taken_out.enter_context(parts[name][1]())
            return asyncio.run_coroutine_threadsafe(session(), loop).result()


def _count_lines(counts: Counter[str], frame: Any, event: str, arg: Any) -> Any:
    """A tracer counting each line event by its function (file name and function name)."""
    if event == "line":
        code = frame.f_code
        counts[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
    return functools.partial(_count_lines, counts)


class _Details:
    method = PREDICT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.callpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-flight", type=int, default=1, help="calls in flight on the loop (default 1)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per repetition (default 2000)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--form", choices=("flat", "tensor"), default="flat", help="request form (default flat)")
    parser.add_argument("--profile", choices=("tottime", "cumulative"), help="also print a cProfile listing")
    parser.add_argument("--lines", action="store_true", help="also count the Python lines one call executes")
    parser.add_argument(
        "--without",
        action="append",
        choices=sorted(variants()),
        help="take this part out, as bench.profile does (repeatable): what it costs, by difference",
    )
    parser.add_argument("--certs", type=Path, default=ROOT / "certs", help="a gen_certs.sh folder (default certs/)")
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="model repository (default models/)")
    args = parser.parse_args(argv)
    from gateway import logging as oplog

    oplog.configure(fmt="json", level="warning")  # the start and stop lines would bury the figure
    figures = measure(args)
    without = f", without {', '.join(args.without)}" if args.without else ""
    print(
        f"loop-thread CPU per call, {args.in_flight} in flight, {args.form} form{without}: "
        f"median {statistics.median(figures):.1f} us ({', '.join(f'{f:.1f}' for f in figures)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

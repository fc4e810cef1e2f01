"""Per-step cost of a secured Predict call: server CPU microseconds per call, by step, at 16 calls in flight.

    python -m bench.steps [--window 6] [--reps 2] [--form flat|tensor]

The fully secured gateway runs in this process (as in bench.profile) under the same closed-loop load: two spawned
client processes, 16 calls in flight over mutual TLS. Every step of the call path is wrapped (bench code only,
nothing in the gateway changes) and charged the CPU time of the event-loop thread spent inside it, its own time
only: what a wrapped step calls that is itself wrapped is charged to that step. Coroutines are driven through a
wrapper that charges each resumption and none of the waiting. The clock is the loop thread's CPU clock
(CLOCK_THREAD_CPUTIME_ID), so time the loop thread spends off the CPU (preempted by the clients or by another
process on a loaded machine, or waiting for the GIL) is not charged; the clock's own cost is measured at start
and taken off each step. What the steps do not cover (grpcio's C core and its poller thread, the event loop, the
audit writer's background threads, the coroutine frames of grpc.aio) is the difference between the server
process's CPU per call and the steps' sum, shown split into the loop thread's rest and the other threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import statistics
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.load import run_client
from bench.profile import IN_FLIGHT, client_pool, load_spec, serving
from bench.run import ROOT

_clock = time.thread_time_ns


class _Ledger:
    """Own CPU time per step, charged on one thread (the event loop's), with a stack for nested steps."""

    def __init__(self) -> None:
        self.thread: int | None = None
        self.own: dict[str, int] = {}  # ns
        self.units: dict[str, int] = {}  # timed segments (a call, or one resumption of a coroutine)
        self.children: dict[str, int] = {}  # timed segments of other steps inside this one
        self._stack: list[list[int]] = []  # per open segment: [time of its children, number of child segments]

    def open(self) -> int:
        self._stack.append([0, 0])
        return _clock()

    def close(self, label: str, started: int) -> None:
        elapsed = _clock() - started
        inner, nested = self._stack.pop()
        self.own[label] = self.own.get(label, 0) + elapsed - inner
        self.units[label] = self.units.get(label, 0) + 1
        self.children[label] = self.children.get(label, 0) + nested
        if self._stack:
            parent = self._stack[-1]
            parent[0] += elapsed
            parent[1] += 1

    def snapshot(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        return dict(self.own), dict(self.units), dict(self.children)


LEDGER = _Ledger()


def _timed_function(function: Callable[..., Any], label: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != LEDGER.thread:
            return function(*args, **kwargs)
        started = LEDGER.open()
        try:
            return function(*args, **kwargs)
        finally:
            LEDGER.close(label, started)

    return timed


@types.coroutine
def _driven(coroutine: Any, label: str) -> Any:
    """Run ``coroutine`` as the awaiting task would, charging each resumption (never the wait) to ``label``."""
    value: Any = None
    error: BaseException | None = None
    while True:
        timed = threading.get_ident() == LEDGER.thread
        started = LEDGER.open() if timed else 0
        try:
            yielded = coroutine.throw(error) if error is not None else coroutine.send(value)
        except StopIteration as stop:
            return stop.value
        finally:
            if timed:
                LEDGER.close(label, started)
        try:
            value, error = (yield yielded), None
        except BaseException as exc:  # thrown into the driven coroutine, as a task would
            value, error = None, exc


def _timed_coroutine(function: Callable[..., Any], label: str) -> Callable[..., Any]:
    @functools.wraps(function)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        return await _driven(function(*args, **kwargs), label)

    return timed


_ENCODE = "encode: protobuf serialize"
_GRPC_CONTEXT = "grpc context calls (metadata, peer, auth_context, trailer, read)"


class _TimedContext:
    """A proxy of grpc's ServicerContext whose calls the boundary makes are charged to one step."""

    _TIMED = frozenset(
        {"invocation_metadata", "peer", "auth_context", "set_trailing_metadata", "read", "time_remaining"}
    )

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._context, name)
        return _timed_function(attribute, _GRPC_CONTEXT) if name in self._TIMED else attribute


# Step label -> the functions charged to it, as "module:Owner.attribute", each wrapped where the call path looks it
# up (a class, or the module that calls a function by its global name). Empty: timed by other means (below).
_STEPS: dict[str, tuple[str, ...]] = {
    "boundary: own code (_serve_unary, enter/leave, handler)": (
        "gateway.boundary:CallBoundary._serve_unary",
        "gateway.boundary:CallBoundary._enter",
        "gateway.boundary:CallBoundary._leave",
    ),
    "grpc context calls (metadata, peer, auth_context, trailer, read)": (),
    "call entry: metadata, request id, Call (_begin)": ("gateway.boundary:CallBoundary._begin",),
    "admission: _admit, limits, slot release": (
        "gateway.boundary:CallBoundary._admit",
        "gateway.limits:Admission.admit",
        "gateway.limits:Slot.release",
    ),
    "authenticate: own code (_authenticate, authenticate, Principal)": (
        "gateway.boundary:CallBoundary._authenticate",
        "gateway.auth.authenticator:Authenticator.authenticate",
    ),
    "certificate: inspect (cached parse, thumbprints)": ("gateway.auth.authenticator:Authenticator.inspect",),
    "certificate: validity re-check": ("gateway.auth.authenticator:check_validity",),
    "certificate: CRL check": ("gateway.auth.certs:CrlStore.check",),
    "token: bearer header parse": ("gateway.auth.authenticator:bearer_token",),
    "token: verify (cache hit, binding)": ("gateway.auth.verifier:TokenVerifier.verify",),
    "bounded reads (_request, Deadlines.within, end of request)": (
        "gateway.boundary:CallBoundary._request",
        "gateway.deadlines:Deadlines.within",
        "gateway.boundary:CallBoundary._read_request",
    ),
    "size checks": ("gateway.boundary:CallBoundary._check_size",),
    "decode: protobuf parse": ("gateway.boundary:_decode",),
    "adapter: servicer, to_infer_request (tensor decode)": (
        "gateway.api.inference:InferenceServicer.Predict",
        "gateway.api.inference:to_infer_request",
    ),
    "adapter: to_response (tensor encode)": ("gateway.api.inference:to_response",),
    "encode: protobuf serialize": (),
    "pipeline: own code (predict, _authorize)": (
        "gateway.pipeline:Pipeline.predict",
        "gateway.pipeline:Pipeline._authorize",
    ),
    "identifier checks": ("gateway.identifiers:Grammar.check",),
    "resolve model version": ("gateway.models.repository:ModelRepository.resolve",),
    "policy decision": (
        "gateway.pipeline:Pipeline._decide",
        "gateway.policy:PolicySet.evaluate",
    ),
    "validation (reshape, validate, describe inputs, outputs)": (
        "gateway.pipeline:_flat_input",
        "gateway.models.runtime:ModelVersion.name_inputs",
        "gateway.models.runtime:ModelVersion.validate",
        "gateway.pipeline:describe_inputs",
        "gateway.pipeline:_check_outputs",
    ),
    "placement (run, inline decision, cost average)": (
        "gateway.models.runtime:ModelVersion.run",
        "gateway.models.runtime:ModelVersion._run_placed",
        "gateway.models.placement:Placement.run",
        "gateway.models.placement:_timed",
    ),
    "ONNX Runtime (execute)": ("gateway.models.runtime:ModelVersion.execute",),
    "exit: _finish, recorder own code": (
        "gateway.boundary:CallBoundary._finish",
        "gateway.boundary:Recorder.record",
        "gateway.boundary:Recorder.record_call",
        "gateway.boundary:Recorder._observe",
    ),
    "audit: record dict (audit.record.build)": ("gateway.boundary:build_record",),
    "audit: copy, timestamp": ("gateway.audit.writer:_stamped",),
    "audit: append (group, future)": (
        "gateway.audit.writer:AuditLog.append",
        "gateway.audit.commit:GroupCommit.append",
    ),
    "audit: seal (canonical JSON, HMAC)": ("gateway.audit.writer:seal",),
    "audit: commit (chain, os.write, stat unless fsync batch, wake)": (
        "gateway.audit.commit:GroupCommit._commit_turn",
        "gateway.audit.commit:GroupCommit._lead",
        "gateway.audit.commit:GroupCommit._commit_and_release",
        "gateway.audit.writer:AuditLog._commit_group",
        "gateway.audit.writer:AuditLog._commit",
    ),
    "metrics (Prometheus)": (
        "gateway.metrics:observe_call",
        "prometheus_client.context_managers:Timer.__enter__",
        "prometheus_client.context_managers:Timer.__exit__",
        "prometheus_client.metrics:Gauge.inc",
        "prometheus_client.metrics:Gauge.dec",
        "prometheus_client.metrics:Counter.inc",
        "prometheus_client.metrics:Histogram.observe",
    ),
    "tracing hooks (off)": (
        "gateway.tracing:span",
        "gateway.tracing:note_outcome",
        "gateway.tracing:end_call",
        "gateway.tracing:Tracing.start_call",
    ),
}
_CALIBRATION = "(calibration)"


def step_targets() -> Iterator[tuple[str, Any, str]]:
    """(label, owner, attribute) of every step of ``_STEPS``; AttributeError naming one the code no longer has (a
    renamed step would otherwise drop out of the table unnoticed)."""
    import importlib

    for label, targets in _STEPS.items():
        for target in targets:
            module_name, _, path = target.partition(":")
            *owner_path, attribute = path.split(".")
            owner: Any = importlib.import_module(module_name)
            for part in owner_path:
                owner = getattr(owner, part)
            if not hasattr(owner, attribute):
                raise AttributeError(f"bench.steps: {target} ({label!r}) is not in the code any more")
            yield label, owner, attribute


def _wrap(label: str, owner: Any, attribute: str) -> tuple[Any, str, Any]:
    static = inspect.getattr_static(owner, attribute)
    function = static.__func__ if isinstance(static, staticmethod) else getattr(owner, attribute)
    if inspect.iscoroutinefunction(function):
        timed = _timed_coroutine(function, label)
    else:
        timed = _timed_function(function, label)
    setattr(owner, attribute, staticmethod(timed) if isinstance(static, staticmethod) else timed)
    return owner, attribute, static


@contextmanager
def instrumented() -> Iterator[None]:
    """Every step of ``_STEPS`` wrapped (to be entered before the gateway is built), and the boundary's context
    calls and (de)serializers timed."""
    import gateway.boundary as boundary

    originals = [_wrap(label, owner, attribute) for label, owner, attribute in step_targets()]
    make_method = boundary._method

    def timed_method(name: str, handler: Any) -> Any:
        method = make_method(name, handler)
        return dataclasses.replace(
            method,
            deserialize=method.deserialize,  # charged through _decode
            serialize=_timed_function(method.serialize, _ENCODE),
        )

    serve_unary = boundary.CallBoundary._serve_unary

    async def with_timed_context(self: Any, method: Any, _requests: Any, context: Any) -> Any:
        return await serve_unary(self, method, _requests, _TimedContext(context))

    boundary._method = timed_method  # type: ignore[assignment]
    boundary.CallBoundary._serve_unary = with_timed_context  # type: ignore[method-assign]
    try:
        yield
    finally:
        boundary._method = make_method  # type: ignore[assignment]
        boundary.CallBoundary._serve_unary = serve_unary  # type: ignore[method-assign]
        for owner, attribute, static in reversed(originals):
            setattr(owner, attribute, static)


def _calibrate() -> tuple[float, float]:
    """(own ns a timed segment is charged for nothing, ns its parent is charged per timed child): the clock's cost."""

    def nothing() -> None:
        return None

    inner = _timed_function(nothing, _CALIBRATION + " inner")

    def outer() -> None:
        for _ in range(100):
            inner()

    timed_outer = _timed_function(outer, _CALIBRATION + " outer")
    bare = time.thread_time_ns()
    for _ in range(100):
        nothing()
    bare_loop = time.thread_time_ns() - bare
    for _ in range(200):
        timed_outer()
    own, units, _ = LEDGER.snapshot()
    per_inner = own[_CALIBRATION + " inner"] / units[_CALIBRATION + " inner"]
    per_child = (own[_CALIBRATION + " outer"] / units[_CALIBRATION + " outer"] - bare_loop) / 100
    for label in (_CALIBRATION + " inner", _CALIBRATION + " outer"):
        for table in (LEDGER.own, LEDGER.units, LEDGER.children):
            table.pop(label, None)
    return per_inner, max(0.0, per_child)


def _thread_cpu_s(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Window:
    """One measured window: calls completed, process and loop-thread CPU, and the steps' ledger difference."""

    calls: int
    process_s: float
    loop_s: float
    own: dict[str, float]  # ns, clock cost taken off


def measure(port: int, certs: Path, token: str, window: float, pool: ProcessPoolExecutor, form: str) -> Window:
    """Load the gateway for ``window`` seconds and read the ledger, the process's and the loop thread's CPU."""
    spec = load_spec(port, certs, token, window, form=form)
    measure_from, measure_until = spec.measure_from, spec.measure_until
    loop_tid = _LOOP_NATIVE[0]
    futures = [pool.submit(run_client, spec) for _ in range(2)]
    time.sleep(max(0.0, measure_from - time.time()))
    cpu0, loop0, (own0, units0, children0) = time.process_time(), _thread_cpu_s(loop_tid), LEDGER.snapshot()
    time.sleep(max(0.0, measure_until - time.time()))
    cpu1, loop1, (own1, units1, children1) = time.process_time(), _thread_cpu_s(loop_tid), LEDGER.snapshot()
    calls = sum(len(future.result(timeout=120)[0]) for future in futures)  # those completed in the window
    per_unit, per_child = _OVERHEAD
    own = {
        label: (own1[label] - own0.get(label, 0))
        - per_unit * (units1[label] - units0.get(label, 0))
        - per_child * (children1[label] - children0.get(label, 0))
        for label in own1
    }
    return Window(calls=calls, process_s=cpu1 - cpu0, loop_s=loop1 - loop0, own=own)


_OVERHEAD: tuple[float, float] = (0.0, 0.0)
_LOOP_NATIVE: list[int] = [0]


def _find_loop() -> None:
    """Point the ledger at the gateway's event-loop thread (the one named gateway-loop)."""
    for thread in threading.enumerate():
        if thread.name == "gateway-loop":
            LEDGER.thread = thread.ident
            _LOOP_NATIVE[0] = thread.native_id or 0
            return
    raise RuntimeError("no gateway-loop thread")


def main(argv: list[str] | None = None) -> int:
    from gateway import logging as oplog

    global _OVERHEAD
    parser = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--form", choices=("flat", "tensor"), default="flat", help="flat: the harness's gw target")
    parser.add_argument("--certs", type=Path, default=ROOT / "certs", help="a folder written by scripts/gen_certs.sh")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--bare", action="store_true", help="no step timing: the server's CPU per call alone")
    args = parser.parse_args(argv)
    oplog.configure(fmt="json", level="warning")
    if args.bare:
        return _bare(args)
    LEDGER.thread = threading.get_ident()
    _OVERHEAD = min((_calibrate() for _ in range(5)), key=lambda pair: pair[0])
    windows: list[Window] = []
    with client_pool() as pool, instrumented(), serving(args.certs, args.models) as (port, token):
        _find_loop()
        for _ in range(args.reps):
            windows.append(measure(port, args.certs, token, args.window, pool, args.form))
    labels = list(_STEPS)

    def per_call(window: Window, ns: float) -> float:
        return ns / 1000 / max(1, window.calls)

    rows = {label: statistics.median(per_call(w, w.own.get(label, 0.0)) for w in windows) for label in labels}
    steps_sum = statistics.median(sum(per_call(w, ns) for ns in w.own.values()) for w in windows)
    process = statistics.median(w.process_s / max(1, w.calls) * 1e6 for w in windows)
    loop = statistics.median(w.loop_s / max(1, w.calls) * 1e6 for w in windows)
    rps = statistics.median(w.calls / args.window for w in windows)
    print(
        f"server CPU per call by step, Predict ({args.form} form), {IN_FLIGHT} in flight, medians of {args.reps} "
        f"windows of {args.window:g} s, {rps:,.0f} calls/s ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}); "
        f"clock cost taken off: {_OVERHEAD[0]:.0f} ns per segment, {_OVERHEAD[1]:.0f} ns per child"
    )
    print("| step | us/call |\n|---|---:|")
    for label in labels:
        print(f"| {label} | {rows[label]:.1f} |")
    print(f"| **steps above, sum** | **{steps_sum:.0f}** |")
    print(f"| loop thread, the rest (grpc.aio callbacks, event loop, task switches) | {loop - steps_sum:.0f} |")
    print(f"| other threads (grpc C core and poller, audit syncer) | {process - loop:.0f} |")
    print(f"| **server process CPU per call (instrumented)** | **{process:.0f}** |")
    return 0


def _bare(args: argparse.Namespace) -> int:
    """Windows without instrumentation: the figure to compare two trees by (run each in turn, same machine)."""
    windows: list[Window] = []
    with client_pool() as pool, serving(args.certs, args.models) as (port, token):
        _find_loop()
        LEDGER.thread = None
        for _ in range(args.reps):
            windows.append(measure(port, args.certs, token, args.window, pool, args.form))
    for window in windows:
        print(
            f"bare: {window.calls / args.window:,.0f} calls/s, server CPU {window.process_s / window.calls * 1e6:.0f} "
            f"us/call, loop thread {window.loop_s / window.calls * 1e6:.0f} us/call"
        )
    cpu = statistics.median(w.process_s / max(1, w.calls) * 1e6 for w in windows)
    print(f"bare median: server CPU {cpu:.0f} us/call ({args.form} form, {IN_FLIGHT} in flight)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

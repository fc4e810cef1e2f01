"""Closed-loop load, as a fleet sends it: each client process keeps ``in_flight`` calls outstanding (grpc.aio)
spread over ``connections`` connections of its own, and records the latency of every call that completes inside
the measured window. Loopback only, bounded in time."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import numpy as np

from gateway import tensors
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway._pb.inference import grpc_service_pb2 as oip_pb
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc


@dataclass(frozen=True)
class LoadSpec:
    """What one client process sends, to where, and when it measures (absolute ``time.time()`` bounds)."""

    target: str
    model: str
    # "flat" (tutorial repeated float), "tensor" (raw bytes), "oip" (Open Inference Protocol, raw) or "rest" (its
    # REST binding over HTTPS: JSON header and binary tensors, as tritonclient.http sends by default)
    form: str
    mode: str  # "unary" or "stream"
    in_flight: int
    batch: int
    features: int
    measure_from: float
    measure_until: float
    certs: str | None = None  # a folder written by scripts/gen_certs.sh; None: plaintext
    client: str = "alice"
    token: str | None = None
    connections: int = 1  # TCP connections of this process; the in-flight calls are spread over them


def _request(spec: LoadSpec) -> Any:
    x = np.random.default_rng(0).random((spec.batch, spec.features), dtype=np.float32)
    if spec.form == "oip":  # as tritonclient sends it
        tensor = oip_pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)
        return oip_pb.ModelInferRequest(model_name=spec.model, inputs=[tensor], raw_input_contents=[x.tobytes()])
    if spec.form == "flat":
        return pb.PredictRequest(model_name=spec.model, input_data=x.ravel())
    return pb.PredictRequest(model_name=spec.model, inputs=[tensors.encode("input", x)])


def _channel(spec: LoadSpec) -> grpc.aio.Channel:
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
        # Channels to one target otherwise share one connection (grpc's global subchannel pool).
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if spec.certs is None:
        return grpc.aio.insecure_channel(spec.target, options=options)
    return grpc.aio.secure_channel(spec.target, client_credentials(Path(spec.certs), spec.client), options=options)


def client_credentials(certs: Path, client: str) -> grpc.ChannelCredentials:
    """Mutual TLS as ``client``, from its folder in a gen_certs.sh set."""
    folder = certs / "clients" / client
    return grpc.ssl_channel_credentials(
        (folder / "ca.crt").read_bytes(),
        (folder / f"{client}.key").read_bytes(),
        (folder / f"{client}.crt").read_bytes(),
    )


async def _unary_worker(stub: Any, request: Any, metadata: Any, spec: LoadSpec, latencies: list[float]) -> int:
    errors = 0
    while (now := time.time()) < spec.measure_until:
        start = time.perf_counter()
        try:
            await stub(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError:
            errors += 1
            continue
        if now >= spec.measure_from:
            latencies.append(time.perf_counter() - start)
    return errors


async def _stream_worker(stub: Any, request: Any, metadata: Any, spec: LoadSpec, latencies: list[float]) -> int:
    call = stub.PredictStream(metadata=metadata, timeout=600)
    errors = 0
    while (now := time.time()) < spec.measure_until:
        start = time.perf_counter()
        await call.write(request)
        reply = await call.read()
        if reply.WhichOneof("outcome") != "response":
            errors += 1
        elif now >= spec.measure_from:
            latencies.append(time.perf_counter() - start)
    await call.done_writing()
    return errors


def _rest_body(spec: LoadSpec) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).random((spec.batch, spec.features), dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    if spec.token:
        headers["Authorization"] = f"Bearer {spec.token}"
    return header + x.tobytes(), headers


async def _rest_worker(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    spec: LoadSpec,
    latencies: list[float],
) -> int:
    errors = 0
    while (now := time.time()) < spec.measure_until:
        start = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            if response.status != 200:
                errors += 1
                continue
        if now >= spec.measure_from:
            latencies.append(time.perf_counter() - start)
    return errors


async def _run_rest(spec: LoadSpec) -> tuple[list[float], int]:
    """The REST binding: one aiohttp session (keep-alive connections) per connection asked for."""
    if spec.certs is None:
        raise ValueError("the REST binding is HTTPS only: give certs")
    folder = Path(spec.certs) / "clients" / spec.client
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    context.load_cert_chain(folder / f"{spec.client}.crt", folder / f"{spec.client}.key")
    sessions = max(1, min(spec.connections, spec.in_flight))
    per_session = -(-spec.in_flight // sessions)
    clients = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=per_session)) for _ in range(sessions)
    ]
    body, headers = _rest_body(spec)
    url = f"https://{spec.target.replace('127.0.0.1', 'localhost')}/v2/models/{spec.model}/infer"
    latencies: list[float] = []
    try:
        errors = await asyncio.gather(
            *(_rest_worker(clients[i % sessions], url, body, headers, spec, latencies) for i in range(spec.in_flight))
        )
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    return latencies, sum(errors)


async def _run(spec: LoadSpec) -> tuple[list[float], int]:
    if spec.form == "rest":
        return await _run_rest(spec)
    latencies: list[float] = []
    metadata = (("authorization", f"Bearer {spec.token}"),) if spec.token else None
    request = _request(spec)
    channels = [_channel(spec) for _ in range(max(1, min(spec.connections, spec.in_flight)))]
    try:
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        if spec.mode == "stream":
            worker, stubs = _stream_worker, [pb_grpc.InferenceServiceStub(channel) for channel in channels]
        elif spec.form == "oip":
            worker, stubs = (
                _unary_worker,
                [oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer for channel in channels],
            )
        else:
            worker, stubs = _unary_worker, [pb_grpc.InferenceServiceStub(channel).Predict for channel in channels]
        errors = await asyncio.gather(
            *(worker(stubs[i % len(stubs)], request, metadata, spec, latencies) for i in range(spec.in_flight))
        )
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return latencies, sum(errors)


def run_client(spec: LoadSpec) -> tuple[list[float], int]:
    """Entry point of a client process: latencies (seconds) inside the window, and the error count."""
    return asyncio.run(_run(spec))

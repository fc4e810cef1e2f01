"""Drive the stock tritonclient (sync, asyncio and streaming) against a gateway; print what it saw as JSON.

Run as a subprocess by tests/e2e/test_oip_clients.py: tritonclient's generated ``inference.*`` messages and the
gateway's own cannot be loaded into one Python process (one protobuf descriptor pool), and the test process
runs the gateway. Usage: ``python triton_client.py JOB.json``; JOB holds the connection
(``target``, ``ca``, ``cert``, ``key``, ``token``) and ``steps``: ``{"client": "sync" | "aio", "op": NAME,
"args": {...}}``. Each step's result is ``{"ok": value}`` or ``{"error": {"status": "StatusCode.X", "message"}}``.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as sync_client
import tritonclient.grpc.aio as aio_client
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 10


def connect(module: Any, job: dict[str, Any]) -> Any:
    return module.InferenceServerClient(
        job["target"],
        ssl=bool(job.get("ca")),  # no CA: plaintext, for a backend called directly (tests/backends)
        root_certificates=job.get("ca"),
        private_key=job.get("key"),
        certificate_chain=job.get("cert"),
    )


def headers(job: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {job['token']}"} if job.get("token") else {}


def make_inputs(module: Any, specs: list[dict[str, Any]]) -> list[Any]:
    inputs = []
    for spec in specs:
        dtype = object if spec["datatype"] == "BYTES" else np.dtype(spec["numpy"])
        array = np.array(spec["data"], dtype=dtype).reshape(spec["shape"])
        tensor = module.InferInput(spec["name"], list(array.shape), spec["datatype"])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def outputs_of(result: Any) -> dict[str, Any]:
    response = result.get_response(as_json=True)
    seen = {}
    for output in response.get("outputs", []):
        array = result.as_numpy(output["name"])
        data = [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
        seen[output["name"]] = {"datatype": output["datatype"], "shape": list(array.shape), "data": data}
    return {"model_version": response.get("model_version"), "id": response.get("id", ""), "outputs": seen}


def infer_args(module: Any, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_name": args["model"],
        "inputs": make_inputs(module, args["inputs"]),
        "model_version": args.get("version", ""),
        "outputs": [module.InferRequestedOutput(name) for name in args["outputs"]] if "outputs" in args else None,
        "request_id": args.get("id", ""),
    }


def run_sync(job: dict[str, Any], op: str, args: dict[str, Any]) -> Any:
    client = connect(sync_client, job)
    try:
        md = headers(job)
        if op == "infer":
            return outputs_of(client.infer(**infer_args(sync_client, args), headers=md, client_timeout=TIMEOUT_S))
        if op == "stream":
            return sync_stream(client, md, args)
        return metadata_op(client.__getattribute__(op)(**args, headers=md, client_timeout=TIMEOUT_S))
    finally:
        client.close()


def sync_stream(client: Any, md: dict[str, str], args: dict[str, Any]) -> list[Any]:
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=md)
    for request in args["requests"]:
        client.async_stream_infer(**infer_args(sync_client, request))
    seen = [answers.get(timeout=TIMEOUT_S) for _ in args["requests"]]
    client.stop_stream()
    return [stream_answer(result, error) for result, error in seen]


def stream_answer(result: Any, error: Any) -> dict[str, Any]:
    return {"error": str(error.message())} if error is not None else {"ok": outputs_of(result)}


def metadata_op(value: Any) -> Any:
    if isinstance(value, bool | dict | list):
        return value
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(value, preserving_proto_field_name=True)


async def run_aio(job: dict[str, Any], op: str, args: dict[str, Any]) -> Any:
    client = connect(aio_client, job)
    try:
        md = headers(job)
        if op == "infer":
            result = await client.infer(**infer_args(aio_client, args), headers=md, client_timeout=TIMEOUT_S)
            return outputs_of(result)
        if op == "stream":

            async def requests() -> Any:
                for request in args["requests"]:
                    yield infer_args(aio_client, request)

            # Read to the end: the requests' end half-closes the stream, and the gateway then ends it (OK).
            stream = client.stream_infer(requests(), stream_timeout=TIMEOUT_S, headers=md)
            return [stream_answer(result, error) async for result, error in stream]
        return metadata_op(await getattr(client, op)(**args, headers=md, client_timeout=TIMEOUT_S))
    finally:
        await client.close()


def run_step(job: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    op, args = step["op"], step.get("args", {})
    try:
        if step.get("client", "sync") == "aio":
            return {"ok": asyncio.run(run_aio(job, op, args))}
        return {"ok": run_sync(job, op, args)}
    except InferenceServerException as exc:
        return {"error": {"status": str(exc.status()), "message": str(exc.message())}}


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    print(json.dumps([run_step(job, step) for step in job["steps"]]))


if __name__ == "__main__":
    main()

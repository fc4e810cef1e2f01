"""Drive the stock tritonclient.http (sync on geventhttpclient, and asyncio on aiohttp) against a gateway's REST
port; print what it saw as JSON.

Run as a subprocess by tests/e2e/test_rest_clients.py (gevent stays out of the process that runs the gateway).
Usage: ``python triton_http_client.py JOB.json``; JOB holds the connection (``url`` HOST:PORT, ``ca``, ``cert``,
``key``, ``token``) and ``steps``: ``{"client": "sync" | "aio", "op": NAME, "args": {...}, "connection": {...}}``
(``connection``: the step's own ``cert``, ``key`` or ``token``); an ``infer`` step's
``binary`` (default true) says whether tensors go as binary data or JSON. Each result is ``{"ok": value}`` or
``{"error": {"status": "401", "message"}}``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from typing import Any

import gevent.ssl
import numpy as np
import tritonclient.http as sync_client
import tritonclient.http.aio as aio_client
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 10


def headers(job: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {job['token']}"} if job.get("token") else {}


def make_inputs(module: Any, specs: list[dict[str, Any]], binary: bool) -> list[Any]:
    inputs = []
    for spec in specs:
        dtype = object if spec["datatype"] == "BYTES" else np.dtype(spec["numpy"])
        array = np.array(spec["data"], dtype=dtype).reshape(spec["shape"])
        tensor = module.InferInput(spec["name"], list(array.shape), spec["datatype"])
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def infer_args(module: Any, args: dict[str, Any]) -> dict[str, Any]:
    binary = args.get("binary", True)
    outputs = None
    if "outputs" in args:
        outputs = [module.InferRequestedOutput(name, binary_data=binary) for name in args["outputs"]]
    return {
        "model_name": args["model"],
        "inputs": make_inputs(module, args["inputs"], binary),
        "model_version": args.get("version", ""),
        "outputs": outputs,
        "request_id": args.get("id", ""),
    }


def outputs_of(result: Any) -> dict[str, Any]:
    response = result.get_response()
    seen = {}
    for output in response.get("outputs", []):
        array = result.as_numpy(output["name"])
        data = [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
        seen[output["name"]] = {
            "datatype": output["datatype"],
            "shape": list(array.shape),
            "data": data,
            "binary": "binary_data_size" in output.get("parameters", {}),
        }
    return {"model_version": response.get("model_version"), "id": response.get("id", ""), "outputs": seen}


def run_sync(job: dict[str, Any], op: str, args: dict[str, Any]) -> Any:
    client = sync_client.InferenceServerClient(
        job["url"],
        ssl=True,
        ssl_options={"keyfile": job.get("key"), "certfile": job.get("cert"), "ca_certs": job["ca"]},
        ssl_context_factory=gevent.ssl.create_default_context,
        network_timeout=TIMEOUT_S,
    )
    try:
        if op == "infer":
            return outputs_of(client.infer(**infer_args(sync_client, args), headers=headers(job)))
        return getattr(client, op)(**args, headers=headers(job))
    finally:
        client.close()


async def run_aio(job: dict[str, Any], op: str, args: dict[str, Any]) -> Any:
    context = ssl.create_default_context(cafile=job["ca"])
    if job.get("cert"):
        context.load_cert_chain(job["cert"], job["key"])
    client = aio_client.InferenceServerClient(job["url"], ssl=True, ssl_context=context, conn_timeout=TIMEOUT_S)
    try:
        if op == "infer":
            return outputs_of(await client.infer(**infer_args(aio_client, args), headers=headers(job)))
        return await getattr(client, op)(**args, headers=headers(job))
    finally:
        await client.close()


def run_step(job: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    op, args = step["op"], step.get("args", {})
    job = {**job, **step.get("connection", {})}  # a step's own certificate, key or token
    try:
        if step.get("client", "sync") == "aio":
            return {"ok": asyncio.run(run_aio(job, op, args))}
        return {"ok": run_sync(job, op, args)}
    except InferenceServerException as exc:
        return {"error": {"status": str(exc.status()), "message": str(exc.message())}}
    except Exception as exc:  # a failed handshake, a reset connection: what the stock client raised
        return {"error": {"status": type(exc).__name__, "message": str(exc)}}


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    print(json.dumps([run_step(job, step) for step in job["steps"]]))


if __name__ == "__main__":
    main()

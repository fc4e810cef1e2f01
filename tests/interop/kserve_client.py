"""Drive the stock KServe Python SDK (0.21: InferenceGRPCClient and InferenceRESTClient) against a gateway; print
what it saw as JSON. Run with .venv-kserve's Python (KServe's own environment, built by `make setup`) by
tests/e2e/test_kserve_clients.py.

Usage: ``python kserve_client.py JOB.json``; JOB holds ``grpc`` (HOST:PORT), ``rest`` (https://HOST:PORT), ``ca``,
``cert``, ``key``, ``token`` and ``steps``: ``{"client": "grpc" | "rest", "op": NAME, "args": {...}}``. Each
result is ``{"ok": value}`` or ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from typing import Any

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

TIMEOUT_S = 10


def request(args: dict[str, Any]) -> InferRequest:
    inputs = []
    for spec in args["inputs"]:
        dtype = object if spec["datatype"] == "BYTES" else np.dtype(spec["numpy"])
        array = np.array(spec["data"], dtype=dtype).reshape(spec["shape"])
        tensor = InferInput(spec["name"], list(array.shape), spec["datatype"])
        tensor.set_data_from_numpy(array, binary_data=args.get("binary", True))  # the SDK's default: binary
        inputs.append(tensor)
    return InferRequest(model_name=args["model"], infer_inputs=inputs, request_id=args.get("id"))


def outputs_of(response: Any) -> dict[str, Any]:
    seen = {}
    for output in response.outputs:
        array = output.as_numpy()
        data = [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
        seen[output.name] = {"datatype": output.datatype, "shape": list(array.shape), "data": data}
    return {"model_name": response.model_name, "id": response.id, "outputs": seen}


async def run_grpc(job: dict[str, Any], op: str, args: dict[str, Any]) -> Any:
    client = InferenceGRPCClient(
        job["grpc"],
        use_ssl=True,
        root_certificates=job["ca"],
        private_key=job["key"],
        certificate_chain=job["cert"],
        timeout=TIMEOUT_S,
        retries=0,
    )
    headers = (("authorization", f"Bearer {job['token']}"),)
    try:
        if op == "infer":
            return outputs_of(await client.infer(request(args), headers=headers))
        return await getattr(client, op)(**args, headers=headers)
    finally:
        await client.close()


async def run_rest(job: dict[str, Any], op: str, args: dict[str, Any]) -> Any:
    context = ssl.create_default_context(cafile=job["ca"])
    context.load_cert_chain(job["cert"], job["key"])
    client = InferenceRESTClient(RESTConfig(protocol="v2", verify=context, timeout=TIMEOUT_S, retries=0))
    headers = {"authorization": f"Bearer {job['token']}"}
    try:
        if op == "infer":
            answer = await client.infer(job["rest"], request(args), model_name=args["model"], headers=headers)
            return outputs_of(answer)
        return await getattr(client, op)(job["rest"], **args, headers=headers)
    finally:
        await client.close()


def run_step(job: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    run = run_grpc if step["client"] == "grpc" else run_rest
    try:
        return {"ok": asyncio.run(run(job, step["op"], step.get("args", {})))}
    except Exception as exc:  # what the SDK raised: an RpcError, an httpx.HTTPStatusError...
        return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    print(json.dumps([run_step(job, step) for step in job["steps"]]))


if __name__ == "__main__":
    main()

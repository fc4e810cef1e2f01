"""A real third-party Open Inference Protocol server for the backend tests, run as a subprocess in its own venv
(`make setup` builds .venv-mlserver and .venv-kserve): ``python oip_server.py mlserver FOLDER`` (MLServer serving
FOLDER's model-settings) or ``python oip_server.py kserve`` (KServe's ModelServer with a numpy model, "double").

Both servers bind a gRPC port they choose themselves, on loopback: the gRPC listener's address is rewritten to
127.0.0.1:0 (KServe listens on [::] otherwise; a restart passes the port it had in ``OIP_GRPC_PORT``) and the
port grpc bound is printed as ``GRPC_PORT=N`` for the test
to read. Every RPC the server receives is appended, by method name, to the file named by ``OIP_CALLS_FILE``: the
tests count what reached the backend from it.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc import aio

_CALLS = os.environ["OIP_CALLS_FILE"]
_server = aio.server


class _Counter(aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        with open(_CALLS, "a") as calls:
            calls.write(handler_call_details.method.rsplit("/", 1)[-1] + "\n")
        return await continuation(handler_call_details)


def _counted_server(*args, interceptors=(), **kwargs):
    server = _server(*args, interceptors=(_Counter(), *interceptors), **kwargs)
    add = server.add_insecure_port

    def add_loopback(address: str) -> int:
        port = add(f"127.0.0.1:{os.environ.get('OIP_GRPC_PORT', '0')}")
        print(f"GRPC_PORT={port}", flush=True)
        return port

    server.add_insecure_port = add_loopback
    return server


aio.server = _counted_server
grpc.aio.server = _counted_server


def kserve() -> None:
    import numpy as np
    from kserve import InferRequest, InferResponse, Model, ModelServer
    from kserve.utils.utils import get_predict_response

    class Double(Model):
        """Twice its FP32 input: enough to tell a real answer from any other."""

        def __init__(self) -> None:
            super().__init__("double")
            self.ready = True

        def get_input_types(self) -> list[dict]:
            return [{"name": "x", "datatype": "FP32", "shape": [-1]}]

        def get_output_types(self) -> list[dict]:
            return [{"name": "output-0", "datatype": "FP32", "shape": [-1]}]

        async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            values = payload.inputs[0].as_numpy()
            return get_predict_response(payload, np.asarray(values * 2, dtype=np.float32), self.name)

    ModelServer(http_port=0, grpc_port=0, workers=1, enable_docs_url=False).start([Double()])


def mlserver(folder: str) -> None:
    from mlserver.cli.main import main

    sys.path.insert(0, folder)  # the model class module lives beside its model-settings.json
    sys.argv = ["mlserver", "start", folder]
    main()


if __name__ == "__main__":
    if sys.argv[1] == "kserve":
        kserve()
    else:
        mlserver(sys.argv[2])

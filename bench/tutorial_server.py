"""A bare grpcio server written the way the original tutorial does it: sync server, ThreadPoolExecutor(10),
``Predict(model_name, repeated float input_data) -> result``, no authentication, no audit.

Target (b) runs it insecure with ONNX Runtime's default threads; target (c), the transport floor, runs it
with mutual TLS and one intra-op thread per session (what the gateway uses). One change from the tutorial: a
64 MiB message limit (grpc's default is 4 MiB), the gateway's, so that the request-size sweep compares like
with like.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc


class TutorialServicer(pb_grpc.InferenceServiceServicer):
    """One ONNX Runtime session per model; flat floats in, flat floats out."""

    def __init__(self, models: Path, *, tuned: bool) -> None:
        options = ort.SessionOptions()
        if tuned:
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
        self.sessions = {}
        for path in sorted(models.glob("*/*/model.onnx")):
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            self.sessions[path.parent.parent.name] = session  # the last (highest) version wins

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        session = self.sessions[request.model_name]
        model_input = session.get_inputs()[0]
        data = np.array(request.input_data, dtype=np.float32).reshape(1, -1)
        output = session.run(None, {model_input.name: data})[0]
        return pb.PredictResponse(result=output.ravel().tolist())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--certs", type=Path, help="mutual TLS with the server folder of a gen_certs.sh set")
    parser.add_argument("--tuned", action="store_true", help="1 intra-op thread per session")
    args = parser.parse_args()
    limit = 64 * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=10),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    pb_grpc.add_InferenceServiceServicer_to_server(TutorialServicer(args.models, tuned=args.tuned), server)
    address = f"127.0.0.1:{args.port}"
    if args.certs:
        credentials = grpc.ssl_server_credentials(
            [((args.certs / "server.key").read_bytes(), (args.certs / "server.crt").read_bytes())],
            root_certificates=(args.certs / "ca.crt").read_bytes(),
            require_client_auth=True,
        )
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()

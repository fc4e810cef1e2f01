"""``python -m gateway.probe [HOST:PORT]``: asks the plaintext probe listener (``health.listen``) for the overall
health, for container health checks where kubelet's gRPC probe is not used (``docker run --health-cmd``).
Exit 0 on SERVING; 1 on NOT_SERVING or no answer, with the reason on stderr."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout: float) -> str:
    """The status name the listener answers (``SERVING``, ``NOT_SERVING``), or why there was no answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds over 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.probe",
        description="Ask the gateway's plaintext probe listener (health.listen) whether the gateway is ready: "
        "grpc.health.v1.Health/Check, the question kubelet's gRPC probe asks. For container health checks "
        "(docker run --health-cmd); `gateway health` asks the main port too.",
        epilog="exit codes: 0 SERVING; 1 NOT_SERVING or no answer (the reason on stderr); 2 usage error",
    )
    parser.add_argument(
        "address", nargs="?", default="127.0.0.1:8081", help="HOST:PORT of health.listen (default %(default)s)"
    )
    parser.add_argument("--timeout", type=_seconds, default=2.0, help="seconds to wait (default %(default)s)")
    args = parser.parse_args(argv)
    status = check(args.address, args.timeout)
    if status == "SERVING":
        return 0
    print(f"{args.address}: {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

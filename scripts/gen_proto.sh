#!/usr/bin/env bash
# Regenerates gateway/_pb/ from proto/ with the pinned grpcio-tools (the dev extra in pyproject.toml).
# Usage: scripts/gen_proto.sh [OUTDIR (default gateway/_pb)]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}  # the interpreter with grpcio-tools (dev extra)
out=${1:-gateway/_pb}
mkdir -p "$out"
"$PYTHON" -m grpc_tools.protoc -I proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    proto/gateway/v1/gateway.proto proto/inference/grpc_service.proto proto/triton/model_config.proto
# protoc writes imports relative to -I proto (`from gateway.v1 import gateway_pb2`); inside our package the
# modules live under gateway._pb, so rewrite those imports to be package-relative.
sed -i 's/^from gateway\.v1 import gateway_pb2 as/from . import gateway_pb2 as/' "$out/gateway/v1/gateway_pb2_grpc.py"
sed -i 's/^from inference import grpc_service_pb2 as/from . import grpc_service_pb2 as/' \
    "$out/inference/grpc_service_pb2_grpc.py"
touch "$out/__init__.py" "$out/gateway/__init__.py" "$out/gateway/v1/__init__.py" "$out/inference/__init__.py" \
    "$out/triton/__init__.py"

"""The plaintext probe listener (``health.listen``): grpc.health.v1.Health alone, with the gateway's one readiness
definition, which the mutual-TLS port's health and the Open Inference Protocol's ServerReady share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway._pb.inference import grpc_service_pb2 as oip_pb
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from tests.conftest import wait_until
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def gw(start_gateway):
    return start_gateway(overrides={"health.listen": "127.0.0.1:0"})


def check(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT).status


def probe_channel(gw) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{gw.gateway.probe_port}")


def break_audit_sink(gw) -> None:
    """The trail's descriptor now fails with ENOSPC (a full disk), and reopening its folder fails (ENOTDIR)."""
    audit = gw.gateway.audit
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, audit._file.fd)
    finally:
        os.close(full)
    directory = gw.audit_path.parent
    os.rename(directory, directory.with_name("audit-moved"))
    directory.write_text("not a directory")


def mend_audit_sink(gw) -> None:
    directory = gw.audit_path.parent
    directory.unlink()
    os.rename(directory.with_name("audit-moved"), directory)


def predict(gw, channel: grpc.Channel) -> grpc.StatusCode:
    try:
        request = predict_request("mlp", {"input": np.zeros((1, 784), np.float32)})
        stub(channel).Predict(request, metadata=auth(gw.token()), timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_probe_port_answers_check_in_plaintext_without_a_certificate(gw):
    with probe_channel(gw) as channel:
        assert check(channel) == SERVING


def test_probe_port_serves_health_alone(gw):
    with probe_channel(gw) as channel:
        assert rpc_error(lambda: check(channel, "model/mlp")).code() == grpc.StatusCode.NOT_FOUND
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert rpc_error(lambda: next(replies)).code() == grpc.StatusCode.UNIMPLEMENTED
        ready = oip_grpc.GRPCInferenceServiceStub(channel).ServerReady
        exc = rpc_error(lambda: ready(oip_pb.ServerReadyRequest(), metadata=auth(gw.token()), timeout=TIMEOUT))
        assert exc.code() == grpc.StatusCode.UNIMPLEMENTED


def test_both_ports_turn_not_serving_while_the_audit_sink_is_down_and_serving_once_it_is_back(gw):
    with probe_channel(gw) as probe, gw.channel() as channel:
        assert check(probe) == check(channel) == SERVING
        break_audit_sink(gw)
        assert predict(gw, channel) == grpc.StatusCode.UNAVAILABLE  # the write that finds the sink down
        assert check(probe) == check(channel) == NOT_SERVING
        mend_audit_sink(gw)
        wait_until(lambda: predict(gw, channel) == grpc.StatusCode.OK, timeout_s=TIMEOUT)
        assert check(probe) == check(channel) == SERVING


def test_probe_port_refuses_watch(gw):
    """A Watch is held open for as long as the caller likes: not served to callers with no identity."""
    with probe_channel(gw) as probe:
        updates = health_pb2_grpc.HealthStub(probe).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert rpc_error(lambda: next(updates)).code() == grpc.StatusCode.UNIMPLEMENTED
        assert check(probe) == SERVING


def test_watch_on_the_main_port_sends_the_status_then_its_change(gw):
    with gw.channel() as channel:
        updates = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert next(updates).status == SERVING
        break_audit_sink(gw)
        assert predict(gw, channel) == grpc.StatusCode.UNAVAILABLE
        assert next(updates).status == NOT_SERVING
        updates.cancel()
        mend_audit_sink(gw)


def test_without_a_loaded_model_health_and_server_ready_all_say_not_ready(start_gateway, tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    gw = start_gateway(models=empty, overrides={"health.listen": "127.0.0.1:0"})
    with probe_channel(gw) as probe, gw.channel() as channel:
        server_ready = oip_grpc.GRPCInferenceServiceStub(channel).ServerReady
        assert server_ready(oip_pb.ServerReadyRequest(), metadata=auth(gw.token()), timeout=TIMEOUT).ready is False
        assert check(probe) == check(channel) == NOT_SERVING


def test_probe_port_is_not_serving_while_draining(start_gateway):
    gw = start_gateway(overrides={"health.listen": "127.0.0.1:0", "shutdown_drain_s": 1.5})
    stopper = threading.Thread(target=gw.gateway.stop)
    with probe_channel(gw) as probe:
        assert check(probe) == SERVING
        stopper.start()
        wait_until(lambda: check(probe) == NOT_SERVING, timeout_s=TIMEOUT)
    stopper.join(timeout=TIMEOUT)
    assert not stopper.is_alive()


def probe_command(address: str) -> subprocess.CompletedProcess[str]:
    """The image's health check command, as a container runtime runs it."""
    command = [sys.executable, "-m", "gateway.probe", address, "--timeout", "5"]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_probe_command_exits_0_while_serving_and_1_naming_the_status_while_not(gw):
    address = f"127.0.0.1:{gw.gateway.probe_port}"
    assert probe_command(address).returncode == 0
    with gw.channel() as channel:
        break_audit_sink(gw)
        assert predict(gw, channel) == grpc.StatusCode.UNAVAILABLE  # the write that finds the sink down
        refused = probe_command(address)
        mend_audit_sink(gw)
        wait_until(lambda: predict(gw, channel) == grpc.StatusCode.OK, timeout_s=TIMEOUT)
    assert (refused.returncode, refused.stderr.strip()) == (1, f"{address}: NOT_SERVING")


def test_probe_command_exits_1_naming_unavailable_when_nothing_listens():
    with socket.socket() as bound:  # bound, never listening: connecting is refused, and no one else can take the port
        bound.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{bound.getsockname()[1]}"
        refused = probe_command(address)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"{address}: UNAVAILABLE")

"""A backend that is down, slow, too talkative, at its in-flight cap, answering another version than asked, cut off
by its caller, killed under load and restarted: every call ends (none hangs), with the code its record names, and
the record says what the backend did. A backend's own refusals are not counted against the caller."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from gateway._pb.inference import grpc_service_pb2 as oip
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from gateway.config import ConfigError
from tests.backends.conftest import empty_repository, plaintext_backend
from tests.conftest import wait_until
from tests.e2e.helpers import TIMEOUT, auth, rpc_error, trailer

X = np.random.default_rng(5).random((1, 784), dtype=np.float32)


@pytest.fixture(scope="module")
def gw(start_module_gateway, mlserver, tmp_path_factory):
    backends = {
        "mlserver": plaintext_backend(
            mlserver, {"mlp": "mlp", "slow-patient": "slow", "liar": "liar"}, deadline_s=30.0
        ),
        "mlserver-hurried": plaintext_backend(mlserver, {"slow": "slow"}, deadline_s=0.5),
        "mlserver-small": plaintext_backend(mlserver, {"expand": "expand"}, max_message_bytes=4096),
        "mlserver-narrow": plaintext_backend(mlserver, {"slow-narrow": "slow"}, max_in_flight=1),
        # Nothing listens on port 1: a backend down from the start.
        "nowhere": {"addresses": ["127.0.0.1:1"], "plaintext": True, "models": {"ghost": "mlp"}},
    }
    # Three refusals of one caller in 10 s block it: a backend's refusals must not count.
    overrides = {"backends": backends, "limits.per_principal.max_refusals": 3}
    return start_module_gateway(models=empty_repository(tmp_path_factory), overrides=overrides)


def request(model: str, name: str, array: np.ndarray) -> oip.ModelInferRequest:
    message = oip.ModelInferRequest(model_name=model)
    message.inputs.add(name=name, datatype={np.float32: "FP32", np.int64: "INT64"}[array.dtype.type], shape=array.shape)
    message.raw_input_contents.append(array.tobytes())
    return message


def infer(gw, message: oip.ModelInferRequest, *, timeout: float = TIMEOUT, request_id: str | None = None):
    extra = (("x-request-id", request_id),) if request_id else ()
    with gw.channel() as channel:
        return oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            message, metadata=auth(gw.token(), *extra), timeout=timeout
        )


def infer_later(gw, channel, message: oip.ModelInferRequest, request_id: str) -> grpc.Future:
    """A call left open (a grpc future on ``channel``): cancel it, or read how it ended."""
    return oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(
        message, metadata=auth(gw.token(), ("x-request-id", request_id)), timeout=60
    )


def last_record(gw, model: str) -> dict:
    return [r for r in gw.audit_records() if r["model"] == model][-1]


def test_a_backend_down_at_start_leaves_the_gateway_ready_and_its_models_unavailable_at_once(gw):
    with gw.channel() as channel:
        client = oip_grpc.GRPCInferenceServiceStub(channel)
        md = auth(gw.token())
        assert client.ServerReady(oip.ServerReadyRequest(), metadata=md, timeout=TIMEOUT).ready
        assert not client.ModelReady(oip.ModelReadyRequest(name="ghost"), metadata=md, timeout=TIMEOUT).ready
    error = rpc_error(lambda: infer(gw, request("ghost", "input", X)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert trailer(error, "x-retry-safe") == "true"  # nothing was sent: safe to retry
    record = last_record(gw, "ghost")
    assert (record["code"], record["decision"]) == ("UNAVAILABLE", "allow")
    assert record["backend"] == {"name": "nowhere", "address": None, "code": None, "latency_ms": None}


def test_a_required_backend_down_keeps_the_gateway_unready(start_module_gateway, tmp_path_factory):
    backends = {"nowhere": {"addresses": ["127.0.0.1:1"], "plaintext": True, "models": {"ghost": "mlp"}}}
    backends["nowhere"]["required"] = True
    gw = start_module_gateway(models=empty_repository(tmp_path_factory), overrides={"backends": backends})
    with gw.channel() as channel:
        ready = oip_grpc.GRPCInferenceServiceStub(channel).ServerReady(
            oip.ServerReadyRequest(), metadata=auth(gw.token()), timeout=TIMEOUT
        )
    assert not ready.ready
    gw.gateway.stop(0.5)


def test_a_model_both_local_and_routed_is_a_configuration_error(start_module_gateway, mlserver):
    with pytest.raises(ConfigError, match=r"backends\.mlserver\.models\.mlp: also served from models\.repository"):
        start_module_gateway(overrides={"backends": {"mlserver": plaintext_backend(mlserver, {"mlp": "mlp"})}})


def test_a_slow_backend_is_cut_at_its_deadline_and_the_backend_call_cancelled(gw, mlserver):
    cancelled = mlserver.calls()["cancelled"]
    error = rpc_error(lambda: infer(gw, request("slow", "seconds", np.array([3.0], np.float32))))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    record = last_record(gw, "slow")
    assert (record["code"], record["backend"]["code"]) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
    assert record["backend"]["address"] == mlserver.target
    wait_until(lambda: mlserver.calls()["cancelled"] == cancelled + 1)


def test_a_caller_that_goes_away_cancels_the_backend_call(gw, mlserver):
    cancelled = mlserver.calls()["cancelled"]
    error = rpc_error(lambda: infer(gw, request("slow-patient", "seconds", np.array([3.0], np.float32)), timeout=1.0))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the client's own deadline
    wait_until(lambda: mlserver.calls()["cancelled"] == cancelled + 1)
    wait_until(lambda: any(r["model"] == "slow-patient" for r in gw.audit_records()))
    record = last_record(gw, "slow-patient")
    # The record tells the caller's deadline; the backend's status, the call the gateway cancelled.
    assert (record["code"], record["backend"]["code"]) == ("DEADLINE_EXCEEDED", "CANCELLED")


def test_a_call_past_the_backends_in_flight_cap_is_refused_with_nothing_sent(gw, mlserver):
    infers = mlserver.calls()["ModelInfer"]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(infer, gw, request("slow-narrow", "seconds", np.array([1.5], np.float32)))
        wait_until(lambda: mlserver.calls()["ModelInfer"] == infers + 1)  # the first call is at the backend
        error = rpc_error(lambda: infer(gw, request("slow-narrow", "seconds", np.array([0.0], np.float32))))
        assert first.result(timeout=TIMEOUT).model_version == "1"
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert mlserver.calls()["ModelInfer"] == infers + 1
    served, refused = sorted(
        (r for r in gw.audit_records() if r["model"] == "slow-narrow"), key=lambda r: r["code"] != "OK"
    )
    assert (served["code"], served["backend"]["code"], refused["code"]) == ("OK", "OK", "RESOURCE_EXHAUSTED")
    assert refused["backend"] == {"name": "mlserver-narrow", "address": None, "code": None, "latency_ms": None}


def test_a_backend_answer_over_max_message_bytes_is_refused(gw):
    small = infer(gw, request("expand", "n", np.array([10], np.int64)))
    assert np.frombuffer(small.raw_output_contents[0], np.float32).shape == (10,)
    error = rpc_error(lambda: infer(gw, request("expand", "n", np.array([10_000], np.int64))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    record = last_record(gw, "expand")
    assert (record["code"], record["backend"]["code"]) == ("RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED")


def test_an_answer_from_another_version_than_asked_is_not_released(gw, mlserver):
    """The backend's model "liar" advertises version 1 and answers as version 7: the policy judged 1."""
    error = rpc_error(lambda: infer(gw, request("liar", "x", np.array([1.5], np.float32))))
    assert error.code() == grpc.StatusCode.INTERNAL
    record = last_record(gw, "liar")
    assert (record["code"], record["version"], record["backend"]["code"]) == ("INTERNAL", "1", "OK")
    assert trailer(error, "x-retry-safe") is None


def test_a_backends_own_refusals_do_not_block_the_caller(gw):
    """MLServer has no ModelConfig (UNIMPLEMENTED): past limits.per_principal.max_refusals (3) of them, the caller is
    still served, as a backend's reload window (NOT_FOUND) would leave it."""
    md = auth(gw.token())
    with gw.channel() as channel:
        client = oip_grpc.GRPCInferenceServiceStub(channel)
        codes = [
            rpc_error(lambda: client.ModelConfig(oip.ModelConfigRequest(name="mlp"), metadata=md, timeout=TIMEOUT))
            for _ in range(4)
        ]
    assert [e.code() for e in codes] == [grpc.StatusCode.UNIMPLEMENTED] * 4
    assert infer(gw, request("mlp", "input", X)).model_version == "2"


def test_a_backend_killed_under_load_hangs_no_call_loses_no_record_and_recovers_when_restarted(gw, mlserver):
    outcomes: dict[str, str] = {}
    retry_safe: dict[str, str | None] = {}
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            request_id = uuid.uuid4().hex
            try:
                infer(gw, request("mlp", "input", X), request_id=request_id)
                outcomes[request_id] = "OK"
            except grpc.RpcError as exc:
                outcomes[request_id] = exc.code().name
                retry_safe[request_id] = trailer(exc, "x-retry-safe")

    infers = mlserver.calls()["ModelInfer"]
    with gw.channel() as channel, ThreadPoolExecutor(4) as pool:
        # One call surely at the backend when it dies: it was sent, so it is not said to be safe to retry.
        sent = infer_later(gw, channel, request("slow-patient", "seconds", np.array([30.0], np.float32)), "sent")
        wait_until(lambda: mlserver.calls()["ModelInfer"] == infers + 1)
        callers = [pool.submit(caller) for _ in range(4)]
        wait_until(lambda: list(outcomes.values()).count("OK") >= 8, timeout_s=30)
        mlserver.kill()
        wait_until(lambda: "UNAVAILABLE" in outcomes.values(), timeout_s=30)
        stop.set()
        for future in callers:
            future.result(timeout=30)  # every call ended: none hangs
        cut = sent.exception(timeout=30)
    assert cut.code() == grpc.StatusCode.UNAVAILABLE and trailer(cut, "x-retry-safe") is None
    wait_until(lambda: any(r["request_id"] == "sent" for r in gw.audit_records()))
    [cut_record] = [r for r in gw.audit_records() if r["request_id"] == "sent"]
    assert (cut_record["code"], cut_record["backend"]["address"]) == ("UNAVAILABLE", mlserver.target)
    assert set(outcomes.values()) <= {"OK", "UNAVAILABLE"}
    records = {r["request_id"]: r for r in gw.audit_records() if r["model"] == "mlp"}
    for request_id, code in outcomes.items():
        record = records[request_id]
        assert record["code"] == code, record
        if code != "OK":
            assert record["backend"]["code"] != "OK", record
            # Safe to retry exactly when nothing was sent.
            assert (retry_safe[request_id] == "true") == (record["backend"]["address"] is None), record
    mlserver.start()
    end = time.monotonic() + 30
    while True:
        try:
            answer = infer(gw, request("mlp", "input", X))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < end
            time.sleep(0.1)
    assert answer.model_version == "2"
    assert last_record(gw, "mlp")["backend"]["code"] == "OK"

"""Execution providers on this CPU-only machine (models.providers): asking for CUDA stops the start with an error
naming the setting, or, with provider_fallback, serves on CPU and says so in the log, the metadata of both APIs
and every record."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
from structlog.testing import capture_logs

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.inference import grpc_service_pb2 as oip
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from gateway.config import ConfigError
from tests.e2e.helpers import TIMEOUT, auth, predict_request, stub

X = np.zeros((1, 784), np.float32)

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="needs an ONNX Runtime without CUDA"
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"models.providers": ["CUDA", "CPU"]},
            r"models\.providers: CUDA not available in this ONNX Runtime \(it offers",
        ),
        (
            {"models.providers_by_model": {"mlp": ["TensorRT"]}},
            r"providers_by_model\.mlp: TensorRT not .*_fallback: true",
        ),
    ],
)
def test_a_provider_asked_for_without_fallback_stops_the_start_naming_the_setting(start_gateway, overrides, message):
    with pytest.raises(ConfigError, match=message):
        start_gateway(overrides=overrides)


def test_with_fallback_the_model_runs_on_cpu_and_metadata_and_records_say_so(start_gateway):
    overrides = {
        "models.providers": ["CUDA", "CPU"],
        "models.provider_options": {"CUDA": {"device_id": 0}},
        "models.provider_fallback": True,
    }
    with capture_logs() as logs:
        gw = start_gateway(overrides=overrides)
    skipped = [e for e in logs if e["event"] == "model_providers_unavailable" and e["model"] == "mlp:2"]
    assert skipped and skipped[0]["unavailable"] == ["CUDA"] and skipped[0]["using"] == ["CPU"]
    loaded = [e for e in logs if e["event"] == "model_version_loaded" and e["model"] == "mlp"]
    assert {e["provider"] for e in loaded} == {"CPU"}

    with gw.channel("alice") as channel:
        md = auth(gw.token())
        stub(channel).Predict(predict_request("mlp", {"input": X}), metadata=md, timeout=TIMEOUT)
        assert gw.audit_records()[-1]["execution_provider"] == "CPU"
        meta = stub(channel).GetModelMetadata(
            pb.GetModelMetadataRequest(model_name="mlp"), metadata=md, timeout=TIMEOUT
        )
        config = oip_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            oip.ModelConfigRequest(name="mlp"), metadata=md, timeout=TIMEOUT
        )
    assert meta.execution_provider == "CPU"
    assert config.config.parameters["execution_provider"].string_value == "CPU"

"""A repository with broken parts: the gateway starts, serves the good models, and refuses the bad ones as missing."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
from structlog.testing import capture_logs

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub

X = np.zeros((1, 784), np.float32)


def break_repository(models: Path) -> None:
    """A corrupt model, a corrupt version beside good ones, a folder that is no version, a stray model file."""
    for folder in (models / "broken" / "1", models / "mlp" / "3"):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"not an onnx model")
    (models / "mlp" / "v4").mkdir()
    (models / "mlp" / "model.onnx").write_bytes((models / "mlp" / "1" / "model.onnx").read_bytes())


def test_gateway_starts_serves_the_good_models_and_refuses_the_broken_as_missing(start_gateway, model_repo):
    break_repository(model_repo)
    with capture_logs() as logs:
        gw = start_gateway(models=model_repo)

    with gw.channel("alice") as channel:
        client, md = stub(channel), auth(gw.token())
        assert client.Predict(predict_request("mlp", {"input": X}), metadata=md, timeout=TIMEOUT).model_version == "2"
        listed = client.ListModels(pb.ListModelsRequest(), metadata=md, timeout=TIMEOUT).models
        assert {m.name: list(m.versions) for m in listed} == {
            "digits": ["1"],
            "iris": ["1"],
            "labels": ["1"],
            "mlp": ["1", "2"],
        }
        for model, version in (("broken", ""), ("mlp", "3"), ("missing", "")):
            request = predict_request(model, {"input": X}, version=version)
            exc = rpc_error(lambda r=request: client.Predict(r, metadata=md, timeout=TIMEOUT))
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            record = gw.audit_records()[-1]
            assert (record["model"], record["code"]) == (model, "NOT_FOUND")
    # bob may see only digits: a broken model is refused to him exactly as a missing one is.
    with gw.channel("bob") as channel:
        client, md = stub(channel), auth(gw.token("bob", bind="bob"))
        refusals = [
            rpc_error(
                lambda m=model: client.GetModelMetadata(
                    pb.GetModelMetadataRequest(model_name=m), metadata=md, timeout=TIMEOUT
                )
            )
            for model in ("broken", "missing")
        ]
    # The same words whether the model failed to load or never was: only the name asked for differs.
    assert [(exc.code(), exc.details().split(" (request id ")[0]) for exc in refusals] == [
        (grpc.StatusCode.PERMISSION_DENIED, f"no rule lets you 'metadata' on model '{model}' (it may not exist)")
        for model in ("broken", "missing")
    ]
    assert [(r["model"], r["code"]) for r in gw.audit_records()[-2:]] == [
        ("broken", "PERMISSION_DENIED"),
        ("missing", "PERMISSION_DENIED"),
    ]

    failed = {(e["model"], e["version"]): e for e in logs if e["event"] == "model_load_failed"}
    assert set(failed) == {("broken", 1), ("mlp", 3)}
    assert failed["broken", 1]["path"] == str(model_repo / "broken" / "1" / "model.onnx")
    assert "cannot load" in failed["broken", 1]["reason"]
    ignored = {e["path"]: e["reason"] for e in logs if e["event"] == "model_entry_ignored"}
    assert set(ignored) == {str(model_repo / "mlp" / "v4"), str(model_repo / "mlp" / "model.onnx")}

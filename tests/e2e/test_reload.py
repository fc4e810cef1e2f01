"""Model repository hot reload under load: add, remove, corrupt versions with no failed request."""

from __future__ import annotations

import shutil
import threading
import weakref

import grpc
import numpy as np
import pytest

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.conftest import wait_until
from tests.e2e.helpers import TIMEOUT, auth, predict_request, stub


class Load:
    """Predicts in a loop from 4 threads and records every outcome."""

    def __init__(self, gw, version: str = "") -> None:
        self.gw, self.version = gw, version
        self.versions_seen: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(4)]

    def _run(self) -> None:
        with self.gw.channel() as channel:
            client, md = stub(channel), auth(self.gw.token())
            request = predict_request("mlp", {"input": np.zeros((1, 784), np.float32)}, version=self.version)
            while not self._stop.is_set():
                try:
                    self.versions_seen.append(client.Predict(request, metadata=md, timeout=TIMEOUT).model_version)
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code()}: {exc.details()}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@pytest.fixture
def gw(start_gateway, model_repo):
    return start_gateway(models=model_repo, overrides={"models.poll_interval_s": 0.05})


def listed(gw) -> dict[str, list[str]]:
    with gw.channel() as channel:
        response = stub(channel).ListModels(pb.ListModelsRequest(), metadata=auth(gw.token()), timeout=TIMEOUT)
    return {m.name: list(m.versions) for m in response.models}


def test_new_version_becomes_default_without_failed_requests(gw, model_repo):
    with Load(gw) as load:
        wait_until(lambda: len(load.versions_seen) > 20)
        staging = model_repo / ".staging"
        shutil.copytree(model_repo / "mlp" / "1", staging)
        staging.rename(model_repo / "mlp" / "3")  # atomic publish, as an operator should
        wait_until(lambda: load.versions_seen[-1:] == ["3"] and load.versions_seen.count("3") > 20)
    assert load.failures == []
    assert listed(gw)["mlp"] == ["1", "2", "3"]


def test_removed_version_is_unloaded_and_default_falls_back(gw, model_repo):
    with Load(gw) as load:
        wait_until(lambda: len(load.versions_seen) > 20)
        shutil.rmtree(model_repo / "mlp" / "2")
        wait_until(lambda: load.versions_seen.count("1") > 20)
    assert load.failures == []
    assert listed(gw)["mlp"] == ["1"]


def test_removed_version_finishes_its_in_flight_call_then_is_unloaded(start_gateway, model_repo):
    # With a one-second batching delay, a lone request waits inside version 2 while the version is removed.
    batching = {"mlp": {"max_batch_size": 8, "max_queue_delay_us": 1_000_000}}
    gw = start_gateway(
        models=model_repo,
        overrides={"models.poll_interval_s": 0.05, "models.batching": batching},
    )
    version_2 = gw.gateway.models.resolve("mlp", 2)
    batcher, unloaded = version_2.batcher, threading.Event()
    weakref.finalize(version_2, unloaded.set)
    del version_2
    x = np.random.default_rng(7).random((1, 784), dtype=np.float32)
    replies: list[pb.PredictResponse] = []

    def call() -> None:
        with gw.channel() as channel:
            request = predict_request("mlp", {"input": x}, version="2")
            replies.append(stub(channel).Predict(request, metadata=auth(gw.token()), timeout=TIMEOUT))

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: batcher.queued == 1)
    shutil.rmtree(model_repo / "mlp" / "2")
    wait_until(lambda: gw.gateway.models.info("mlp").versions == (1,))
    assert batcher.queued == 1 and not unloaded.is_set()  # removed from the repository, still running its call
    caller.join(timeout=TIMEOUT)
    assert [reply.model_version for reply in replies] == ["2"]
    assert unloaded.wait(timeout=TIMEOUT)
    with gw.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        stub(channel).Predict(predict_request("mlp", {"input": x}, version="2"), metadata=auth(gw.token()))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_corrupt_new_version_is_refused_and_previous_keeps_serving(gw, model_repo):
    with Load(gw) as load:
        wait_until(lambda: len(load.versions_seen) > 20)
        staging = model_repo / ".staging"
        staging.mkdir()
        (staging / "model.onnx").write_bytes(b"this is not an onnx model")
        staging.rename(model_repo / "mlp" / "5")
        seen = len(load.versions_seen)
        wait_until(lambda: len(load.versions_seen) > seen + 100)
    assert load.failures == []
    assert set(load.versions_seen) == {"2"}
    assert listed(gw)["mlp"] == ["1", "2"]


def test_version_rewritten_corrupt_keeps_serving_its_last_good_load(gw, model_repo):
    with Load(gw, version="2") as load:
        wait_until(lambda: len(load.versions_seen) > 20)
        staged = model_repo / "mlp" / "2" / "model.onnx.new"
        staged.write_bytes(b"not an onnx model")
        staged.replace(model_repo / "mlp" / "2" / "model.onnx")
        wait_until(lambda: ("mlp", 2) in gw.gateway.models.failures())
        seen = len(load.versions_seen)
        wait_until(lambda: len(load.versions_seen) > seen + 100)
    assert load.failures == []
    assert set(load.versions_seen) == {"2"}
    assert listed(gw)["mlp"] == ["1", "2"]


def test_corrupt_version_is_loaded_once_it_is_repaired(gw, model_repo):
    broken = model_repo / "mlp" / "4"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"garbage")
    gw.gateway.models.rescan()
    assert listed(gw)["mlp"] == ["1", "2"]
    shutil.copy(model_repo / "mlp" / "1" / "model.onnx", broken / "model.onnx.tmp")
    (broken / "model.onnx.tmp").replace(broken / "model.onnx")
    wait_until(lambda: listed(gw)["mlp"] == ["1", "2", "4"])

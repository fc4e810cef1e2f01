"""Dynamic batching with the demo models under ONNX Runtime (no server): results equal unbatched runs, batches
really form under concurrency, and models without a dynamic batch dimension are left unbatched."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import InternalError
from gateway.models.batching import Batcher, BatchingOptions
from gateway.models.runtime import ModelVersion, RuntimeOptions


def load(demo_models: Path, name: str, version: int, batching: BatchingOptions | None) -> ModelVersion:
    options = RuntimeOptions(batching={name: batching} if batching else {})
    return ModelVersion(
        name=name, version=version, path=demo_models / name / str(version) / "model.onnx", options=options
    )


def rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 784), dtype=np.float32)


def run_concurrently(model: ModelVersion, inputs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    results: list[dict[str, np.ndarray] | None] = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def call(index: int) -> None:
        start.wait()
        results[index] = model.run({"input": inputs[index]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def test_concurrent_requests_run_together_and_each_gets_its_own_rows(demo_models: Path) -> None:
    plain = load(demo_models, "mlp", 2, None)
    # A long delay so that all 12 requests join while the first waits: batches of up to 8 rows form for sure.
    batched = load(demo_models, "mlp", 2, BatchingOptions(max_batch_size=8, max_queue_delay_us=500_000))
    assert batched.batcher is not None
    inputs = [rows(1 + i % 3, seed=i) for i in range(12)]  # 1, 2 or 3 rows each: 24 rows in all
    results = run_concurrently(batched, inputs)
    for x, result in zip(inputs, results, strict=True):
        expected = plain.run({"input": x})["output"]
        assert result["output"].shape == expected.shape
        np.testing.assert_allclose(result["output"], expected, rtol=1e-5, atol=1e-6)
    assert batched.batcher.requests_run == 12
    assert batched.batcher.batches_run < 12  # rows were really shared between requests
    assert batched.batcher.batches_run >= 3  # and no batch held more than 8 rows


def test_a_lone_request_waits_at_most_the_queue_delay(demo_models: Path) -> None:
    model = load(demo_models, "mlp", 2, BatchingOptions(max_batch_size=8, max_queue_delay_us=1000))
    x = rows(1, seed=0)
    np.testing.assert_allclose(
        model.run({"input": x})["output"], load(demo_models, "mlp", 2, None).run({"input": x})["output"], rtol=1e-5
    )
    assert model.batcher is not None and model.batcher.batches_run == 1


def test_a_request_as_large_as_a_batch_runs_alone(demo_models: Path) -> None:
    model = load(demo_models, "mlp", 2, BatchingOptions(max_batch_size=4, max_queue_delay_us=500_000))
    assert model.run({"input": rows(4, seed=1)})["output"].shape == (4, 10)
    assert model.batcher is not None and model.batcher.batches_run == 0


def test_model_without_a_dynamic_batch_dimension_is_not_batched(demo_models: Path) -> None:
    # The iris model shipped with onnxruntime has a fixed [3, 2] input and a sequence-of-maps output.
    model = load(demo_models, "iris", 1, BatchingOptions(max_batch_size=8, max_queue_delay_us=100))
    assert model.batcher is None


def test_a_failed_batch_fails_every_request_in_it() -> None:
    def execute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"output": np.zeros((1, 2), np.float32)}  # wrong row count for any batch of two or more

    batcher = Batcher(BatchingOptions(max_batch_size=2, max_queue_delay_us=500_000))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            batcher.run({"input": np.zeros((1, 3), np.float32)}, execute)
        except InternalError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(errors) == 2
    assert errors[0] is not errors[1]
    assert all("batched output 'output'" in e.reason for e in errors)  # type: ignore[attr-defined]


@pytest.mark.parametrize("delay_us", [0, 200])
def test_many_threads_get_exactly_their_results(demo_models: Path, delay_us: int) -> None:
    plain = load(demo_models, "mlp", 1, None)
    batched = load(demo_models, "mlp", 1, BatchingOptions(max_batch_size=16, max_queue_delay_us=delay_us))
    inputs = [rows(1, seed=100 + i) for i in range(48)]
    for x, result in zip(inputs, run_concurrently(batched, inputs), strict=True):
        np.testing.assert_allclose(result["output"], plain.run({"input": x})["output"], rtol=1e-5, atol=1e-6)

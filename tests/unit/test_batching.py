"""Dynamic batching on the event loop with the demo models under ONNX Runtime (no server): results equal
unbatched runs, batches really form under concurrency, and models without a dynamic batch dimension are left
unbatched."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import InternalError
from gateway.models.batching import Batcher, BatchingOptions
from gateway.models.placement import Placement
from gateway.models.runtime import ModelVersion, RuntimeOptions


@pytest.fixture
def placement() -> Iterator[Placement]:
    placement = Placement(threads=2, inline_max_s=0.001)
    yield placement
    placement.close()


def load(
    demo_models: Path, name: str, version: int, batching: BatchingOptions | None, placement: Placement
) -> ModelVersion:
    options = RuntimeOptions(batching={name: batching} if batching else {})
    path = demo_models / name / str(version) / "model.onnx"
    return ModelVersion(name=name, version=version, path=path, options=options, placement=placement)


def rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 784), dtype=np.float32)


async def run_concurrently(model: ModelVersion, inputs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return await asyncio.wait_for(asyncio.gather(*(model.run({"input": x}) for x in inputs)), 30)


async def test_concurrent_requests_run_together_and_each_gets_its_own_rows(demo_models: Path, placement) -> None:
    plain = load(demo_models, "mlp", 2, None, placement)
    # A long delay so that all 12 requests join while the first waits: batches of up to 8 rows form for sure.
    batched = load(demo_models, "mlp", 2, BatchingOptions(max_batch_size=8, max_queue_delay_us=500_000), placement)
    assert batched.batcher is not None
    inputs = [rows(1 + i % 3, seed=i) for i in range(12)]  # 1, 2 or 3 rows each: 24 rows in all
    results = await run_concurrently(batched, inputs)
    for x, result in zip(inputs, results, strict=True):
        expected = plain.execute({"input": x})["output"]
        assert result["output"].shape == expected.shape
        np.testing.assert_allclose(result["output"], expected, rtol=1e-5, atol=1e-6)
    assert batched.batcher.requests_run == 12
    assert batched.batcher.batches_run < 12  # rows were really shared between requests
    assert batched.batcher.batches_run >= 3  # and no batch held more than 8 rows


async def test_a_lone_request_waits_at_most_the_queue_delay(demo_models: Path, placement) -> None:
    model = load(demo_models, "mlp", 2, BatchingOptions(max_batch_size=8, max_queue_delay_us=1000), placement)
    x = rows(1, seed=0)
    expected = load(demo_models, "mlp", 2, None, placement).execute({"input": x})["output"]
    np.testing.assert_allclose((await model.run({"input": x}))["output"], expected, rtol=1e-5)
    assert model.batcher is not None and model.batcher.batches_run == 1


async def test_a_request_as_large_as_a_batch_runs_alone(demo_models: Path, placement) -> None:
    model = load(demo_models, "mlp", 2, BatchingOptions(max_batch_size=4, max_queue_delay_us=500_000), placement)
    assert (await model.run({"input": rows(4, seed=1)}))["output"].shape == (4, 10)
    assert model.batcher is not None and model.batcher.batches_run == 0


def test_model_without_a_dynamic_batch_dimension_is_not_batched(demo_models: Path, placement) -> None:
    # The iris model shipped with onnxruntime has a fixed [3, 2] input and a sequence-of-maps output.
    model = load(demo_models, "iris", 1, BatchingOptions(max_batch_size=8, max_queue_delay_us=100), placement)
    assert model.batcher is None


async def test_a_failed_batch_fails_every_request_in_it() -> None:
    async def execute(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"output": np.zeros((1, 2), np.float32)}  # wrong row count for any batch of two or more

    batcher = Batcher(BatchingOptions(max_batch_size=2, max_queue_delay_us=500_000))
    outcomes = await asyncio.gather(
        *(batcher.run({"input": np.zeros((1, 3), np.float32)}, execute) for _ in range(2)), return_exceptions=True
    )
    assert all(isinstance(e, InternalError) for e in outcomes)
    assert outcomes[0] is not outcomes[1]
    assert all("batched output 'output'" in e.reason for e in outcomes)  # type: ignore[union-attr]


async def test_a_cancelled_request_leaves_the_rest_of_its_batch_served(demo_models: Path, placement) -> None:
    model = load(demo_models, "mlp", 2, BatchingOptions(max_batch_size=8, max_queue_delay_us=200_000), placement)
    inputs = [rows(1, seed=i) for i in range(3)]
    tasks = [asyncio.create_task(model.run({"input": x})) for x in inputs]
    await asyncio.sleep(0.01)  # all three have joined the open batch
    tasks[1].cancel()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert isinstance(done[1], asyncio.CancelledError)
    for index in (0, 2):
        expected = model.execute({"input": inputs[index]})["output"]
        np.testing.assert_allclose(done[index]["output"], expected, rtol=1e-5, atol=1e-6)  # type: ignore[index]
    assert model.batcher is not None and model.batcher.batches_run == 1


@pytest.mark.parametrize("delay_us", [0, 200])
async def test_many_requests_get_exactly_their_results(demo_models: Path, delay_us: int, placement) -> None:
    plain = load(demo_models, "mlp", 1, None, placement)
    batched = load(demo_models, "mlp", 1, BatchingOptions(max_batch_size=16, max_queue_delay_us=delay_us), placement)
    inputs = [rows(1, seed=100 + i) for i in range(48)]
    for x, result in zip(inputs, await run_concurrently(batched, inputs), strict=True):
        np.testing.assert_allclose(result["output"], plain.execute({"input": x})["output"], rtol=1e-5, atol=1e-6)
    assert batched.batcher is not None and batched.batcher.batches_run >= 3  # at most 16 rows a batch

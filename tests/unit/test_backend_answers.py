"""A backend's answer is decoded a step at a time on the event loop (issue 27), as a local model's inputs are: a
large BYTES answer does not hold the loop for the whole decode."""

from __future__ import annotations

import asyncio
import struct

from gateway._pb.inference import grpc_service_pb2 as pb
from gateway.backends.client import BackendClient
from gateway.config import BackendSettings


async def test_a_large_bytes_answer_is_decoded_with_the_loop_serving_others_between_steps():
    client = BackendClient(
        "b",
        BackendSettings(addresses=("127.0.0.1:1",), plaintext=True, models={"m": "m"}),
        max_elements=1_000_000,
        max_bytes_elements=1_000_000,
        metered=False,
    )
    count = 200_000
    answer = pb.ModelInferResponse(model_name="m")
    answer.outputs.add(name="text", datatype="BYTES", shape=[count])
    answer.raw_output_contents.append(b"".join(struct.pack("<I", 2) + b"ab" for _ in range(count)))
    turns = 0

    async def other_call() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.get_running_loop().create_task(other_call())
    await asyncio.sleep(0)
    started = turns
    outputs = await client._outputs(answer)
    other.cancel()
    assert outputs["text"].array.shape == (count,) and outputs["text"].array[-1] == "ab"
    assert turns > started + 1  # the other call ran between the decode's steps

"""The gateway.v1 InferenceService: convert protobuf to an InferRequest, call the pipeline, convert back.

Each method returns its response with the pipeline's outcome (``Answered``), for the call boundary to record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import structlog

from gateway import tensors
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.api.packed import PackedFloats
from gateway.api.streaming import answer_in_order, echoed_id
from gateway.context import Answered, Call, Outcome, current_call
from gateway.errors import GatewayError, InvalidArgumentError, sent_message
from gateway.identifiers import shown
from gateway.models.runtime import TensorSpec
from gateway.pipeline import Bounds, InferBody, InferRequest, InferResult, Pipeline
from gateway.policy import Action

log = structlog.get_logger(__name__)

_INPUT_DATA = PackedFloats(pb.PredictRequest, "input_data")  # the simple form's values, as the raw forms carry them


def to_infer_request(request: pb.PredictRequest) -> InferRequest:
    """A PredictRequest's header fields, and how to read the rest (both forms, named tensors and flat
    ``input_data``, end up in one InferBody); the pipeline reads it only for an authorized caller."""

    def read(bounds: Bounds) -> InferBody:
        if request.inputs and request.input_data:
            raise InvalidArgumentError("send either inputs or input_data, not both")
        inputs: dict[str, tensors.WireTensor] = {}
        for tensor in request.inputs[: bounds.inputs + 1]:
            if tensor.name in inputs:
                raise InvalidArgumentError(f"input '{shown(tensor.name)}' appears twice")
            inputs[tensor.name] = tensors.wire_of(tensor)
        return InferBody(inputs=inputs, flat=_INPUT_DATA(request) if request.input_data else None)

    return InferRequest(
        model=request.model_name, version=request.model_version or None, read=read, id=request.id or None
    )


def to_response(request: pb.PredictRequest, result: InferResult) -> pb.PredictResponse:
    """Encode a result; simple-form requests also get the first output flattened as floats."""
    response = pb.PredictResponse(
        model_name=result.model,
        model_version=str(result.version),
        outputs=[
            pb.Tensor(name=name, datatype=row.enum, shape=result.outputs[name].shape, raw_data=raw)
            for name, (row, raw) in result.raw.items()  # encoded by the pipeline, a step at a time
        ],
        id=request.id,
    )
    if request.input_data and result.outputs:
        first = next(iter(result.outputs.values()))
        response.result.extend(np.asarray(first, dtype=np.float32).ravel().tolist())
    return response


def _specs(specs: tuple[TensorSpec, ...]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=s.name, datatype=tensors.BY_NAME[s.datatype].enum, shape=s.shape) for s in specs]


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Adapter only: every decision is the pipeline's, every error crosses the call boundary as an exception."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> Answered:
        """One inference."""
        result = await self._pipeline.predict(current_call.get(), to_infer_request(request))
        return Answered(to_response(request, result), result.outcome)

    async def PredictStream(
        self, requests: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Answered]:
        """One response per request, in order; a failing message gets its error in-band and its own record."""

        async def answer(call: Call, request: pb.PredictRequest) -> tuple[pb.PredictStreamResponse, Outcome]:
            infer_request = to_infer_request(request)
            result = await self._pipeline.predict(call, infer_request, action=Action.STREAM)
            return pb.PredictStreamResponse(response=to_response(request, result), id=request.id), result.outcome

        stream = current_call.get()

        def refuse(request: pb.PredictRequest, error: GatewayError) -> pb.PredictStreamResponse:
            code = grpc.StatusCode[error.code].value[0]
            return pb.PredictStreamResponse(
                error=pb.StreamError(code=code, message=sent_message(error, stream.request_id)),
                id=echoed_id(request.id),
            )

        async for reply in answer_in_order(stream, requests, answer, refuse):
            yield reply

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> Answered:
        """The models the caller may list."""
        models, outcome = self._pipeline.list_models(current_call.get())
        response = pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=m.name,
                    versions=[str(v) for v in m.versions],
                    default_version="" if m.default_version is None else str(m.default_version),
                )
                for m in models
            ]
        )
        return Answered(response, outcome)

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> Answered:
        """Signature of one model version."""
        call = current_call.get()
        model, versions, outcome = self._pipeline.metadata(call, request.model_name, request.model_version or None)
        response = pb.GetModelMetadataResponse(
            name=model.name,
            version=str(model.version),
            versions=[str(v) for v in versions],
            inputs=_specs(model.inputs),
            outputs=_specs(model.outputs),
            model_digest=model.digest or "",
            execution_provider=model.provider or "",
        )
        return Answered(response, outcome)

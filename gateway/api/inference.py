"""The gateway.v1 InferenceService: convert protobuf to an InferRequest, call the pipeline, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import structlog

from gateway import tensors
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.context import current_call
from gateway.errors import GatewayError, InternalError, InvalidArgumentError
from gateway.identifiers import ID, shown
from gateway.models.runtime import TensorSpec
from gateway.pipeline import InferRequest, InferResult, Pipeline
from gateway.policy import Action

log = structlog.get_logger(__name__)


def to_infer_request(request: pb.PredictRequest, *, max_elements: int) -> InferRequest:
    """Decode a PredictRequest; both forms (named tensors, flat ``input_data``) end up in one InferRequest (whose
    identifiers the pipeline checks)."""
    if request.inputs and request.input_data:
        raise InvalidArgumentError("send either inputs or input_data, not both")
    inputs: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        if tensor.name in inputs:
            raise InvalidArgumentError(f"input '{shown(tensor.name)}' appears twice")
        inputs[tensor.name] = tensors.decode(tensor, max_elements=max_elements)
    flat = None
    if request.input_data:
        tensors.element_count((len(request.input_data),), name="input_data", max_elements=max_elements)
        flat = np.asarray(request.input_data, dtype=np.float32)
    return InferRequest(
        model=request.model_name,
        version=request.model_version or None,
        inputs=inputs,
        flat=flat,
        id=request.id or None,
    )


def to_response(request: pb.PredictRequest, result: InferResult) -> pb.PredictResponse:
    """Encode a result; simple-form requests also get the first output flattened as floats."""
    response = pb.PredictResponse(
        model_name=result.model,
        model_version=str(result.version),
        outputs=tensors.encode_all(result.outputs),
        id=request.id,
    )
    if request.input_data and result.outputs:
        first = next(iter(result.outputs.values()))
        response.result.extend(np.asarray(first, dtype=np.float32).ravel().tolist())
    return response


def _echoed_id(request: pb.PredictRequest) -> str:
    """The message's id for a reply that refuses it: left out when the id itself is malformed (or the reply would
    carry it back, up to the size of the request)."""
    return request.id if ID.allows(request.id) else ""


def _specs(specs: tuple[TensorSpec, ...]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=s.name, datatype=tensors.BY_NAME[s.datatype].enum, shape=s.shape) for s in specs]


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Adapter only: every decision is the pipeline's, every error crosses the call boundary as an exception."""

    def __init__(self, pipeline: Pipeline, *, max_elements: int) -> None:
        self._pipeline = pipeline
        self._max_elements = max_elements

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        """One inference."""
        call = current_call.get()
        result = await self._pipeline.predict(call, to_infer_request(request, max_elements=self._max_elements))
        return to_response(request, result)

    async def PredictStream(
        self, requests: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        """One response per request, in order; a failing message gets its error in-band and its own record."""
        stream = current_call.get()
        stream.action = Action.STREAM.value
        index = 0
        async for request in requests:
            call = stream.for_message(index, bytes_in=request.ByteSize())
            error: GatewayError | None = None
            try:
                result = await self._pipeline.predict(
                    call, to_infer_request(request, max_elements=self._max_elements), action=Action.STREAM
                )
                reply = pb.PredictStreamResponse(response=to_response(request, result), id=request.id)
                stream.check_reply(reply.ByteSize())
            except GatewayError as exc:
                error = exc
            except Exception:
                log.exception("stream_message_failed", request_id=stream.request_id, message_index=index)
                error = InternalError(reason="unexpected error")
            if error is not None:
                code = grpc.StatusCode[error.code].value[0]
                reply = pb.PredictStreamResponse(
                    error=pb.StreamError(code=code, message=error.message), id=_echoed_id(request)
                )
            call.bytes_out = reply.ByteSize()
            stream.model_ran = stream.model_ran or call.model_ran
            # Recorded before the reply leaves; if the record cannot be written the stream ends UNAVAILABLE.
            await stream.record_message(call, error)
            index += 1
            yield reply

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """The models the caller may list."""
        models = self._pipeline.list_models(current_call.get())
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=m.name,
                    versions=[str(v) for v in m.versions],
                    default_version="" if m.default_version is None else str(m.default_version),
                )
                for m in models
            ]
        )

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelMetadataResponse:
        """Signature of one model version."""
        model, versions = self._pipeline.metadata(current_call.get(), request.model_name, request.model_version or None)
        return pb.GetModelMetadataResponse(
            name=model.name,
            version=str(model.version),
            versions=[str(v) for v in versions],
            inputs=_specs(model.inputs),
            outputs=_specs(model.outputs),
        )

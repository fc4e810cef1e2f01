"""The Open Inference Protocol (KServe v2 gRPC, with the Triton RPCs its client calls): convert, call the pipeline.

Stock clients (tritonclient, KServe SDKs, grpcurl, Node) call ``/inference.GRPCInferenceService/<Rpc>``
unmodified. As for gateway.v1, this module only converts: authentication, limits and the audit record are the
call boundary's, authorization and execution the pipeline's. Policy actions: ModelInfer = predict,
ModelStreamInfer = stream, ModelMetadata/ModelConfig/ModelReady = metadata, RepositoryIndex = list; the server-wide
RPCs need an authenticated caller and no model permission.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping

import grpc

from gateway import package_version, tensors
from gateway._pb.inference import grpc_service_pb2 as pb
from gateway._pb.inference import grpc_service_pb2_grpc as pb_grpc
from gateway.api import parameters
from gateway.api.streaming import answer_in_order, echoed_id
from gateway.backends.route import RemoteModel
from gateway.context import Answered, Call, Outcome, carried, current_call
from gateway.errors import GatewayError, InvalidArgumentError, NotFoundError, UnavailableError, sent_message
from gateway.identifiers import shown
from gateway.models.runtime import ModelVersion, TensorSpec
from gateway.pipeline import Bounds, InferBody, InferRequest, InferResult, Pipeline
from gateway.policy import Action

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
SERVER_NAME = "gateway"
# Triton's names for what is served beyond the core protocol: ModelConfig, and RepositoryIndex (read-only).
EXTENSIONS = ("model_configuration", "model_repository")
_CONFIG_DATATYPES = {row.name: f"TYPE_{'STRING' if row.name == 'BYTES' else row.name}" for row in tensors.ROWS}


def to_infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest's header fields, and how to read the rest: inputs from ``raw_input_contents`` (one
    entry per input) or typed contents. The pipeline reads it only for an authorized caller.

    Parameters (gateway.api.parameters): ``binary_data_size`` must be the length of the input's raw contents;
    ``binary_data_output`` and ``binary_data`` are accepted and change nothing (gRPC outputs are always raw, the
    binary form); ``triton_enable_empty_final_response`` marks stream replies final (see ``ModelStreamInfer``)."""

    def read(bounds: Bounds) -> InferBody:
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgumentError(
                f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input, "
                "in order"
            )
        parameters.request_parameters(values(request.parameters))
        inputs: dict[str, tensors.WireTensor] = {}
        for index, tensor in enumerate(request.inputs[: bounds.inputs + 1]):
            name = shown(tensor.name)
            if tensor.name in inputs:
                raise InvalidArgumentError(f"input '{name}' appears twice")
            size = parameters.input_binary_size(values(tensor.parameters), name=name, datatype=tensor.datatype)
            if size is not None and (not raw or size != len(raw[index])):
                held = f"{len(raw[index])} bytes in raw_input_contents" if raw else "no raw_input_contents"
                raise InvalidArgumentError(
                    f"input '{name}': parameter 'binary_data_size' says {size} bytes, the request has {held}"
                )
            row = tensors.BY_NAME.get(tensor.datatype)
            if row is None:
                raise InvalidArgumentError(
                    f"input '{name}': unknown datatype {shown(tensor.datatype)!r} (one of {', '.join(tensors.BY_NAME)})"
                )
            inputs[tensor.name] = tensors.wire_tensor(
                tensor.name,
                row,
                tensor.shape,
                raw=raw[index] if raw else None,
                contents=tensor.contents,
                raw_field="raw_input_contents",
            )
        outputs = request.outputs[: bounds.outputs + 1]
        requested = [output.name for output in outputs]
        for output in outputs:
            parameters.output_binary(values(output.parameters), name=shown(output.name))
        if len(set(requested)) != len(requested):
            raise InvalidArgumentError("an output is requested twice")
        return InferBody(inputs=inputs, outputs=tuple(requested) or None)

    return InferRequest(
        model=request.model_name, version=request.model_version or None, read=read, id=request.id or None
    )


def values(message_parameters: Mapping[str, pb.InferParameter]) -> dict[str, parameters.Value]:
    """Protobuf parameters as plain values (the member set is the type); one without a value is refused."""
    plain: dict[str, parameters.Value] = {}
    for key, parameter in message_parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidArgumentError(f"parameter '{shown(key)}' has no value")
        plain[key] = getattr(parameter, choice)
    return plain


def _asks_final_flag(request: pb.ModelInferRequest) -> bool:
    """The request's ``triton_enable_empty_final_response``, read as ``read`` reads it; False where its parameters
    are refused (the refusal's reply is then unmarked, as for a request without the flag)."""
    try:
        return parameters.request_parameters(values(request.parameters)).final_response_flag
    except InvalidArgumentError:
        return False


def _mark_final(response: pb.ModelInferResponse) -> pb.ModelInferResponse:
    response.parameters[parameters.FINAL_RESPONSE].bool_param = True
    return response


def to_response(request: pb.ModelInferRequest, result: InferResult) -> pb.ModelInferResponse:
    """Outputs as raw contents, one entry per output in order, with datatype and shape (what tritonclient reads)."""
    response = pb.ModelInferResponse(model_name=result.model, model_version=str(result.version), id=request.id)
    for name, array in result.outputs.items():
        row, raw = result.raw[name]  # encoded by the pipeline, a step at a time
        response.outputs.add(name=name, datatype=row.name, shape=array.shape)
        response.raw_output_contents.append(raw)
    return response


def _tensor_metadata(specs: tuple[TensorSpec, ...]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


def to_model_config(model: ModelVersion) -> pb.ModelConfig:
    """What the gateway knows of a model, in Triton's ModelConfig: with batching, dims leave out the batch dim."""
    max_batch_size = model.batcher.options.max_batch_size if model.batcher else 0
    skip = 1 if max_batch_size else 0
    return pb.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=max_batch_size,
        input=[
            pb.ModelInput(name=s.name, data_type=_CONFIG_DATATYPES[s.datatype], dims=s.shape[skip:])
            for s in model.inputs
        ],
        output=[
            pb.ModelOutput(name=s.name, data_type=_CONFIG_DATATYPES[s.datatype], dims=s.shape[skip:])
            for s in model.outputs
        ],
        parameters=_parameters(model),
    )


def _parameters(model: ModelVersion) -> dict[str, pb.ModelParameter]:
    """Triton's free-form model parameters: the loaded bytes' digest and the execution provider."""
    found = {"execution_provider": model.provider}
    if model.digest:
        found["model_digest"] = model.digest
    return {name: pb.ModelParameter(string_value=value) for name, value in found.items()}


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Adapter only: every decision is the pipeline's, every error crosses the call boundary as an exception."""

    def __init__(self, pipeline: Pipeline, *, ready: Callable[[], bool]) -> None:
        """``ready`` says whether the gateway serves inference now (ServerReady)."""
        self._pipeline = pipeline
        self._ready = ready

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """Answering at all is being live."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Ready: models loaded, audit trail writable, not draining."""
        return pb.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """The gateway's name, version and the protocol extensions it serves."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=package_version(), extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Answered:
        """As Triton answers: a model or version that is not loaded is not ready (for a caller who may see it)."""
        try:
            _, outcome = self._pipeline.signature(current_call.get(), request.name, request.version or None)
        except (NotFoundError, UnavailableError) as exc:  # UNAVAILABLE: a routed model whose backend is down
            return Answered(pb.ModelReadyResponse(ready=False), carried(exc))
        return Answered(pb.ModelReadyResponse(ready=True), outcome)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Answered:
        """Signature of one model version; ``versions`` lists those the caller may read metadata of."""
        model, versions, outcome = self._pipeline.metadata(current_call.get(), request.name, request.version or None)
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in versions],
            platform=model.platform if isinstance(model, RemoteModel) else PLATFORM,
            inputs=_tensor_metadata(model.inputs),
            outputs=_tensor_metadata(model.outputs),
        )
        return Answered(response, outcome)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> Answered:
        """Triton's model configuration, as far as the gateway knows it (a routed model's: its backend's, where the
        backend serves ModelConfig)."""
        call = current_call.get()
        model, outcome = self._pipeline.signature(call, request.name, request.version or None)
        if isinstance(model, RemoteModel):
            config, outcome = await self._pipeline.model_config(call, model, outcome)
            return Answered(pb.ModelConfigResponse(config=config), outcome)
        return Answered(pb.ModelConfigResponse(config=to_model_config(model)), outcome)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> Answered:
        """One entry per model version the caller may list; every listed version is loaded, so READY."""
        if request.repository_name:
            raise InvalidArgumentError("this gateway serves one repository: leave repository_name empty")
        models, outcome = self._pipeline.list_models(current_call.get())
        response = pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=m.name, version=str(v), state="READY")
                for m in models
                for v in m.versions or ("",)  # a routed model whose backend names no version
            ]
        )
        return Answered(response, outcome)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Answered:
        """One inference."""
        result = await self._pipeline.predict(current_call.get(), to_infer_request(request))
        return Answered(to_response(request, result), result.outcome)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Answered]:
        """One response per request, in order; a failing request gets ``error_message`` and the stream goes on.

        A request with ``triton_enable_empty_final_response`` true gets its response marked
        ``triton_final_response: true`` (Triton's decoupled-stream flag): every request has exactly one response,
        so it is always the final one and no empty response ever follows."""

        async def answer(call: Call, request: pb.ModelInferRequest) -> tuple[pb.ModelStreamInferResponse, Outcome]:
            infer_request = to_infer_request(request)
            result = await self._pipeline.predict(call, infer_request, action=Action.STREAM)
            response = to_response(request, result)
            reply = pb.ModelStreamInferResponse(
                infer_response=_mark_final(response) if _asks_final_flag(request) else response
            )
            return reply, result.outcome

        stream = current_call.get()

        def refuse(request: pb.ModelInferRequest, error: GatewayError) -> pb.ModelStreamInferResponse:
            # Triton's form: the error as text (the status name first, so clients can tell causes apart).
            response = pb.ModelInferResponse(id=echoed_id(request.id))
            return pb.ModelStreamInferResponse(
                error_message=f"{error.code}: {sent_message(error, stream.request_id)}",
                infer_response=_mark_final(response) if _asks_final_flag(request) else response,
            )

        async for reply in answer_in_order(stream, requests, answer, refuse):
            yield reply

"""MLServer model classes for the backend tests, loaded by MLServer in .venv-mlserver: the demo models through ONNX
Runtime (the MLP, and a text model), and two test models (a slow one, one whose answer is as large as asked)."""

import asyncio
import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse, RequestInput, ResponseOutput
from mlserver.utils import get_model_uri


def _decode(tensor: RequestInput) -> np.ndarray:
    """An input as ONNX Runtime takes it: BYTES elements as str (StringCodec), which its string tensors take."""
    if tensor.datatype == "BYTES":
        return np.array(StringCodec.decode_input(tensor), dtype=object).reshape(tensor.shape)
    return NumpyCodec.decode_input(tensor)


def _encode(name: str, array: np.ndarray) -> ResponseOutput:
    if array.dtype == object:
        return StringCodec.encode_output(name, [str(v) for v in array.ravel()])
    return NumpyCodec.encode_output(name, array)


class OnnxModel(MLModel):
    """The demo models, as the gateway serves them: every input and output a tensor of its ONNX type."""

    async def load(self) -> bool:
        self._session = ort.InferenceSession(await get_model_uri(self.settings), providers=["CPUExecutionProvider"])
        self._outputs = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: _decode(tensor) for tensor in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[_encode(name, result) for name, result in zip(self._outputs, results, strict=True)],
        )


class Sleep(MLModel):
    """Answers its input after sleeping that many seconds; a call cancelled meanwhile is noted in the calls file."""

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        seconds = NumpyCodec.decode_input(payload.inputs[0])
        try:
            await asyncio.sleep(float(seconds.ravel()[0]))
        except asyncio.CancelledError:
            with open(os.environ["OIP_CALLS_FILE"], "a") as calls:
                calls.write("cancelled\n")
            raise
        return InferenceResponse(
            model_name=self.name, model_version=self.version, outputs=[NumpyCodec.encode_output("seconds", seconds)]
        )


class Expand(MLModel):
    """N zeros for an input N: a small request with an answer as large as asked."""

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        count = int(NumpyCodec.decode_input(payload.inputs[0]).ravel()[0])
        zeros = np.zeros(count, dtype=np.float32)
        return InferenceResponse(
            model_name=self.name, model_version=self.version, outputs=[NumpyCodec.encode_output("zeros", zeros)]
        )


class OtherVersion(MLModel):
    """Echoes its input, answering as version 7 whatever version it is: a backend that runs another version than
    the one asked for."""

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        values = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(
            model_name=self.name, model_version="7", outputs=[NumpyCodec.encode_output("x", values)]
        )

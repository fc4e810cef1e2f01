"""One loaded model version: its ONNX Runtime session, its signature, input validation and execution."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from gateway import metrics, tensors
from gateway.errors import InternalError, StartupError
from gateway.models import providers, schema
from gateway.models.batching import Batcher, BatchingOptions
from gateway.models.placement import Placement, RunCost
from gateway.models.providers import ProviderSettings
from gateway.models.schema import TensorSpec

log = structlog.get_logger(__name__)

# A sequence of maps (scikit-learn's ZipMap, e.g. the iris model shipped with onnxruntime) is served as an FP32
# tensor [N, K], columns in ascending key order: the same layout skl2onnx gives with zipmap disabled.
_SEQ_OF_MAPS = re.compile(r"seq\(map\((int64|string),tensor\(float\)\)\)")


def is_sequence_of_maps(onnx_type: str) -> bool:
    """Whether an ONNX Runtime type is a sequence of maps (a classifier's probabilities, served as FP32 -1 x -1)."""
    return _SEQ_OF_MAPS.fullmatch(onnx_type) is not None


class ModelLoadError(StartupError):
    """A model file that cannot be served: ``path`` and a one-line ``reason``; the message names both."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """ONNX Runtime session settings shared by every model version."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    execution_mode: str = "sequential"  # or "parallel": independent graph branches on inter_op_threads
    max_elements: int = 16 * 1024 * 1024
    max_bytes_elements: int = 1024 * 1024  # BYTES tensors: each element becomes a Python str
    batching: Mapping[str, BatchingOptions] = field(default_factory=dict)  # by model name; absent = off
    metered: bool = True  # time each run in the metrics (off where nothing serves them: metrics.recording)
    providers: ProviderSettings = field(default_factory=ProviderSettings)


_UNMETERED = contextlib.nullcontext()


def _dims(shape: list[Any] | None) -> tuple[int, ...]:
    return tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (shape or []))


def _session_options(options: RuntimeOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    # One intra-op thread per session measured 1.5-2x more requests/s under concurrency than ORT's default pool
    # on 2 cores: concurrent calls already supply the parallelism, and the pool's spinning steals their CPU.
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if options.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class ModelVersion(schema.InputChecks):
    """An immutable, thread-safe loaded model version; ORT sessions may be run from many threads at once."""

    def __init__(
        self,
        *,
        name: str,
        version: int,
        path: Path,
        options: RuntimeOptions,
        placement: Placement,
        load_from: Path | None = None,
        digest: str | None = None,
        signed: bool = False,
    ) -> None:
        """``placement`` decides, per run, between the event loop and the model-run pool (placement.py).
        ``load_from``: the file ONNX Runtime reads (the repository's private copy of ``path``); ``digest``: what
        names the version's bytes in records and metadata; ``signed``: its signature verified at load."""
        self.name = name
        self.version = version
        self.path = path
        self.digest = digest
        self.signed = signed
        self.max_elements = options.max_elements
        self.max_bytes_elements = options.max_bytes_elements
        self._session = self._open(load_from or path, options)
        self.inputs = tuple(self._spec(arg, "input") for arg in self._session.get_inputs())
        self.outputs = tuple(self._spec(arg, "output") for arg in self._session.get_outputs())
        self._seq_map_outputs = frozenset(
            arg.name for arg in self._session.get_outputs() if is_sequence_of_maps(arg.type)
        )
        self._output_names = [spec.name for spec in self.outputs]
        self._run_seconds: Any = (
            metrics.MODEL_RUN_SECONDS.labels(model=self.name, version=str(self.version)) if options.metered else None
        )
        self.batcher = self._make_batcher(options.batching.get(name))
        self._placement = placement
        self.cost = RunCost()

    def _open(self, source: Path, options: RuntimeOptions) -> ort.InferenceSession:
        """The session, on the first provider of the model's list that this ONNX Runtime offers and starts;
        ``provider`` says which it got (read back from the session: ONNX Runtime may fall back by itself)."""
        try:
            plan = providers.plan(options.providers, self.name, ort.get_available_providers())
        except providers.ProviderError as exc:
            raise ModelLoadError(self.path, str(exc)) from None
        if plan.unavailable:
            log.warning(
                "model_providers_unavailable",
                model=self.label,
                unavailable=list(plan.unavailable),
                using=[providers.short_name(name) for name in plan.providers],
                setting="models.provider_fallback",
            )
        try:
            session = ort.InferenceSession(
                str(source),
                sess_options=_session_options(options),
                providers=list(plan.providers),
                provider_options=list(plan.options),
            )
        except Exception as exc:  # ORT raises several pybind classes; all mean "this file cannot be served"
            raise ModelLoadError(self.path, f"onnxruntime cannot load it: {_short(exc)}") from None
        asked, got = plan.providers[0], session.get_providers()[0]
        self.provider = providers.short_name(got)
        if got != asked:
            if not options.providers.fallback:
                raise ModelLoadError(
                    self.path,
                    f"ONNX Runtime could not start {providers.short_name(asked)} for it (it ran on {self.provider}); "
                    "set models.provider_fallback: true to accept the next provider",
                )
            log.warning(
                "model_provider_fell_back", model=self.label, asked=providers.short_name(asked), using=self.provider
            )
        return session

    def _spec(self, arg: Any, kind: str) -> TensorSpec:
        row = tensors.BY_ONNX.get(arg.type)
        if row is not None:
            return TensorSpec(arg.name, row.name, _dims(arg.shape))
        if kind == "output" and is_sequence_of_maps(arg.type):
            return TensorSpec(arg.name, "FP32", (-1, -1))
        raise ModelLoadError(
            self.path,
            f"{kind} '{arg.name}' has type {arg.type}, which the gateway does not serve "
            f"(supported: {', '.join(tensors.BY_NAME)} tensors; outputs may also be a sequence of maps)",
        )

    def _make_batcher(self, options: BatchingOptions | None) -> Batcher | None:
        if options is None:
            return None
        batchable = not self._seq_map_outputs and all(spec.shape[:1] == (-1,) for spec in (*self.inputs, *self.outputs))
        if not batchable:
            # A configured option the model cannot honour is said at load, not discovered at request time.
            log.warning("model_batching_unsupported", model=self.label, detail="needs a dynamic first dim everywhere")
            return None
        log.info(
            "model_batching_enabled",
            model=self.label,
            max_batch_size=options.max_batch_size,
            max_queue_delay_us=options.max_queue_delay_us,
        )
        return Batcher(options, on_batch=metrics.BATCH_SIZE.labels(model=self.name).observe)

    @property
    def label(self) -> str:
        """``name:version`` for logs."""
        return f"{self.name}:{self.version}"

    async def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model (batched with concurrent requests when configured); validated inputs only."""
        with self._run_seconds.time() if self._run_seconds is not None else _UNMETERED:
            if self.batcher is not None:
                return await self.batcher.run(inputs, self._run_placed)
            return await self._run_placed(inputs)

    async def _run_placed(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self._placement.run(self.execute, inputs, self.cost)

    def execute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One ONNX Runtime call; a failure inside ORT becomes INTERNAL without its internals."""
        try:
            results = self._session.run(self._output_names, dict(inputs))
        except Exception as exc:
            raise InternalError(reason=f"onnxruntime failed on {self.label}: {_short(exc)}") from None
        outputs: dict[str, np.ndarray] = {}
        for name, value in zip(self._output_names, results, strict=True):
            outputs[name] = _seq_of_maps_to_array(value) if name in self._seq_map_outputs else value
        return outputs


def _seq_of_maps_to_array(rows: list[dict[Any, float]]) -> np.ndarray:
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    keys = sorted(rows[0])
    return np.array([[row[key] for key in keys] for row in rows], dtype=np.float32)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]

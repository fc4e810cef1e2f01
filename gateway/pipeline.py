"""The one path every API calls: authorize, resolve, read and check the request's tensors, decode, run. Never
imports grpc.

Authorization needs the model name from the message, so it lives here rather than in the call boundary, and
every protocol the gateway serves shares it: one place decides. It is decided from the request's header fields
alone (model, version, action): no tensor is read or decoded before, so a refused caller's tensors cost nothing
whatever their size (issue 27). A caller who may not act on a model gets PERMISSION_DENIED whether or not the
model exists (DESIGN.md: a refused caller learns nothing). Before anything else, every identifier of the header
is checked against its grammar (gateway.identifiers), and the input names as soon as they are read, so no malformed
one reaches a record, whoever the caller and whatever the decision.

Facts in, outcome out: each step takes the call's frozen facts (gateway.context.Call) and returns what it learned
(an Outcome: model, versions, decision, inputs as declared, whether the model ran) with its result; an exception
raised once the decision is made carries the outcome so far (``context.carry``). Nothing here records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from gateway import tensors, tracing
from gateway.audit.record import describe_inputs
from gateway.auth.principal import Principal
from gateway.context import Call, Outcome, carry
from gateway.errors import GatewayError, InvalidArgumentError, NotFoundError, PermissionDeniedError
from gateway.identifiers import ID, NAME, shown
from gateway.models.repository import ModelInfo, ModelRepository, parse_version
from gateway.models.runtime import ModelVersion
from gateway.policy import Action, Decision, PolicyStore


@dataclass(frozen=True, slots=True)
class InferBody:
    """What a request holds beyond its header, as the wire gave it (nothing decoded): named tensors (the name ""
    is the unnamed tensor of a one-input model) or the simple flat FP32 form, and the outputs asked for."""

    inputs: dict[str, tensors.WireTensor]
    flat: tensors.WireTensor | None = None
    outputs: tuple[str, ...] | None = None  # the outputs to answer with, in this order; None: all, in model order


@dataclass(frozen=True, slots=True)
class Bounds:
    """How many inputs and outputs the named model has. An adapter reads at most one more of each than these (a
    message may hold millions): the pipeline then refuses the extra one as a duplicate or an unknown name."""

    inputs: int
    outputs: int


@dataclass(frozen=True, slots=True)
class InferRequest:
    """One inference request, whatever protocol it came in: its header fields, read before authorization, and
    ``read``, the protocol's conversion of the rest, called only for an authorized caller of a loaded model."""

    model: str
    version: str | None
    read: Callable[[Bounds], InferBody]
    id: str | None = None  # the caller's id of the message (echoed in the reply)


@dataclass(frozen=True, slots=True)
class InferResult:
    """Outputs by name (model order), each also as its datatype and raw bytes (the form both APIs send), the
    version that ran, and the call's outcome for its record."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    raw: dict[str, tuple[tensors.DataType, bytes]]
    outcome: Outcome


_DEV_ALLOW = Decision(allowed=True, rule_id="dev_no_auth")
_LISTED = Outcome(action=Action.LIST.value, decision="allow")  # a listing shows what the caller may see: no refusal


class Pipeline:
    """Authorization, model resolution, validation and execution, shared by every API."""

    def __init__(
        self,
        *,
        models: ModelRepository,
        policies: PolicyStore | None,
        before_run: Callable[[], None] = lambda: None,
    ) -> None:
        """``policies=None`` is the dev_no_auth mode (everything allowed); ``before_run`` may refuse a run
        (the audit sink's health check: no model runs while its record could not be written)."""
        self.models = models
        self._policies = policies
        self._before_run = before_run
        self.sliced_decodes = 0  # decodes that took more than one step: for tests and measurements

    def _decide(self, principal: Principal | None, model: str, version: str | None, action: Action) -> Decision:
        if self._policies is None:
            return _DEV_ALLOW
        if principal is None:  # unreachable behind the call boundary's authentication; fail closed regardless
            return Decision(allowed=False, rule_id=None)
        return self._policies.current.evaluate(principal, model=model, version=version, action=action)

    def _authorize(self, call: Call, model: str, requested: str | None, action: Action) -> tuple[ModelVersion, Outcome]:
        """Check the names, resolve (so the decision is about the version that will run), decide, then report:
        the version allowed and the outcome so far, or the refusal carrying it. Fields are named as both protocols
        name them (gateway.v1 and the Open Inference Protocol)."""
        NAME.check(model, "model_name")
        if requested is not None:
            NAME.check(requested, "model_version")
        resolved: ModelVersion | NotFoundError
        try:
            resolved = self.models.resolve(model, _parse_version(model, requested))
        except NotFoundError as exc:
            resolved = exc
        version = digest = None
        if isinstance(resolved, ModelVersion):
            version, digest = str(resolved.version), resolved.digest  # recorded even when denied: what was judged
        with tracing.span(call, "gateway.authorize", {"gateway.model": model, "gateway.action": action.value}) as span:
            decision = self._decide(call.principal, model, version or requested, action)
            verdict = "allow" if decision.allowed else "deny"
            if span is not None:
                span.set_attributes({"gateway.decision": verdict, "gateway.rule": decision.rule_id or ""})
        outcome = Outcome(action.value, model, requested, version, digest, verdict, decision.rule_id)
        if not decision.allowed:
            refusal: GatewayError = PermissionDeniedError(reason=decision.reason)
        elif isinstance(resolved, NotFoundError):
            refusal = resolved
        else:
            return resolved, outcome
        carry(refusal, outcome)
        raise refusal

    async def predict(self, call: Call, request: InferRequest, *, action: Action = Action.PREDICT) -> InferResult:
        """Run one inference for an authorized caller: decided on the header, then the body read and checked
        against the model's signature and limits, then decoded (a step at a time), run, and encoded. The result
        carries the outcome; an exception raised once the decision is made carries what was learned so far."""
        if request.id is not None:
            ID.check(request.id, "id")
        model, decided = self._authorize(call, request.model, request.version, action)
        described: tuple[dict[str, Any], ...] = ()
        ran = False
        try:
            body = request.read(Bounds(inputs=len(model.inputs), outputs=len(model.outputs)))
            for name in body.inputs:
                if name:  # "" is the unnamed tensor
                    ID.check(name, "input name")
            wire = _flat_input(model, body.flat) if body.flat is not None else model.name_inputs(body.inputs)
            for tensor in wire.values():  # sizes, limits and lengths agree: nothing decoded yet
                tensors.check(tensor, max_elements=model.max_elements, max_bytes_elements=model.max_bytes_elements)
            described = describe_inputs(wire)
            model.validate(wire)
            _check_outputs(model, body.outputs)
            inputs = await self._decode(wire)
            self._before_run()
            ran = True
            with tracing.span(call, "gateway.infer", {"gateway.model": model.name, "gateway.version": model.version}):
                outputs = await model.run(inputs)
            if body.outputs is not None:
                outputs = {name: outputs[name] for name in body.outputs}
            raw = {name: (await _in_steps(tensors.encode_steps(array)))[0] for name, array in outputs.items()}
        except BaseException as exc:  # cancellations too: their record says what ran
            carry(exc, decided.finished(described, model_ran=ran))
            raise
        return InferResult(request.model, model.version, outputs, raw, decided.finished(described, model_ran=True))

    async def _decode(self, wire: Mapping[str, tensors.WireTensor]) -> dict[str, np.ndarray]:
        """Every input decoded on the loop a step at a time (each about a millisecond at most), the loop serving
        other calls between steps: a large decode delays no one by more than one step (issue 27). Cooperative
        steps rather than a thread, since most of the work holds the GIL (Python objects are made one by one)."""
        inputs: dict[str, np.ndarray] = {}
        for name, tensor in wire.items():
            inputs[name], pauses = await _in_steps(tensors.decode_steps(tensor))
            self.sliced_decodes += pauses > 0
        return inputs

    def signature(self, call: Call, model: str, version: str | None) -> tuple[ModelVersion, Outcome]:
        """The loaded version the caller may read metadata of (its signature and configuration), and the outcome."""
        return self._authorize(call, model, version, Action.METADATA)

    def metadata(self, call: Call, model: str, version: str | None) -> tuple[ModelVersion, list[int], Outcome]:
        """The signature of one version, the versions of the model the caller may read metadata of, the outcome."""
        resolved, outcome = self.signature(call, model, version)
        info = self.models.info(model)
        versions = self._visible_versions(call.principal, info, Action.METADATA) if info else [resolved.version]
        return resolved, versions, outcome

    def list_models(self, call: Call) -> tuple[list[ModelInfo], Outcome]:
        """The models, and their versions, the caller may list, and the outcome."""
        visible = []
        with tracing.span(call, "gateway.authorize", {"gateway.action": Action.LIST.value}):
            for info in self.models.models():
                versions = self._visible_versions(call.principal, info, Action.LIST)
                if versions:
                    # The default is shown only when the caller may use it: a request without a version gets it.
                    default = info.default_version if info.default_version in versions else None
                    visible.append(ModelInfo(info.name, tuple(versions), default))
        return visible, _LISTED

    def _visible_versions(self, principal: Principal | None, info: ModelInfo, action: Action) -> list[int]:
        return [v for v in info.versions if self._decide(principal, info.name, str(v), action).allowed]


T = TypeVar("T")


async def _in_steps(steps: Generator[None, None, T]) -> tuple[T, int]:
    """Run a generator of steps (gateway.tensors) to its end, the loop serving others between two steps; what it
    returns, and how many pauses it took."""
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value, pauses
        pauses += 1
        await asyncio.sleep(0)


def _flat_input(model: ModelVersion, flat: tensors.WireTensor) -> dict[str, tensors.WireTensor]:
    """The simple form's flat FP32 values as the model's one input, shaped by its signature."""
    if flat.values is not None:  # bounded before the shape is worked out (a count past every limit is no shape)
        tensors.element_count((len(flat.values),), name="input_data", max_elements=model.max_elements)
    name, shape = model.flat_input(len(flat.values or ()))
    return {name: replace(flat, shape=shape)}


def _check_outputs(model: ModelVersion, requested: tuple[str, ...] | None) -> None:
    known = {spec.name for spec in model.outputs}
    for name in requested or ():
        if ID.check(name, "output name") not in known:
            raise InvalidArgumentError(
                f"model '{shown(model.name)}' has no output '{shown(name)}' (outputs: {', '.join(sorted(known))})"
            )


def _parse_version(model: str, requested: str | None) -> int | None:
    if requested is None:
        return None
    version = parse_version(requested)
    if version is None:  # "02", "v2": no such version
        raise NotFoundError(f"model '{model}' has no version '{requested}'")
    return version

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
(an Outcome: model, versions, decision, backend exchange, inputs as declared, whether the model ran) with its
result; an exception raised once the decision is made carries the outcome so far (``context.carry``). Nothing
here records.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gateway import tensors, tracing
from gateway.audit.record import describe_inputs
from gateway.auth.principal import Principal
from gateway.backends.route import Backend, Exchange, RemoteModel, Routes
from gateway.context import Call, Outcome, carried, carry
from gateway.errors import GatewayError, InvalidArgumentError, NotFoundError, PermissionDeniedError
from gateway.identifiers import ID, NAME, shown
from gateway.models.repository import ModelInfo, ModelRepository, parse_version
from gateway.models.runtime import ModelVersion
from gateway.policy import Action, Decision, PolicySet, PolicyStore


class InferBody(NamedTuple):
    """What a request holds beyond its header, as the wire gave it (nothing decoded): named tensors (the name ""
    is the unnamed tensor of a one-input model) or the simple flat FP32 form, and the outputs asked for."""

    inputs: dict[str, tensors.WireTensor]
    flat: bytes | None = None  # the simple form's FP32 values, little-endian (gateway.api.packed)
    outputs: tuple[str, ...] | None = None  # the outputs to answer with, in this order; None: all, in model order


class Bounds(NamedTuple):
    """How many inputs and outputs the named model has. An adapter reads at most one more of each than these (a
    message may hold millions): the pipeline then refuses the extra one as a duplicate or an unknown name."""

    inputs: int
    outputs: int


class InferRequest(NamedTuple):
    """One inference request, whatever protocol it came in: its header fields, read before authorization, and
    ``read``, the protocol's conversion of the rest, called only for an authorized caller of a loaded model."""

    model: str
    version: str | None
    read: Callable[[Bounds], InferBody]
    id: str | None = None  # the caller's id of the message (echoed in the reply)


class InferResult(NamedTuple):
    """Outputs by name (model order), each also as its datatype and raw bytes (the form both APIs send), and the
    version that ran, and the call's outcome for its record."""

    model: str
    version: int | str  # a routed model's version is its backend's text
    outputs: dict[str, np.ndarray]
    raw: dict[str, tuple[tensors.DataType, bytes]]
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Listed:
    """A model as a listing shows it: the versions the caller may see and the default, if they may use it."""

    name: str
    versions: tuple[int | str, ...]  # a routed model's version is its backend's text
    default_version: int | str | None


_DEV_ALLOW = Decision(allowed=True, rule_id="dev_no_auth")
_NO_ROUTES = Routes((), {}, ())
_LISTED = Outcome(action=Action.LIST.value, decision="allow")  # a listing shows what the caller may see: no refusal
_RUNS = (Action.PREDICT, Action.STREAM)
_FP32 = tensors.BY_NAME["FP32"]
_ALLOWED_SIZE = 4096  # entries remembered at most (then forgotten all at once, as the policies' own cache)


@dataclass(frozen=True, slots=True)
class _Allowed:
    """An allowed call's resolution and outcome, valid under ``policies`` and the models' ``generation``. The model
    version is held weakly: an unloaded one is not kept alive by what was decided about it."""

    policies: PolicySet | None
    generation: int
    served: weakref.ReferenceType[ModelVersion]
    outcome: Outcome


Served = ModelVersion | RemoteModel  # a model run here, or one routed to a remote backend (gateway.backends)


def _version_of(resolved: Served | GatewayError, requested: str | None) -> str | None:
    """The version a policy judges: the one that will run (a routed model's: the one the backend is asked to run,
    None where it advertises none: an unknown version, which every deny rule naming versions matches), else the
    one asked for."""
    if isinstance(resolved, ModelVersion):
        return str(resolved.version)
    if isinstance(resolved, RemoteModel):
        version = resolved.resolve(requested)
        return None if isinstance(version, NotFoundError) else version
    return requested


class Pipeline:
    """Authorization, model resolution, validation and execution, shared by every API."""

    def __init__(
        self,
        *,
        models: ModelRepository,
        policies: PolicyStore | None,
        before_run: Callable[[], None] = lambda: None,
        routes: Routes = _NO_ROUTES,
    ) -> None:
        """``policies=None`` is the dev_no_auth mode (everything allowed); ``before_run`` may refuse a run
        (the audit sink's health check: no model runs while its record could not be written); ``routes``: the
        models served by remote backends (gateway.backends), through this same path."""
        self.models = models
        self.routes = routes
        self._policies = policies
        self._before_run = before_run
        self.sliced_decodes = 0  # decodes that took more than one step: for tests and measurements
        # Calls allowed, by (principal, model, version asked for, action): the model version resolved and the
        # outcome, while the policies and the loaded models are those they were decided with (_authorize).
        self._allowed: dict[tuple[Principal | None, str, str | None, Action], _Allowed] = {}

    def _policy_set(self) -> PolicySet | None:
        """The policies to decide with now (None: the dev_no_auth mode); read once per answer, so that one answer
        is decided by one set whatever a reload does meanwhile."""
        return self._policies.current if self._policies is not None else None

    def _decide(
        self, policies: PolicySet | None, principal: Principal | None, model: str, version: str | None, action: Action
    ) -> Decision:
        if policies is None:  # the dev_no_auth mode
            return _DEV_ALLOW
        if principal is None:  # unreachable behind the call boundary's authentication; fail closed regardless
            return Decision(allowed=False, rule_id=None)
        return policies.evaluate(principal, model=model, version=version, action=action)

    def _backend_for(self, model: str) -> Backend | None:
        """The backend a model is routed to: explicit routes first, then the local repository, then the names a
        backend's patterns found. Only what is cached is read: nothing is sent anywhere."""
        backend = self.routes.explicit(model)
        if backend is None and self.models.info(model) is None:
            backend = self.routes.discovered(model)
        return backend

    def _authorize(self, call: Call, model: str, requested: str | None, action: Action) -> tuple[Served, Outcome]:
        """Check the names, resolve (so the decision is about the version that will run), decide, then report:
        the model allowed and the outcome so far, or the refusal carrying it. Fields are named as both protocols
        name them (gateway.v1 and the Open Inference Protocol). A routed model is decided on the gateway's name and
        the backend's version, before anything is sent to it."""
        NAME.check(model, "model_name")
        if requested is not None:
            NAME.check(requested, "model_version")
        backend = self._backend_for(model)
        # Read once, before anything is decided: an entry made while either changes is never found again.
        policies = self._policy_set()
        generation = self.models.generation
        asked = (call.principal, model, requested, action)
        # Only a local model's untraced call (a traced one makes its span here) is remembered, or looked up.
        rememberable = backend is None and call.trace is None
        allowed = self._allowed.get(asked) if rememberable else None
        if allowed is not None and allowed.policies is policies and allowed.generation == generation:
            served = allowed.served()
            if served is not None:
                return served, allowed.outcome
        resolved: Served | GatewayError
        reason, fallback, exchanged = None, None, None
        if backend is not None:
            resolved = backend.model(model)  # as last described: nothing is sent before the decision
            runs = resolved.resolve(requested) if isinstance(resolved, RemoteModel) else None
            if isinstance(runs, NotFoundError):  # a version the backend does not advertise: it never sees it
                resolved = runs
            exchanged = Exchange(backend.name).record()
        else:
            # Only calls that run a model take part in a canary (metadata describes the default); the call's own
            # draw, not the caller's request id, keeps a call, and a stream's messages, on one version.
            key = call.route_key if action in _RUNS else None
            try:
                resolved, reason, fallback = self.models.route(model, _parse_version(model, requested), key=key)
            except NotFoundError as exc:
                resolved = exc
        with tracing.span(call, "gateway.authorize", {"gateway.model": model, "gateway.action": action.value}) as span:
            decision = self._decide(policies, call.principal, model, _version_of(resolved, requested), action)
            if not decision.allowed and fallback is not None:
                # A canary never turns an allowed call into a denied one: a caller who may not use the canary
                # version gets the version it would have had without the canary, if the policy allows that.
                # Denied both, the call is refused for the canary: its version, reason and rule, as one decision.
                fallen_back, fallback_reason = fallback
                instead = self._decide(policies, call.principal, model, str(fallen_back.version), action)
                if instead.allowed:
                    resolved, reason, decision = fallen_back, fallback_reason, instead
            verdict = "allow" if decision.allowed else "deny"
            if span is not None:
                span.set_attributes({"gateway.decision": verdict, "gateway.rule": decision.rule_id or ""})
        version = digest = provider = why = None
        if isinstance(resolved, ModelVersion):  # recorded even when denied: the version the policy judged
            version, digest, provider = str(resolved.version), resolved.digest, resolved.provider
            why = reason.value if reason else None
        elif isinstance(resolved, RemoteModel):
            version = _version_of(resolved, requested)
        outcome = Outcome(
            action=action.value,
            model=model,
            requested_version=requested,
            version=version,
            model_digest=digest,
            execution_provider=provider,
            version_reason=why,
            decision=verdict,
            rule=decision.rule_id,
            backend=exchanged,
        )
        if not decision.allowed:
            refusal: GatewayError = PermissionDeniedError(_denied(action, model, requested), reason=decision.reason)
        elif isinstance(resolved, GatewayError):
            refusal = resolved
        else:
            # Remembered where nothing but the names, the policies and the loaded models decided it: not for a
            # call whose draw may place it (a canary).
            if (
                rememberable
                and isinstance(resolved, ModelVersion)
                and (requested is not None or not self.models.drawn(model))
            ):
                if len(self._allowed) >= _ALLOWED_SIZE:
                    self._allowed.clear()
                self._allowed[asked] = _Allowed(policies, generation, weakref.ref(resolved), outcome)
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
            wire = _named_inputs(model, body)
            described = describe_inputs(wire)
            if body.flat is None:  # the flat form's one input is shaped by the signature itself (_flat_input)
                model.validate(wire)
            _check_outputs(model, body.outputs)
            if isinstance(model, RemoteModel):
                return await self._predict_remote(call, request, model, wire, body.outputs, decided, described)
            inputs = await self._decode(wire)
            self._before_run()
            ran = True
            with tracing.span(call, "gateway.infer", {"gateway.model": model.name, "gateway.version": model.version}):
                outputs = await model.run(inputs)
            if body.outputs is not None:
                outputs = {name: outputs[name] for name in body.outputs}
            raw = {name: (await tensors.in_steps(tensors.encode_steps(array)))[0] for name, array in outputs.items()}
        except BaseException as exc:  # cancellations too: their record says what ran
            carry(exc, carried(exc, decided.finished(described, model_ran=ran)))
            raise
        return InferResult(request.model, model.version, outputs, raw, decided.finished(described, model_ran=True))

    async def _predict_remote(
        self,
        call: Call,
        request: InferRequest,
        model: RemoteModel,
        wire: Mapping[str, tensors.WireTensor],
        outputs: tuple[str, ...] | None,
        decided: Outcome,
        described: tuple[dict[str, Any], ...],
    ) -> InferResult:
        """Send the checked inputs, raw as they came, to the model's backend; its exchange goes into the outcome
        whatever happens (a cancelled caller cancels the backend call with this task)."""
        backend = self.routes.backend(model.backend)
        self._before_run()
        exchange = Exchange(backend.name)
        attributes = {"gateway.backend": backend.name, "gateway.model": model.name}
        try:
            with tracing.span(call, "gateway.backend", attributes) as span:
                answer = await backend.infer(
                    model,
                    wire,
                    version=_version_of(model, request.version),  # exactly the version the policy judged
                    outputs=outputs,
                    request_id=call.request_id,
                    headers=tracing.propagation_headers(span),
                    exchange=exchange,
                )
        except BaseException as exc:
            carry(exc, _exchanged(decided, exchange, described))
            raise
        return InferResult(
            request.model,
            exchange.version or model.version,
            {name: output.array for name, output in answer.items()},
            {name: (output.row, output.raw) for name, output in answer.items()},
            _exchanged(decided, exchange, described),
        )

    async def model_config(self, call: Call, model: RemoteModel, decided: Outcome) -> tuple[Any, Outcome]:
        """A routed model's configuration as its backend gives it (inference.ModelConfig), for a caller already
        allowed its metadata (``signature``, whose outcome is ``decided``), and the outcome with the exchange."""
        backend = self.routes.backend(model.backend)
        exchange = Exchange(backend.name)
        try:
            version = _version_of(model, decided.requested_version)
            config = await backend.config(model, version=version, request_id=call.request_id, exchange=exchange)
        except BaseException as exc:
            carry(exc, decided._replace(backend=exchange.record()))
            raise
        return config, decided._replace(backend=exchange.record())

    async def _decode(self, wire: Mapping[str, tensors.WireTensor]) -> dict[str, np.ndarray]:
        """Every input decoded on the loop a step at a time (each about a millisecond at most), the loop serving
        other calls between steps: a large decode delays no one by more than one step (issue 27). Cooperative
        steps rather than a thread, since most of the work holds the GIL (Python objects are made one by one)."""
        inputs: dict[str, np.ndarray] = {}
        for name, tensor in wire.items():
            inputs[name], pauses = await tensors.in_steps(tensors.decode_steps(tensor))
            self.sliced_decodes += pauses > 0
        return inputs

    def signature(self, call: Call, model: str, version: str | None) -> tuple[Served, Outcome]:
        """The loaded version the caller may read metadata of (its signature and configuration), and the outcome."""
        return self._authorize(call, model, version, Action.METADATA)

    def metadata(self, call: Call, model: str, version: str | None) -> tuple[Served, list[int | str], Outcome]:
        """The signature of one version, the versions of the model the caller may read metadata of, the outcome."""
        resolved, outcome = self.signature(call, model, version)
        policies = self._policy_set()
        if isinstance(resolved, RemoteModel):
            seen = [
                v
                for v in resolved.versions
                if self._decide(policies, call.principal, model, v, Action.METADATA).allowed
            ]
            return resolved, list(seen), outcome
        info = self.models.info(model)
        versions = (
            self._visible_versions(policies, call.principal, info, Action.METADATA) if info else [resolved.version]
        )
        return resolved, list(versions), outcome

    def list_models(self, call: Call) -> tuple[list[Listed], Outcome]:
        """The models, and their versions, the caller may list, and the outcome."""
        visible: list[Listed] = []
        policies = self._policy_set()
        with tracing.span(call, "gateway.authorize", {"gateway.action": Action.LIST.value}):
            for info in self.models.models():
                versions = self._visible_versions(policies, call.principal, info, Action.LIST)
                if versions:
                    # The default is shown only when the caller may use it: a request without a version gets it.
                    default = info.default_version if info.default_version in versions else None
                    visible.append(Listed(info.name, tuple(versions), default))
            for remote in self.routes.models():
                if self._backend_for(remote.name) is not self.routes.backend(remote.backend):
                    continue  # a pattern's name also served locally: the local model is the one listed
                if not remote.versions:  # an unknown version: listed where no rule naming versions denies it
                    if self._decide(policies, call.principal, remote.name, None, Action.LIST).allowed:
                        visible.append(Listed(remote.name, (), None))
                    continue
                seen = tuple(
                    v
                    for v in remote.versions
                    if self._decide(policies, call.principal, remote.name, v, Action.LIST).allowed
                )
                if seen:
                    visible.append(Listed(remote.name, seen, remote.version if remote.version in seen else None))
        return sorted(visible, key=lambda info: info.name), _LISTED

    def _visible_versions(
        self, policies: PolicySet | None, principal: Principal | None, info: ModelInfo, action: Action
    ) -> list[int]:
        return [v for v in info.versions if self._decide(policies, principal, info.name, str(v), action).allowed]


def _denied(action: Action, model: str, requested: str | None) -> str:
    """What a denied caller is told: only what it asked for, the same whether or not the model (or version) exists
    and whichever rule decided, so that a refusal tells nothing about the repository or the policy."""
    version = "" if requested is None else f" version '{requested}'"
    return f"no rule lets you '{action.value}' on model '{model}'{version} (it may not exist)"


def _named_inputs(model: Served, body: InferBody) -> dict[str, tensors.WireTensor]:
    """The body's inputs named and held to the limits: sizes, limits and lengths agree, nothing decoded yet."""
    for name in body.inputs:
        if name:  # "" is the unnamed tensor
            ID.check(name, "input name")
    if body.flat is not None:
        return _flat_input(model, body.flat)
    wire = model.name_inputs(body.inputs)
    for tensor in wire.values():
        tensors.check(tensor, max_elements=model.max_elements, max_bytes_elements=model.max_bytes_elements)
    return wire


def _exchanged(decided: Outcome, exchange: Exchange, described: tuple[dict[str, Any], ...]) -> Outcome:
    """The outcome of a routed call: its backend exchange, the version that answered, and whether anything was sent
    (a refusal before that is safe to retry)."""
    return decided._replace(
        version=exchange.version or decided.version,
        backend=exchange.record(),
        inputs=described,
        model_ran=exchange.sent,
    )


def _flat_input(model: Served, flat: bytes) -> dict[str, tensors.WireTensor]:
    """The simple form's flat FP32 values as the model's one input, shaped by its signature: checked against it and
    the limits here, by construction (what ``tensors.check`` and ``validate`` check of other tensors)."""
    size, rest = divmod(len(flat), _FP32.dtype.itemsize)
    if rest:  # a packed repeated float never has one; refused rather than cut
        raise InvalidArgumentError(f"input_data has {len(flat)} bytes, not a whole number of FP32 values")
    # Bounded before the shape is worked out: a count past every limit is no shape.
    tensors.element_count((size,), name="input_data", max_elements=model.max_elements)
    name, shape = model.flat_input(size)
    return {name: tensors.WireTensor("input_data", _FP32, shape, flat, None, raw_field="input_data")}


def _check_outputs(model: Served, requested: tuple[str, ...] | None) -> None:
    if not requested:
        return
    known = {spec.name for spec in model.outputs}
    for name in requested:
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

"""Authorization policies: load and strictly validate ``*.yaml`` rule files, evaluate, and reload on change.

Deny by default and fail closed: a deny rule overrides every allow, no matching allow means deny, and a file
that does not validate is refused whole (at start: a startup error; on reload: the previous set stays).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import structlog

from gateway.auth.principal import Principal, identity_spelling_problem
from gateway.document import DocumentError, did_you_mean, read_yaml
from gateway.errors import StartupError
from gateway.watcher import Fingerprint, ReloadingStore, tree_fingerprint

__all__ = [
    "Action",
    "Decision",
    "Effect",
    "GlobSet",
    "PolicyError",
    "PolicySet",
    "PolicyStore",
    "PrincipalMatcher",
    "Rule",
    "load_policies",
]

log = structlog.get_logger(__name__)

FILE_PATTERNS = ("*.yaml", "*.yml")
CACHE_MAX_ENTRIES = 10_000
# Model names come from requests: longer keys are evaluated but not cached, so callers cannot fill memory.
_CACHE_MAX_KEY_CHARS = 256

_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_GLOB_CHARS = frozenset("*?[")
_RULE_KEYS = ("id", "effect", "description", "principals", "models", "versions", "actions")
_REQUIRED_KEYS = ("id", "effect", "principals", "models", "actions")
_PRINCIPAL_LIST_KEYS = ("cert", "subjects", "groups", "scopes")
_PRINCIPAL_KEYS = (*_PRINCIPAL_LIST_KEYS, "bound_token")


class PolicyError(StartupError):
    """A policy directory or file that cannot be loaded; the message names the file, the rule and the key."""


class Action(StrEnum):
    """What a caller does to a model."""

    PREDICT = "predict"
    STREAM = "stream"
    METADATA = "metadata"
    LIST = "list"


class Effect(StrEnum):
    """What a matching rule decides."""

    ALLOW = "allow"
    DENY = "deny"


_ACTIONS = frozenset(action.value for action in Action)
_EFFECTS = frozenset(effect.value for effect in Effect)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one evaluation and the rule that decided it (None: no rule allowed)."""

    allowed: bool
    rule_id: str | None

    def __post_init__(self) -> None:
        # An allow must always be attributable to a rule in the audit trail.
        if self.allowed and self.rule_id is None:
            raise ValueError("an allow decision must name its rule")

    @property
    def reason(self) -> str:
        """Short reason for logs and the audit record: ``rule <id>`` or ``default deny``."""
        return "default deny" if self.rule_id is None else f"rule {self.rule_id}"

    def explain(self) -> str:
        """One line for people: ``allow by rule X``, ``deny by rule Y`` or ``deny (default deny: no rule allows)``."""
        if self.rule_id is None:
            return "deny (default deny: no rule allows)"
        return f"{'allow' if self.allowed else 'deny'} by rule {self.rule_id}"


@dataclass(frozen=True, slots=True)
class GlobSet:
    """Shell-style patterns (``fnmatch.fnmatchcase`` semantics), compiled once; literals are compared directly."""

    literals: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> GlobSet:
        """Compile patterns; each must be a non-empty string."""
        literals: set[str] = set()
        compiled: list[re.Pattern[str]] = []
        for pattern in patterns:
            if not pattern:
                raise ValueError("empty pattern")
            if _GLOB_CHARS.isdisjoint(pattern):
                literals.add(pattern)
            else:
                compiled.append(re.compile(fnmatch.translate(pattern)))
        return cls(frozenset(literals), tuple(compiled))

    def match(self, value: str) -> bool:
        """Whether ``value`` matches any pattern. An empty value matches nothing, not even ``*``."""
        if not value:
            return False
        return value in self.literals or any(p.match(value) for p in self.patterns)

    def match_any(self, values: Iterable[str]) -> bool:
        """Whether any of ``values`` matches any pattern."""
        return any(self.match(value) for value in values)


@dataclass(frozen=True, slots=True)
class PrincipalMatcher:
    """Who a rule is about: every key given must match (AND); within a key, any pattern may (OR)."""

    cert: GlobSet | None = None
    subjects: GlobSet | None = None
    groups: GlobSet | None = None
    scopes: GlobSet | None = None
    bound_token: bool | None = None

    def matches(self, principal: Principal) -> bool:
        """Whether the principal satisfies every constraint given."""
        return (
            (self.bound_token is None or principal.token_bound is self.bound_token)
            and (self.cert is None or self.cert.match(principal.cert_identity))
            and (self.subjects is None or self.subjects.match(principal.subject))
            and (self.groups is None or self.groups.match_any(principal.groups))
            and (self.scopes is None or self.scopes.match_any(principal.scopes))
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule. ``None`` in principals, versions or actions is the explicit ``"*"``."""

    id: str
    effect: Effect
    principals: PrincipalMatcher | None
    models: GlobSet
    versions: frozenset[str] | None
    actions: frozenset[Action] | None
    source: str = ""
    description: str = ""

    def matches(self, principal: Principal, *, model: str, version: str | None, action: Action) -> bool:
        """Whether this rule applies; ``version`` is canonical decimal, or None when unknown. Fail closed: an
        unknown version (a routed model whose backend reports none) matches every deny rule naming versions, and no
        allow rule naming versions."""
        if version is None:
            versions_match = self.versions is None or self.effect is Effect.DENY
        else:
            versions_match = self.versions is None or version in self.versions
        return (
            (self.actions is None or action in self.actions)
            and versions_match
            and self.models.match(model)
            and (self.principals is None or self.principals.matches(principal))
        )


_CacheKey = tuple[Principal, str, str | None, str]


class PolicySet:
    """An immutable set of rules in file order, with a bounded per-set decision cache."""

    __slots__ = ("_allows", "_cache", "_denies", "_files", "_rules")

    def __init__(self, rules: Iterable[Rule] = (), *, files: Iterable[str] = ()) -> None:
        self._rules = tuple(rules)
        self._files = tuple(files)
        ids: set[str] = set()
        for rule in self._rules:
            if rule.id in ids:
                raise ValueError(f"duplicate rule id {rule.id!r}")
            ids.add(rule.id)
        self._denies = tuple(rule for rule in self._rules if rule.effect is Effect.DENY)
        self._allows = tuple(rule for rule in self._rules if rule.effect is Effect.ALLOW)
        # Readers share this dict without a lock: single get/set/clear calls are atomic under the GIL, and
        # the worst a race can do is compute a decision twice.
        self._cache: dict[_CacheKey, Decision] = {}

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every rule, in file order (files sorted by name)."""
        return self._rules

    @property
    def files(self) -> tuple[str, ...]:
        """The files the rules came from, sorted by name."""
        return self._files

    @property
    def rule_count(self) -> int:
        """How many rules the set holds."""
        return len(self._rules)

    def __repr__(self) -> str:
        return f"PolicySet(files={len(self._files)}, rules={len(self._rules)})"

    def evaluate(self, principal: Principal, *, model: str, version: str | None, action: Action) -> Decision:
        """Decide whether ``principal`` may perform ``action`` on ``model`` at ``version`` (None: unknown)."""
        version = _canonical_version(version)
        key = (principal, model, version, action)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        decision = self._decide(principal, model, version, action)
        if len(model) + len(version or "") <= _CACHE_MAX_KEY_CHARS:
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = decision
        return decision

    def _decide(self, principal: Principal, model: str, version: str | None, action: Action) -> Decision:
        for rule in self._denies:
            if rule.matches(principal, model=model, version=version, action=action):
                return Decision(allowed=False, rule_id=rule.id)
        for rule in self._allows:
            if rule.matches(principal, model=model, version=version, action=action):
                return Decision(allowed=True, rule_id=rule.id)
        return Decision(allowed=False, rule_id=None)


def _canonical_version(version: str | None) -> str | None:
    """``"007"`` and ``"7"`` name the same model version; anything not all ASCII digits is left as is."""
    if version is not None and version.isascii() and version.isdigit():
        return version.lstrip("0") or "0"
    return version


# --- loading ---------------------------------------------------------------------------------------------


def load_policies(directory: str | os.PathLike[str]) -> PolicySet:
    """Load and validate every ``*.yaml``/``*.yml`` file of ``directory``; raises PolicyError."""
    root = Path(directory)
    if not root.is_dir():
        raise PolicyError(f"{root}: not a directory")
    try:
        with os.scandir(root) as entries:
            names = sorted(entry.name for entry in entries if entry.name.endswith((".yaml", ".yml")))
    except OSError as exc:
        raise PolicyError(f"{root}: cannot list: {exc.strerror or exc}") from exc
    rules: list[Rule] = []
    defined_in: dict[str, str] = {}
    files: list[str] = []
    for name in names:
        path = root / name
        source = str(path)
        # A broken link or a directory where a rule file should be is refused: silently skipping it could
        # drop a deny rule.
        if not path.is_file():
            raise PolicyError(f"{source}: not a regular file (a directory or a broken link)")
        try:
            document = read_yaml(path)
        except DocumentError as exc:
            raise PolicyError(str(exc)) from None
        for rule in _parse_file(source, document):
            if rule.id in defined_in:
                raise PolicyError(f"{source}: rule {rule.id!r}: duplicate id, also defined in {defined_in[rule.id]}")
            defined_in[rule.id] = source
            rules.append(rule)
        files.append(source)
    if not files:
        log.warning("policy_directory_empty", directory=str(root), effect="every request is denied")
    return PolicySet(rules, files=files)


class _Invalid(Exception):
    """A problem inside one rule, at a key path; the caller adds the file and the rule."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)


def _parse_file(source: str, document: object) -> list[Rule]:
    if document is None:
        raise PolicyError(f"{source}: empty; expected a mapping with a 'rules' list")
    if not isinstance(document, dict):
        raise PolicyError(f"{source}: expected a mapping with a 'rules' list, got {_kind(document)}")
    for key in document:
        if key != "rules":
            raise PolicyError(f"{source}: unknown top-level key {key!r}{did_you_mean(key, ('rules',))}")
    if "rules" not in document:
        raise PolicyError(f"{source}: missing key 'rules'")
    raw_rules = document["rules"]
    if not isinstance(raw_rules, list):
        raise PolicyError(f"{source}: rules: must be a list of rules, got {_kind(raw_rules)}")
    rules = []
    for position, raw in enumerate(raw_rules, start=1):
        label = f"rule #{position}"
        if isinstance(raw, dict) and isinstance(raw.get("id"), str) and _RULE_ID.fullmatch(raw["id"]):
            label = f"rule {raw['id']!r}"
        try:
            rules.append(_parse_rule(raw, source))
        except _Invalid as exc:
            raise PolicyError(f"{source}: {label}: {exc}") from None
    return rules


def _parse_rule(raw: object, source: str) -> Rule:
    if not isinstance(raw, dict):
        raise _Invalid("", f"must be a mapping, got {_kind(raw)}")
    for key in raw:
        if key not in _RULE_KEYS:
            raise _Invalid("", f"unknown key {key!r}{did_you_mean(key, _RULE_KEYS)}")
    for key in _REQUIRED_KEYS:
        if key not in raw:
            raise _Invalid("", f"missing key {key!r}")
    rule_id = raw["id"]
    if not isinstance(rule_id, str) or not _RULE_ID.fullmatch(rule_id):
        raise _Invalid("id", "must be a string of letters, digits, '.', '_', ':' or '-' (at most 128)")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _Invalid("description", f"must be a string, got {_kind(description)}")
    return Rule(
        id=rule_id,
        effect=_parse_effect(raw["effect"]),
        principals=_parse_principals(raw["principals"]),
        models=_parse_globs("models", raw["models"]),
        versions=_parse_versions(raw.get("versions", "*")),
        actions=_parse_actions(raw["actions"]),
        source=source,
        description=description,
    )


def _parse_effect(value: object) -> Effect:
    if isinstance(value, str) and value in _EFFECTS:
        return Effect(value)
    raise _Invalid("effect", f"must be 'allow' or 'deny', got {_show(value)}")


def _parse_principals(value: object) -> PrincipalMatcher | None:
    if value == "*":
        return None
    if not isinstance(value, dict):
        raise _Invalid("principals", f"must be '*' or a mapping of {', '.join(_PRINCIPAL_KEYS)}; got {_kind(value)}")
    if not value:
        # Istio reads an empty source as "anyone"; here "anyone" must be written as '*'.
        raise _Invalid("principals", "empty mapping; write '*' for any authenticated caller")
    for key in value:
        if key not in _PRINCIPAL_KEYS:
            raise _Invalid("principals", f"unknown key {key!r}{did_you_mean(key, _PRINCIPAL_KEYS)}")
    globs = {key: _parse_globs(f"principals.{key}", value[key]) for key in _PRINCIPAL_LIST_KEYS if key in value}
    if "cert" in value:
        _check_cert_patterns(value["cert"])
    bound_token = value.get("bound_token")
    if "bound_token" in value and not isinstance(bound_token, bool):
        raise _Invalid("principals.bound_token", f"must be true or false, got {_show(bound_token)}")
    return PrincipalMatcher(
        cert=globs.get("cert"),
        subjects=globs.get("subjects"),
        groups=globs.get("groups"),
        scopes=globs.get("scopes"),
        bound_token=bound_token,
    )


def _check_cert_patterns(patterns: list[str]) -> None:
    """Each pattern names its identity type, so it matches identities of that type only: a CN or DNS name can never
    pass for a URI SAN. A pattern without one used to match DNS SANs and CNs; silently matching nothing instead
    would disarm a deny rule, so it is refused."""
    for index, pattern in enumerate(patterns):
        problem = identity_spelling_problem(pattern)
        if problem is not None:
            raise _Invalid(f"principals.cert[{index}]", problem)


def _parse_globs(path: str, value: object) -> GlobSet:
    if not isinstance(value, list):
        raise _Invalid(path, f"must be a non-empty list of patterns, got {_kind(value)}")
    if not value:
        raise _Invalid(path, "empty list; it would match nothing (an absent key means 'any')")
    for index, pattern in enumerate(value):
        if not isinstance(pattern, str):
            raise _Invalid(f"{path}[{index}]", f"must be a string, got {_kind(pattern)}")
        if not pattern:
            raise _Invalid(f"{path}[{index}]", "empty pattern; use '*' to mean any")
    return GlobSet.compile(value)


def _is_wildcard(path: str, value: object) -> bool:
    """Whether ``value`` is the wildcard: ``'*'``, or a list holding only ``'*'`` (as Istio policies write it).

    A list mixing ``'*'`` with other items is refused: it reads as a narrowing that it is not."""
    if value == "*" or value == ["*"]:
        return True
    if isinstance(value, list) and "*" in value:
        raise _Invalid(path, "'*' already means any; write it alone: '*'")
    return False


def _parse_versions(value: object) -> frozenset[str] | None:
    if _is_wildcard("versions", value):
        return None
    if not isinstance(value, list) or not value:
        raise _Invalid("versions", f"must be '*' or a non-empty list of positive integers, got {_show(value)}")
    versions = set()
    for index, item in enumerate(value):
        canonical: str | None = None
        if isinstance(item, int) and not isinstance(item, bool) and item > 0:
            canonical = str(item)
        elif isinstance(item, str) and item.isascii() and item.isdigit():
            canonical = _canonical_version(item)
        if canonical is None or canonical == "0":
            raise _Invalid(f"versions[{index}]", f"must be a positive integer, got {_show(item)}")
        versions.add(canonical)
    return frozenset(versions)


def _parse_actions(value: object) -> frozenset[Action] | None:
    if _is_wildcard("actions", value):
        return None
    allowed = ", ".join(action.value for action in Action)
    if not isinstance(value, list) or not value:
        raise _Invalid("actions", f"must be '*' or a non-empty list of {allowed}; got {_show(value)}")
    actions = set()
    for index, item in enumerate(value):
        if not isinstance(item, str) or item not in _ACTIONS:
            raise _Invalid(f"actions[{index}]", f"must be one of {allowed}; got {_show(item)}")
        actions.add(Action(item))
    return frozenset(actions)


def _kind(value: object) -> str:
    """How a parsed YAML value reads in an error message."""
    if value is None:
        return "null"
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def _show(value: object) -> str:
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 60:
        return repr(value)
    return _kind(value)


# --- reloading -------------------------------------------------------------------------------------------


class PolicyStore:
    """The current PolicySet of a directory, swapped whole on a valid change; an invalid change is refused."""

    def __init__(self, directory: str | os.PathLike[str], *, interval_s: float) -> None:
        """Load the directory once (PolicyError on failure: a startup error) and prepare the watcher."""
        self.directory = Path(directory)
        where = str(self.directory)
        self._policies = ReloadingStore(
            name="policies",
            fingerprint=self._fingerprint,
            load=lambda _old: load_policies(self.directory),
            refused=PolicyError,
            interval_s=interval_s,
            reloaded="policy_reloaded",
            failed="policy_reload_failed",
            reloaded_fields=lambda _old, new: {"directory": where, "files": list(new.files), "rules": new.rule_count},
            failed_fields=lambda old: {"directory": where, "kept": list(old.files)},
        )
        log.info("policy_loaded", directory=where, files=list(self.current.files), rules=self.current.rule_count)

    @property
    def current(self) -> PolicySet:
        """The set to evaluate against now; read it once per decision."""
        return self._policies.current

    def start(self) -> None:
        """Start watching the directory for changes."""
        self._policies.start()

    def stop(self) -> None:
        """Stop watching."""
        self._policies.stop()

    def reload_now(self) -> bool:
        """Check the directory once, synchronously; returns whether a change was seen (used by tests)."""
        return self._policies.check_now()

    def _fingerprint(self) -> Fingerprint:
        return tree_fingerprint(self.directory, FILE_PATTERNS)

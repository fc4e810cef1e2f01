"""Strict reading of the YAML and JSON the gateway and its commands are given: one document per file, duplicate
keys refused (never last-one-wins), errors that say where, and did-you-mean hints for unknown keys.

PyYAML is the server extra's: it is imported when a YAML file is read, so the JSON half serves SDK-only installs.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["MAX_FILE_BYTES", "DocumentError", "DuplicateMemberError", "did_you_mean", "loads_json", "read_yaml"]

MAX_FILE_BYTES = 1 << 20  # far above any sane settings or policy file; a bigger one is a mistake, not input
_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


class DocumentError(ValueError):
    """A file or text that is not one well-formed document; the message says where (file, line, column)."""


class DuplicateMemberError(DocumentError):
    """A JSON object names a member twice (RFC 8259 4 leaves that to each parser; most keep the last, so two
    readers of one token or key set could disagree on what it says: the gateway refuses it)."""


@functools.cache
def _strict_loader() -> type:
    """``yaml.SafeLoader`` that refuses duplicate mapping keys, which PyYAML would otherwise resolve to the
    last one, so ``effect: deny`` followed by ``effect: allow`` would quietly allow."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _YAML_MERGE_TAG:
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_yaml(path: Path) -> object:
    """The single YAML document of a file (None when it has none), parsed with the safe loader only."""
    import yaml

    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise DocumentError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    loader = _strict_loader()(text)
    try:
        if not loader.check_node():
            return None
        node = loader.get_node()
        several = loader.check_node()
        document = None if several else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise DocumentError(f"{path}: invalid YAML: {_describe_yaml_error(exc)}") from None
    except (ValueError, RecursionError) as exc:  # an integer too long to convert, nesting too deep
        raise DocumentError(f"{path}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    if several:
        raise DocumentError(f"{path}: more than one YAML document ('---' starts another); write one")
    return document


def _describe_yaml_error(exc: Exception) -> str:
    """The problem and where it is, without PyYAML's ``in "<unicode string>"`` lines."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def _reject_constant(name: str) -> NoReturn:
    raise DocumentError(f"{name} is not JSON")


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise DuplicateMemberError(f"duplicate member {name!r}")
        obj[name] = value
    return obj


def loads_json(text: str | bytes) -> Any:
    """JSON (RFC 8259) read strictly: malformed text, a duplicate member (at any depth), NaN or Infinity is a
    DocumentError (DuplicateMemberError for the duplicate)."""
    try:
        return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DocumentError(f"not JSON: {exc}") from None
    except RecursionError:
        raise DocumentError("nested too deep") from None


def did_you_mean(key: object, known: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` when a known name is close to ``key``; else an empty string. Names are compared
    without a ``prefix`` they all share, which would make any two of them look close."""
    if not isinstance(key, str):
        return ""
    rests = [name.removeprefix(prefix) for name in known]
    close = difflib.get_close_matches(key.removeprefix(prefix), rests, n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""

"""Caller identifiers: the grammars and limits of gateway.identifiers, how refused text is shown, and the final
newline (which ``re.match`` with ``$`` lets through) refused by every pattern that guards input in gateway/ and
scripts/, each through the code that uses it."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.audit.chain import (
    ZERO_HASH,
    Checkpoint,
    Digester,
    check_line,
    decode_checkpoint,
    encode_canonical,
    encode_checkpoint,
    parse_rotated,
    validate_chain_id,
)
from gateway.auth.certs import inspect_peer
from gateway.errors import AuthenticationError, InvalidArgumentError
from gateway.identifiers import ID, NAME, SHOWN_CHARS, shown
from gateway.models.repository import parse_version, scan
from gateway.models.runtime import is_sequence_of_maps
from gateway.policy import GlobSet, PolicyError, load_policies
from tests.conftest import ROOT
from tests.unit.test_peer_certificates import CertificateAuthority
from tests.unit.test_tokens import Key, TokenVerifier, payload, token


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "model_name is required"),
        ("m" * 129, "model_name is 129 characters long, over the limit of 128"),
        ("mlp\n", "model_name 'mlp\\n' is not made of letters, digits, '_', '.' and '-'"),
        ("-mlp", "model_name '-mlp' is not made of"),
        ("ml p", "model_name 'ml p' is not made of"),
        ("mlp\u2028", "model_name 'mlp\\u2028' is not made of"),
    ],
)
def test_a_malformed_name_is_refused_with_the_field_and_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        NAME.check(text, "model_name")
    assert refused.value.message.startswith(message)
    assert not NAME.allows(text)


@pytest.mark.parametrize("text", ["mlp", "m" * 128, "resnet-50_v1.5", "2"])
def test_well_formed_names_pass(text: str) -> None:
    assert NAME.check(text, "model_name") == text and NAME.allows(text)


@pytest.mark.parametrize("text", ["req-42", "input_1:0", "onnx::Gemm_0", "serving_default/x", "0" * 128])
def test_well_formed_ids_pass(text: str) -> None:
    assert ID.check(text, "id") == text and ID.allows(text)


def test_a_huge_value_is_refused_by_its_length_without_showing_it() -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        ID.check("x" * 8_000_000, "input name")
    assert refused.value.message == "input name is 8000000 characters long, over the limit of 128"


def test_request_ids_can_always_be_sent_back_in_a_trailer() -> None:
    # grpc refuses to send a header value outside printable ASCII (RFC 9113 8.2.1 allows no CR, LF or NUL): the
    # call would fail after its record said OK. Every character the grammar accepts is one grpc sends.
    accepted = [chr(code) for code in range(0x110000) if ID.allows(chr(code))]
    assert accepted and all(0x20 < ord(char) < 0x7F for char in accepted)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("a\nb\x00c", "a\\nb\\x00c"),
        ("caf\u00e9 \u2028", "caf\\xe9 \\u2028"),
        ("back\\slash\n", "back\\\\slash\\n"),
        ("x" * 100, "x" * SHOWN_CHARS + "..."),
    ],
)
def test_shown_text_is_escaped_and_cut(text: str, expected: str) -> None:
    assert shown(text) == expected


def test_shown_text_stays_short_whatever_it_shows() -> None:
    assert len(shown("\U0001f600" * 10_000)) <= SHOWN_CHARS * 10 + 3


# ------------------------------------------------------------------------------------------------ final newlines


def _chain_line(**changes: str) -> bytes:
    record = {"chain": "main", "seq": 1, "prev": ZERO_HASH, "event": "call", **changes}
    body = encode_canonical(record).encode()
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}'


def _line_refused_with_hash(suffix: str) -> bool:
    line = _chain_line()
    stored = json.loads(line)["hash"]
    return check_line(line.replace(stored.encode(), (stored + suffix).encode()), Digester(None))[1] is not None


def _checkpoint_refused(suffix: str) -> bool:
    data = encode_checkpoint(Checkpoint("main", 1, "a" * 64 + suffix, "audit.log", "t"), Digester(None))
    try:
        decode_checkpoint(data, Digester(None))
    except ValueError:
        return True
    return False


def _chain_id_refused(suffix: str) -> bool:
    try:
        validate_chain_id("main" + suffix)
    except ValueError:
        return True
    return False


def _model_folder_skipped(tmp_path: Path, suffix: str) -> bool:
    (tmp_path / f"mlp{suffix}" / "1").mkdir(parents=True)
    (tmp_path / f"mlp{suffix}" / "1" / "model.onnx").write_bytes(b"")
    return not scan(tmp_path).versions


def _rule_id_refused(tmp_path: Path, suffix: str) -> bool:
    rule_id = json.dumps("r1" + suffix)
    (tmp_path / "p.yaml").write_text(
        f"rules:\n  - id: {rule_id}\n    effect: allow\n    principals: '*'\n    models: ['*']\n    actions: '*'\n"
    )
    try:
        load_policies(tmp_path)
    except PolicyError:
        return True
    return False


def _spiffe_id_refused(suffix: str) -> bool:
    uri = "spiffe://gateway.local/client/alice" + suffix
    leaf = CertificateAuthority.create().issue(uris=[uri])
    try:
        return inspect_peer(leaf.pem).identity != uri
    except AuthenticationError:
        return True


def _verifier(tmp_path: Path, key: Key) -> TokenVerifier:
    from gateway.auth.keys import KeyStore
    from tests.unit.test_tokens import AUDIENCE, ISSUER, LEEWAY, T0

    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [key.jwk()]}))
    keys = KeyStore(tmp_path / "jwks.json", interval_s=0, allowed_algorithms=(key.alg,))
    return TokenVerifier(keys=keys, issuer=ISSUER, audience=AUDIENCE, leeway_s=LEEWAY, clock=lambda: T0)


def _token_refused(tmp_path: Path, suffix: str) -> bool:
    from tests.unit.test_tokens import ec

    key = Key(ec.generate_private_key(ec.SECP256R1()), "ES256")
    try:
        _verifier(tmp_path, key).verify(token(key) + suffix, cert_x5t=None)
    except AuthenticationError:
        return True
    return False


def _binding_refused(tmp_path: Path, suffix: str) -> bool:
    from tests.unit.test_tokens import ec

    key = Key(ec.generate_private_key(ec.SECP256R1()), "ES256")
    thumbprint = "A" * 43
    bound = token(key, payload(cnf={"x5t#S256": thumbprint + suffix}))
    try:
        _verifier(tmp_path, key).verify(bound, cert_x5t=thumbprint + suffix)
    except AuthenticationError:
        return True
    return False


def _client_name_refused(tmp_path: Path, suffix: str) -> bool:
    result = subprocess.run(
        [ROOT / "scripts/gen_certs.sh", tmp_path / "pki", f"alice{suffix}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode != 0 and "bad client name" in result.stderr


GUARDS: dict[str, Callable[[Path, str], bool]] = {
    "identifiers.NAME": lambda _, suffix: not NAME.allows("mlp" + suffix),
    "identifiers.ID": lambda _, suffix: not ID.allows("req-42" + suffix),
    "repository.parse_version": lambda _, suffix: parse_version("2" + suffix) is None,
    "repository.scan": _model_folder_skipped,
    "runtime.is_sequence_of_maps": lambda _, suffix: not is_sequence_of_maps("seq(map(int64,tensor(float)))" + suffix),
    "chain.validate_chain_id": lambda _, suffix: _chain_id_refused(suffix),
    "chain.parse_rotated": lambda _, suffix: parse_rotated(f"audit.log.{1:016d}-{2:016d}{suffix}") is None,
    "chain.check_line": lambda _, suffix: _line_refused_with_hash(suffix),
    "chain.decode_checkpoint": lambda _, suffix: _checkpoint_refused(suffix),
    "policy rule id": _rule_id_refused,
    "policy globs": lambda _, suffix: not GlobSet.compile(["ml?"]).match("mlp" + suffix),
    "certs SPIFFE id": lambda _, suffix: _spiffe_id_refused(suffix),
    "verifier compact JWS": _token_refused,
    "verifier x5t#S256": _binding_refused,
    "gen_certs.sh client name": _client_name_refused,
}


@pytest.mark.parametrize("guard", list(GUARDS))
def test_every_pattern_guarding_input_refuses_a_final_newline(tmp_path: Path, guard: str) -> None:
    refuses = GUARDS[guard]
    for folder in ("newline", "plain"):
        (tmp_path / folder).mkdir()
    assert refuses(tmp_path / "newline", "\n")
    assert not refuses(tmp_path / "plain", "")  # the same input without it passes: the newline is what is refused

"""The vocabulary of authentication refusals and the refusal message's ending, without a server."""

from __future__ import annotations

from gateway.auth import reasons
from gateway.errors import (
    MAX_MESSAGE_CHARS,
    AuthenticationError,
    InternalError,
    InvalidArgumentError,
    sent_message,
    split_sent_message,
)


def test_the_caller_is_told_the_term_and_what_to_do_never_the_detail():
    reason = reasons.detailed(reasons.MALFORMED_CLAIM, "https://example.com/groups")
    error = AuthenticationError(reason=reason)
    assert error.message == "malformed claim: a claim has the wrong type or shape"
    assert "example.com" not in error.message
    assert error.reason == reason  # the detail stays for the record and the log


def test_a_token_refusal_has_its_rfc_6750_challenge_and_a_certificate_refusal_none():
    assert reasons.www_authenticate(reasons.EXPIRED) == (
        'Bearer realm="gateway", error="invalid_token", error_description="token expired"'
    )
    assert reasons.www_authenticate(reasons.NO_TOKEN) == (
        'Bearer realm="gateway", error="invalid_request", error_description="missing token"'
    )
    assert reasons.www_authenticate(reasons.CERTIFICATE_REVOKED) is None


def test_a_reason_outside_the_vocabulary_is_an_invalid_token():
    assert reasons.term_of("something new: with detail") == reasons.INVALID
    assert AuthenticationError(reason="something new").message.startswith("invalid token: ")


def test_every_term_reads_back_from_its_message():
    for term in reasons.TERMS:
        assert reasons.reason_of_message(AuthenticationError(reason=term).message) == term
        assert ": " not in term  # the separator of a term and its detail


def test_the_message_ending_names_the_request_id_and_reads_back():
    message = sent_message(InvalidArgumentError("bad input"), "abc123")
    assert message == "bad input (request id abc123; see call_refused in the gateway's log)"
    assert split_sent_message(message) == ("bad input", "abc123")
    assert split_sent_message("bad input (request id x)") == ("bad input (request id x)", None)
    assert sent_message(InternalError("trace: secrets"), "r") == (
        "internal error (request id r; see call_refused in the gateway's log)"
    )


def test_a_long_message_is_cut_before_its_ending():
    message = sent_message(InvalidArgumentError("x" * 5000), "r")
    assert len(message) == MAX_MESSAGE_CHARS
    assert message.endswith(" (request id r; see call_refused in the gateway's log)")

"""Transport: mutual TLS is required; clients without a certificate, from another CA, or in plaintext fail."""

from __future__ import annotations

import grpc
import pytest

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.e2e.helpers import TIMEOUT, auth, rpc_error, stub

# A refused handshake surfaces as UNAVAILABLE (or UNKNOWN under TLS 1.3, where the client learns late).
HANDSHAKE_REFUSED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)


@pytest.fixture
def gw(start_gateway):
    return start_gateway()


def list_models(channel, token):
    return stub(channel).ListModels(pb.ListModelsRequest(), metadata=auth(token), timeout=TIMEOUT)


def test_client_with_certificate_and_token_is_served(gw):
    with gw.channel("alice") as channel:
        assert list_models(channel, gw.token()).models


def test_client_without_certificate_is_refused_at_handshake(gw):
    with gw.channel(None) as channel:
        exc = rpc_error(lambda: list_models(channel, gw.token()))
    assert exc.code() in HANDSHAKE_REFUSED


def test_client_certificate_from_another_ca_is_refused(gw, other_pki):
    credentials = grpc.ssl_channel_credentials(
        gw.pki.read("ca.crt"), other_pki.read("alice.key"), other_pki.read("alice.crt")
    )
    with grpc.secure_channel(gw.target, credentials) as channel:
        exc = rpc_error(lambda: list_models(channel, gw.token()))
    assert exc.code() in HANDSHAKE_REFUSED


def test_plaintext_client_is_refused(gw):
    with grpc.insecure_channel(gw.target) as channel:
        exc = rpc_error(lambda: list_models(channel, gw.token()))
    assert exc.code() in HANDSHAKE_REFUSED


def test_server_certificate_from_another_ca_is_refused_by_the_client(gw, other_pki):
    credentials = grpc.ssl_channel_credentials(
        other_pki.read("ca.crt"), other_pki.read("alice.key"), other_pki.read("alice.crt")
    )
    with grpc.secure_channel(gw.target, credentials) as channel:
        exc = rpc_error(lambda: list_models(channel, gw.token()))
    assert exc.code() in HANDSHAKE_REFUSED


def test_dev_insecure_transport_serves_plaintext_on_loopback_only(start_gateway):
    gw = start_gateway(overrides={"dev_insecure_transport": True})
    with grpc.insecure_channel(gw.target) as channel:
        # No certificate on a plaintext channel: the token alone cannot pass, since alice's token is bound.
        unbound = gw.token(bind=None)
        assert list_models(channel, unbound).models

"""Transport: mutual TLS is required; clients without a certificate, from another CA, or in plaintext fail."""

from __future__ import annotations

import shutil
import socket
import ssl

import grpc
import pytest
from cryptography import x509

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.conftest import ROOT, run_script, wait_until
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


def test_rotated_server_key_open_to_others_is_refused_and_the_old_pair_keeps_serving(start_gateway, pki_copy):
    gw = start_gateway(use_pki=pki_copy)
    first = served_certificate_serial(gw)
    run_script(ROOT / "scripts/gen_certs.sh", "--server", pki_copy.dir)
    pki_copy.path("server.key").chmod(0o644)
    gw.gateway.credentials.reload_now()
    assert served_certificate_serial(gw) == first
    pki_copy.path("server.key").chmod(0o600)  # the fix the refusal names takes effect without a restart
    gw.gateway.credentials.reload_now()
    assert served_certificate_serial(gw) != first


def served_certificate_serial(gw) -> int:
    """The serial of the certificate the server presents to a new TLS connection (ALPN h2, like grpc)."""
    context = ssl.create_default_context(cafile=str(gw.pki.path("ca.crt")))
    context.load_cert_chain(gw.pki.path("alice.crt"), gw.pki.path("alice.key"))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_server_certificate_rotates_without_restart_while_clients_run(start_gateway, pki_copy):
    from tests.e2e.test_auth import Load

    gw = start_gateway(use_pki=pki_copy, overrides={"tls.reload_interval_s": 0.05})
    first = served_certificate_serial(gw)
    with Load(gw) as load:
        wait_until(lambda: load.ok > 20)
        run_script(ROOT / "scripts/gen_certs.sh", "--server", pki_copy.dir)
        wait_until(lambda: served_certificate_serial(gw) != first)
        rotated = served_certificate_serial(gw)
        # A bad pair (key of another certificate) is refused; the rotated certificate keeps serving.
        shutil.copy(pki_copy.path("bob.key"), pki_copy.path("server.key"))
        gw.gateway.credentials.reload_now()
        assert served_certificate_serial(gw) == rotated
        with gw.channel() as fresh:  # a new connection works on the rotated certificate
            assert list_models(fresh, gw.token()).models
        ok_before = load.ok
        wait_until(lambda: load.ok > ok_before + 20)  # long-lived connections kept working throughout
    assert load.failures == []

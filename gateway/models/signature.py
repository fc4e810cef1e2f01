"""Model signatures (OpenSSF model signing, PyPI ``model-signing``): a version folder's files checked against the
signed manifest in its ``model.sig``, and the digest that names those exact bytes in every record.

Every manifest, hash and signature operation is the library's; this module only chooses its configuration. The
digest is the manifest's root digest as the library defines it for the signed statement's subject (SHA-256 over
the files' SHA-256 digests, by path): a signed version's digest is its signature's subject digest, and an unsigned
version gets the same function of its files, so one digest names one set of bytes whether or not it was signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography import x509

SIGNATURE_FILE = "model.sig"
MODES = ("off", "warn", "required")
DEFAULT_MAX_VERSION_BYTES = 4 << 30  # models.max_version_bytes: the most one load copies (staged)
_EXTRA_HINT = "pip install 'gateway[signing]'"


class SignatureError(Exception):
    """A version whose signature does not verify, with a one-line ``reason`` (no secrets in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SignatureTrust:
    """Whom a signature must come from: one of an EC public key (PEM), a CA certificate chain (PEM; offline) with
    the signer identities allowed in its certificates, or a Sigstore identity and OIDC issuer (needs Sigstore's
    public services at every verification)."""

    public_key: Path | None = None
    certificate_chain: Path | None = None
    # With certificate_chain: the signing certificate must name one of these (signer_names' spelling).
    signer_identities: tuple[str, ...] = ()
    sigstore_identity: str | None = None
    sigstore_issuer: str | None = None

    def kinds(self) -> list[str]:
        """The trust sources configured (exactly one is valid)."""
        given = {
            "public_key": self.public_key,
            "certificate_chain": self.certificate_chain,
            "sigstore_identity": self.sigstore_identity,
        }
        return [name for name, value in given.items() if value is not None]


@dataclass(frozen=True, slots=True)
class SignaturePolicy:
    """The verification mode per model (``by_model`` overrides ``mode``) and the trust every signature needs."""

    mode: str = "off"
    by_model: Mapping[str, str] = field(default_factory=dict)
    trust: SignatureTrust = field(default_factory=SignatureTrust)

    def mode_for(self, model: str) -> str:
        """``off``, ``warn`` or ``required`` for one model."""
        return self.by_model.get(model, self.mode)

    @property
    def used(self) -> bool:
        """Whether any model is verified."""
        return any(mode != "off" for mode in (self.mode, *self.by_model.values()))


def _library() -> Any:
    """The model_signing package, imported on first use (about a second: it brings Sigstore's client)."""
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as exc:
        raise SignatureError(f"model signing is not installed ({exc.name}): {_EXTRA_HINT}") from None
    return model_signing


def _hashing_config() -> Any:
    """The library's file-level SHA-256 manifest of a folder, less the signature file (and git's files)."""
    return _library().hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=True)


def verify(folder: Path, trust: SignatureTrust) -> None:
    """Check ``folder``'s files against the manifest signed in ``folder/model.sig`` by a trusted signer; raise
    SignatureError naming why not (missing, tampered, added or removed file, untrusted or expired signer, signer
    identity not allowed)."""
    library = _library()
    signature = folder / SIGNATURE_FILE
    if not signature.is_file():
        raise SignatureError(f"no signature ({SIGNATURE_FILE} is missing)")
    # A fresh Config per verification: the library keeps the hashing settings it guessed from the first manifest.
    if not trust.kinds():
        raise SignatureError("no trust configured (models.signature_trust)")
    config = library.verifying.Config()
    try:  # the trust material is read here, at every verification: a rotated key takes effect on the next load
        if trust.public_key is not None:
            config.use_elliptic_key_verifier(public_key=trust.public_key)
        elif trust.certificate_chain is not None:
            config.use_certificate_verifier(certificate_chain=[trust.certificate_chain])
        else:
            config.use_sigstore_verifier(identity=trust.sigstore_identity, oidc_issuer=trust.sigstore_issuer)
    except Exception as exc:
        raise SignatureError(f"cannot read the trust material: {_short(exc)}") from None
    try:
        config.verify(folder, signature)
    except Exception as exc:  # the library raises ValueError, OSError and its dependencies' own classes
        raise SignatureError(_short(exc)) from None
    if trust.certificate_chain is not None:
        now = datetime.now(UTC)
        check_signer(signing_certificate(signature), trust.signer_identities, now=now)
        check_chain(signature, trust.certificate_chain, now=now)


def signing_certificate(signature: Path) -> x509.Certificate:
    """The signing certificate (the first of the bundle's chain) of a certificate signature the library verified."""
    try:
        bundle = json.loads(signature.read_bytes())
        raw = bundle["verificationMaterial"]["x509CertificateChain"]["certificates"][0]["rawBytes"]
        return x509.load_der_x509_certificate(base64.b64decode(raw, validate=True))
    except (OSError, ValueError, KeyError, IndexError, TypeError, binascii.Error):
        raise SignatureError(
            "the signature holds no signing certificate (signed with a key, not a certificate?)"
        ) from None


def check_chain(signature: Path, trust_chain: Path, *, now: datetime) -> None:
    """Refuse a signature whose chain (its intermediates, the CA) is not valid ``now``: the library verified it as
    of the signing certificate's start only (``check_signer`` says why that is not enough offline). Verified again
    by the same means as the library's (pyOpenSSL's X509StoreContext), at the load's time."""
    from OpenSSL import crypto

    try:
        bundle = json.loads(signature.read_bytes())
        chain = bundle["verificationMaterial"]["x509CertificateChain"]["certificates"]
        certificates = [x509.load_der_x509_certificate(base64.b64decode(c["rawBytes"], validate=True)) for c in chain]
        anchors = x509.load_pem_x509_certificates(trust_chain.read_bytes())
    except (OSError, ValueError, KeyError, IndexError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"cannot read the certificate chain: {_short(exc)}") from None
    store = crypto.X509Store()
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    store.set_time(now)
    leaf, *intermediates = (crypto.X509.from_cryptography(certificate) for certificate in certificates)
    try:
        crypto.X509StoreContext(store, leaf, intermediates).verify_certificate()
    except crypto.X509StoreContextError as exc:
        subject = exc.certificate.to_cryptography().subject.rfc4514_string()
        raise SignatureError(f"the certificate chain is not valid now: {exc} ({subject})") from None


def signer_names(certificate: x509.Certificate) -> list[str]:
    """Every name a signing certificate gives its holder, typed as the gateway spells identities: URI SANs as they
    are (``spiffe://...``), ``email:...``, ``dns:...``, and ``cn:...`` for the subject's common names."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    names: list[str] = list(san.get_values_for_type(x509.UniformResourceIdentifier)) if san else []
    if san is not None:
        names += [f"email:{email}" for email in san.get_values_for_type(x509.RFC822Name)]
        names += [f"dns:{dns.lower()}" for dns in san.get_values_for_type(x509.DNSName)]
    names += [f"cn:{cn.value!s}" for cn in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return names


_URI_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*://")  # RFC 3986's scheme, as URI SANs of signers are written


def signer_spelling_problem(text: str) -> str | None:
    """Why ``text``, an allowed signer identity, can never equal a name ``signer_names`` gives; else None."""
    if text != text.strip() or not text:
        return "has blank space around it (or is empty)"
    for prefix in ("email:", "dns:", "cn:"):
        if text.startswith(prefix):
            if text == prefix:
                return f"names nothing after {prefix!r}"
            if prefix == "email:" and "@" not in text:
                return "is not an email address after 'email:'"
            if prefix == "dns:" and text != text.lower():
                return "a DNS name is compared in lowercase (RFC 4343)"
            return None
    if _URI_SCHEME.match(text):
        return None
    hint = f" (write email:{text})" if "@" in text and ":" not in text else ""
    return f"must be a URI SAN (spiffe://..., https://...), email:, dns: or cn:{hint}"


def check_signer(certificate: x509.Certificate, allowed: tuple[str, ...], *, now: datetime) -> None:
    """Refuse a signing certificate that names no allowed identity, or is outside its validity now.

    The library checks the chain as of the certificate's own start (the Sigstore model, where a transparency log
    proves the signing time); an offline certificate signature carries no trusted time, so the only time its
    validity can be checked at is the load's: a version whose signing certificate expired stops loading, as an
    untimestamped code signature does. Re-sign before a signing certificate expires."""
    names = signer_names(certificate)
    if not any(name in allowed for name in names):
        shown_names = ", ".join(names[:4]) or "no name"
        raise SignatureError(f"signer {shown_names} is not one of models.signature_trust.signer_identities")
    if now > certificate.not_valid_after_utc:
        raise SignatureError(f"the signing certificate expired at {certificate.not_valid_after_utc.isoformat()}")
    if now < certificate.not_valid_before_utc:
        raise SignatureError(
            f"the signing certificate is not valid before {certificate.not_valid_before_utc.isoformat()}"
        )


# What the library leaves out of a manifest besides the signature (hashing.Config's ignore_git_paths).
_GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
_CHUNK = 1 << 20


def digest(folder: Path) -> str:
    """``sha256:<hex>``: the SHA-256 of every file's SHA-256, files sorted by path, ``model.sig`` and git's files
    left out. That is the subject digest a signature made by ``sign`` vouches for (tests/e2e/test_model_signatures.py
    checks the two stay equal), computed here without the library, so that naming a version's bytes never depends
    on the signing library importing (``signatures: off`` needs none of it)."""
    try:
        # Ordered as the library orders its manifest: by path components (PurePosixPath), not by the string, in
        # which "tokenizer.json" would sort before "tokenizer/vocab.txt".
        files = sorted(
            (PurePosixPath(path.relative_to(folder).as_posix()), path)
            for path in folder.rglob("*")
            if path.is_file() and not _left_out(path.relative_to(folder))
        )
        root = hashlib.sha256()
        for _, path in files:
            file_hash = hashlib.sha256()
            with path.open("rb") as stream:
                while chunk := stream.read(_CHUNK):
                    file_hash.update(chunk)
            root.update(file_hash.digest())
    except OSError as exc:
        raise SignatureError(f"cannot hash the version's files: {_short(exc)}") from None
    return "sha256:" + root.hexdigest()


def _left_out(relative: Path) -> bool:
    return relative.as_posix() == SIGNATURE_FILE or relative.parts[0] in _GIT_PATHS


def sign(folder: Path, *, private_key: Path, certificate: Path | None = None, chain: Path | None = None) -> Path:
    """Sign ``folder`` into ``folder/model.sig`` with an EC private key (and its certificate and chain, for
    certificate trust); returns the signature's path."""
    library = _library()
    config = library.signing.Config()
    if certificate is not None:
        config.use_certificate_signer(
            private_key=private_key, signing_certificate=certificate, certificate_chain=[chain] if chain else []
        )
    else:
        config.use_elliptic_key_signer(private_key=private_key)
    signature = folder / SIGNATURE_FILE
    config.set_hashing_config(_hashing_config()).sign(folder, signature)
    return signature


@contextmanager
def staged(folder: Path, *, max_bytes: int) -> Iterator[Path]:
    """A private copy of a version folder (mode 0700, in TMPDIR), removed on exit.

    What is verified, hashed and handed to ONNX Runtime is this copy, which nobody else can write: a file swapped
    in the repository between the check and the load cannot reach the runtime. A symbolic link to a regular file
    is copied as that file (and checked like any file); a link to a folder and a special file (device, FIFO,
    socket) are refused before anything is read: whoever writes the repository must not make every load read
    /dev/zero or the whole filesystem. The copy holds at most ``max_bytes`` (models.max_version_bytes): a larger
    folder is refused before the copy, and a file that grows while it is copied stops the copy at the budget."""
    _refuse_unstageable(folder, max_bytes)
    budget = _Budget(max_bytes)
    with tempfile.TemporaryDirectory(prefix="gateway-model-") as tmp:
        copy = Path(tmp) / "version"
        shutil.copytree(folder, copy, copy_function=budget.copy)
        yield copy


def _over_budget(size: int, max_bytes: int) -> SignatureError:
    return SignatureError(
        f"the version's files hold {size} bytes or more, over models.max_version_bytes ({max_bytes}): "
        "raise it to serve this version (each load copies it into TMPDIR)"
    )


class _Budget:
    """Copies files while the bytes copied stay within a budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.left = max_bytes

    def copy(self, source: str, target: str) -> None:
        with open(source, "rb") as reader, open(target, "wb") as writer:
            while chunk := reader.read(min(_CHUNK, self.left + 1)):
                self.left -= len(chunk)
                if self.left < 0:
                    raise _over_budget(self.max_bytes + 1, self.max_bytes)
                writer.write(chunk)


def _refuse_unstageable(folder: Path, max_bytes: int) -> None:
    size = 0
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            path = Path(root) / name
            if path.is_symlink() and not path.is_file():
                raise SignatureError(f"{path.relative_to(folder)}: a symbolic link to something not a regular file")
            if not path.is_symlink() and not (path.is_dir() or path.is_file()):
                raise SignatureError(f"{path.relative_to(folder)}: not a regular file or folder")
            if path.is_file():
                size += path.stat().st_size
    if size > max_bytes:
        raise _over_budget(size, max_bytes)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]

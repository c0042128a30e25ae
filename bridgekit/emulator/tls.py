"""The emulator's local certificate authority and its 127.0.0.1/localhost server certificate.

Generated once under ``<home>/tls/`` and reused afterwards, so clients configured with ``ca.pem``
keep trusting a restarted emulator. MSAL and azure-identity refuse non-https authorities
(protocols.md §0.1, §3.5), which is why the emulator speaks TLS at all.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TlsFiles", "ensure_tls", "generate_self_signed", "write_private"]

_KEY_SIZE = 2048


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate and the server certificate/key."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (0600), never world-readable in between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_KEY_SIZE)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def generate_self_signed(common_name: str, *, days: int = 730) -> tuple[bytes, bytes]:
    """A self-signed certificate and its private key (PEM), e.g. for an app registration credential."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_valid(cert_path: Path) -> x509.Certificate | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return None
    # Regenerate a few days early rather than serve a certificate that expires mid-run.
    if cert.not_valid_after_utc < _now() + dt.timedelta(days=2):
        return None
    return cert


def ensure_tls(home: Path) -> TlsFiles:
    """Create (first run) or reuse the CA and server certificate under ``<home>/tls``.

    The server certificate names ``127.0.0.1`` (IP SAN) and ``localhost`` (DNS SAN). If the CA is
    missing or unreadable both are regenerated; if only the server certificate is missing or near
    expiry it is re-issued from the existing CA, so clients' trust in ``ca.pem`` survives.
    """
    d = home / "tls"
    files = TlsFiles(d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key")
    d.mkdir(parents=True, exist_ok=True)

    ca_cert = _load_valid(files.ca_cert) if files.ca_key.exists() else None
    ca_key: rsa.RSAPrivateKey
    if ca_cert is None:
        ca_key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bridgekit"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "bridgekit emulator local CA")])
        ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_private(files.ca_key, _key_pem(ca_key))
        files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        files.server_cert.unlink(missing_ok=True)
    else:
        loaded = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        ca_key = loaded

    if _load_valid(files.server_cert) is None or not files.server_key.exists():
        key = _new_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            # 397 days: the longest server-certificate lifetime current TLS clients accept.
            .not_valid_after(_now() + dt.timedelta(days=397))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                x509.DNSName("localhost"),
            ]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_private(files.server_key, _key_pem(key))
        files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files

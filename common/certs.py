"""Deployment credentials: a CA and the SuperLink's TLS certificate (coordinator side), and one
ECDSA key pair per site for SuperNode authentication (site side).

Files are PEM (certificates, TLS keys) and OpenSSH (site keys, as `flower-supernode` and
`flwr supernode register` read them). Private keys are created with mode 0600, every file is
written atomically, and nothing that exists is overwritten unless `force` is set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_bytes
from common.errors import FedLoraError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SiteKeys:
    private_key: Path  # stays on the site: flower-supernode --auth-supernode-private-key
    public_key: Path  # goes to the coordinator: flwr supernode register


LOOPBACK_SANS = ("127.0.0.1", "localhost")  # always in the server certificate


def write_ca_and_server_cert(out: Path, sans: list[str], force: bool = False,
                             days: int = 365) -> list[Path]:
    """A self-signed CA and a SuperLink certificate for `sans` (host names and IP addresses)
    signed by it. Returns the files written: ca.crt, ca.key, server.crt, server.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not sans:
        raise FedLoraError("the server certificate needs at least one --san (host name or IP "
                           "address the sites connect to)")
    # The SuperLink starts its own SuperExec against 127.0.0.1 and checks this certificate
    # there: without the loopback names every run would wait forever for a ServerApp.
    names = [_san(value) for value in dict.fromkeys([*sans, *LOOPBACK_SANS])]
    paths = [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY]
    _refuse_overwrite(paths, force)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora federation CA")])
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=False, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
                   .issuer_name(ca_name)
                   .public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / CA_KEY, _pem_private(ca_key), mode=0o600)
    atomic_write_bytes(out / SERVER_KEY, _pem_private(server_key), mode=0o600)
    atomic_write_bytes(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def write_site_keys(out: Path, site: str, force: bool = False) -> SiteKeys:
    """An ECDSA P-384 key pair for SuperNode authentication, as <site>.key / <site>.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _check_site_name(site)
    keys = SiteKeys(private_key=out / f"{site}.key", public_key=out / f"{site}.pub")
    _refuse_overwrite([keys.private_key, keys.public_key], force)
    key = ec.generate_private_key(ec.SECP384R1())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(keys.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), mode=0o600)
    atomic_write_bytes(keys.public_key, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return keys


def check_before_writing(out: Path, sans: list[str], sites: list[str], force: bool) -> None:
    """Every name valid and no file in the way, before anything is written: a bad request
    leaves the folder as it was."""
    if out.exists() and not out.is_dir():
        raise FedLoraError(f"certs: --out {str(out)!r} is a file, not a folder")
    paths = []
    if sans:
        for value in sans:
            _san(value)
        if len(sans[0]) > 64:
            raise FedLoraError(f"--san {sans[0]!r}: the first name becomes the certificate's "
                               f"common name, at most 64 characters")
        paths += [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY]
    for site in sites:
        _check_site_name(site)
        paths += [out / f"{site}.key", out / f"{site}.pub"]
    _refuse_overwrite(paths, force)


def _check_site_name(site: str) -> None:
    if not SITE_NAME.match(site):
        raise FedLoraError(f"site name {site!r} must be 1-64 letters, digits, '.', '_' or '-', "
                           f"starting with a letter or digit")


def _san(value: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", value):
        raise FedLoraError(f"--san {value!r} is neither an IP address nor a host name")
    return x509.DNSName(value)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FedLoraError(f"{', '.join(existing)} already exist(s); pass --force to replace")


def _pem_private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

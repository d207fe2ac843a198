"""Key material for a Flower deployment, made with `cryptography` (a dependency of Flower itself):

- `make_tls(dir, hosts)`: a private CA (`ca.crt`, `ca.key`) and a server certificate it signs (`server.pem`,
  `server.key`) whose subjectAltName lists every host / IP the SuperNodes and `flwr` use to reach the SuperLink,
  plus 127.0.0.1 and localhost: a SuperLink started on 0.0.0.0 has its own SuperExec and ServerApp processes
  connect to 127.0.0.1 over TLS with the same CA.
  The SuperLink takes `--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`; devices and
  the `flwr` CLI take `ca.crt` as their root certificate.
- `make_node_key(path)`: a SuperNode's authentication key pair in the format Flower 1.42 reads: an OpenSSH
  ECDSA P-384 private key (`--auth-supernode-private-key`) and its OpenSSH public key (`PATH.pub`, for
  `flwr supernode register PATH.pub CONN`) -- the same files as `ssh-keygen -t ecdsa -b 384 -N ""`.

Private keys are written 0600 and existing files are never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from ...errors import PocketLMError

TLS_FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


class CertError(PocketLMError):
    """Key material could not be made (a file exists already, an unusable host name)."""


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:     # pragma: no cover - Flower requires cryptography
        raise CertError("the `cryptography` package is missing: install Flower with  "
                        "pip install 'pocketlm[flower]'") from None
    return x509, hashes, serialization, ec, NameOID


def _fresh(paths: list[Path]) -> None:
    taken = [str(p) for p in paths if p.exists()]
    if taken:
        raise CertError(f"refusing to overwrite {', '.join(taken)} (remove it or pick another folder)")


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


LOCAL = ("127.0.0.1", "localhost")


def _san(hosts: list[str]):
    x509 = _crypto()[0]
    names = []
    for h in dict.fromkeys([*hosts, *LOCAL]):
        if not _is_ip(h) and (not h or any(c in h for c in "/:@ *\t") or h.startswith(("-", "."))):
            raise CertError(f"not a host name or IP address: {h!r}")
        names.append(x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def make_tls(directory: Path, hosts: list[str], *, days: int = 365) -> dict[str, Path]:
    """A CA and a server certificate for `hosts` (DNS names or IPs) in `directory`; returns the four paths."""
    hosts = [h.strip() for h in hosts]
    if not hosts:
        raise CertError("give at least one host name or IP address the SuperLink is reached at")
    if days < 1:
        raise CertError(f"days must be at least 1, not {days}")
    x509, hashes, serialization, ec, NameOID = _crypto()
    san = _san(hosts)
    directory = Path(directory)
    paths = {name: directory / name for name in TLS_FILES}
    _fresh(list(paths.values()))
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pocketlm federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(san, critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA384()))

    pem, pkcs8, none = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    _write(paths["ca.crt"], ca.public_bytes(pem), private=False)
    _write(paths["ca.key"], ca_key.private_bytes(pem, pkcs8, none), private=True)
    _write(paths["server.pem"], server.public_bytes(pem), private=False)
    _write(paths["server.key"], key.private_bytes(pem, pkcs8, none), private=True)
    return paths


def make_node_key(path: Path) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: `path` (OpenSSH ECDSA P-384 private key) and `path.pub`."""
    _, _, serialization, ec, _ = _crypto()
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    _fresh([path, pub])
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
           + f" pocketlm-{path.name}\n".encode(), private=False)
    return path, pub

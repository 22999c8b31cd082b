"""Development TLS certificates with `cryptography`: a private CA and one certificate per role.

    python -m service certs DIR [--host replica-0 --host replica-1 --host dealer ...]

Writes DIR/ca.pem (give it to clients: `--cacert`), DIR/ca-key.pem (the CA's private key: keep
it with whoever issues certificates, never in a role's folder) and, for each role (`replica-0`,
`replica-1`, `dealer`, `web`), DIR/ROLE/cert.pem, key.pem and ca.pem. A certificate's subject
names its role (`CN=replica-0`): the dealer and the replicas map it to a party
(`service.identity`). Each certificate serves and dials (server and client use), and names
127.0.0.1, ::1, localhost and each --host. For development and tests only: production
deployments use certificates from their own CA, with the role as the subject's common name.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.identity import ROLES, write_private


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privdigit"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, data)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_dev_certs(
    directory: Path | str,
    hosts: tuple[str, ...] = (),
    days: int = 30,
    roles=ROLES,
    role_hosts: dict[str, tuple[str, ...]] | None = None,
) -> Path:
    """Create a CA and one certificate per role for localhost + `hosts`; returns the directory.

    `role_hosts[role]`: more names (DNS, a leftmost `*.` wildcard, or IP) in that role's
    certificate only."""
    role_hosts = role_hosts or {}
    if unknown := set(role_hosts) - set(roles):
        raise ValueError(f"no such role: {', '.join(sorted(unknown))} (roles: {', '.join(roles)})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("privdigit development CA"))
        .issuer_name(_name("privdigit development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("localhost"),
    ]
    names += [_general_name(host) for host in hosts]
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (directory / "ca.pem").write_bytes(ca_pem)
    _write_key(directory / "ca-key.pem", ca_key)
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(role))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(
                x509.SubjectAlternativeName(
                    names + [_general_name(h) for h in role_hosts.get(role, ())]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        folder = directory / role
        folder.mkdir(exist_ok=True)
        (folder / "ca.pem").write_bytes(ca_pem)
        (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(folder / "key.pem", key)
    return directory

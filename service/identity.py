"""Who a party is: its own credentials and certificate, checked on every hop.

Three parties, three pairwise credentials (32-byte HMAC keys), and no credential shared by all:

    replica 0 <-> replica 1   `peer.key`     the peer stream's and the lanes' handshakes
    replica 0 <-> dealer      `dealer.key` of replica 0, `party-0.key` of the dealer
    replica 1 <-> dealer      `dealer.key` of replica 1, `party-1.key` of the dealer

plus one `admin.key` per replica for its own operator (`python -m service reload`). The dealer
checks a request for party p's material with party p's key only, so replica 0, which holds
neither `party-1.key` nor replica 1's `dealer.key`, cannot ask for party 1's seeds (which would
give it the weights' fixed masks, and with them the weights). With TLS, every party also has
its own certificate whose subject names its role (`CN=replica-0`, `replica-1`, `dealer`); the
dealer maps the client certificate to a party and refuses any other claim, and each replica
accepts only the other replica's certificate on the peer stream and the lanes.

`python -m service certs DIR` writes one folder per role holding exactly what that role needs
(`DIR/replica-0`, `DIR/replica-1`, `DIR/dealer`, `DIR/web`), the CA certificate for clients
(`DIR/ca.pem`) and the CA's private key (`DIR/ca-key.pem`, which no role folder holds).
"""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPLICA_ROLES = ("replica-0", "replica-1")
DEALER_ROLE = "dealer"
WEB_ROLE = "web"
ROLES = (*REPLICA_ROLES, DEALER_ROLE, WEB_ROLE)

# What each role's folder holds besides its certificate: credential file -> setting.
REPLICA_KEYS = {
    "peer.key": "peer_secret",
    "dealer.key": "dealer_secret",
    "admin.key": "admin_secret",
}
DEALER_KEYS = {"party-0.key": "party0_secret", "party-1.key": "party1_secret"}
MIN_SECRET = 32


class IdentityError(PermissionError):
    """The other side is not the party it must be (wrong role, wrong or missing certificate)."""


def replica_role(party: int) -> str:
    return REPLICA_ROLES[party]


def write_private(path: Path, data: bytes) -> None:
    """Write a private file readable by its owner only (0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_credentials(directory: Path | str) -> Path:
    """Fresh pairwise keys, each written only into the folders of the two roles that share it."""
    directory = Path(directory)
    peer, admins = secrets.token_hex(32), [secrets.token_hex(32) for _ in (0, 1)]
    dealer = [secrets.token_hex(32) for _ in (0, 1)]
    for p, role in enumerate(REPLICA_ROLES):
        (directory / role).mkdir(parents=True, exist_ok=True)
        for name, value in (
            ("peer.key", peer),
            ("dealer.key", dealer[p]),
            ("admin.key", admins[p]),
        ):
            write_private(directory / role / name, value.encode())
    (directory / DEALER_ROLE).mkdir(parents=True, exist_ok=True)
    for p in (0, 1):
        write_private(directory / DEALER_ROLE / f"party-{p}.key", dealer[p].encode())
    return directory


def read_credentials(folder: Path, files: dict[str, str]) -> dict[str, str]:
    """The settings found in `folder` (file name -> setting name); missing files are skipped."""
    found = {}
    for name, setting in files.items():
        path = Path(folder) / name
        if path.is_file():
            found[setting] = path.read_text().strip()
    return found


def check_distinct(named: dict[str, str]) -> None:
    """Each credential is its own: the same value twice would let one party speak as another."""
    seen: dict[str, str] = {}
    for name, value in named.items():
        if not value:
            continue
        if len(value) < MIN_SECRET:
            raise ValueError(
                f"{name} must be at least {MIN_SECRET} characters; make a set of credentials "
                "with `python -m service certs DIR`"
            )
        if value in seen:
            raise ValueError(
                f"{name} equals {seen[value]}: each pair of parties needs its own credential "
                "(one secret shared by all lets any party speak as another); make a set with "
                "`python -m service certs DIR`"
            )
        seen[value] = name


# -- certificates ----------------------------------------------------------------------------


def role_of(cert: dict | None) -> str | None:
    """The privdigit role a verified peer certificate (`getpeercert()`) names, or None."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value in ROLES:
                return value
    return None


def expect_role(sock: Any, expected: str) -> None:
    """Refuse a TLS connection (`ssl.SSLSocket` or `SSLObject`) whose peer is not `expected`."""
    role = role_of(sock.getpeercert()) if sock is not None else None
    if role != expected:
        raise IdentityError(f"the other end presents {role or 'no role'}, not {expected}")


def client_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """How a party dials the others: verify them with `ca`, present its own certificate."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def server_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """A listener that requires a client certificate from `ca` (the lanes: parties only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# -- the client certificate inside the web apps (uvicorn) -------------------------------------


def scope_role(scope: dict) -> str | None:
    """The role of the verified client certificate of an ASGI connection, or None.

    Filled by `with_client_role` under the ASGI TLS extension's `client_cert_name`."""
    tls = scope.get("extensions", {}).get("tls") or {}
    return tls.get("privdigit_role")


def with_client_role(protocol: type) -> type:
    """A uvicorn protocol class that puts the client certificate's role into each scope.

    uvicorn verifies the certificate (`ssl_cert_reqs`, `ssl_ca_certs`) but does not pass it to
    the app; this reads it from the connection's TLS object once, when the connection opens."""

    class ClientRole(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().connection_made(transport, *args, **kwargs)
            tls = transport.get_extra_info("ssl_object")
            cert = tls.getpeercert() if tls is not None else None
            app: Callable = self.app
            role = role_of(cert)
            name = ",".join(f"{k}={v}" for rdn in (cert or {}).get("subject", ()) for k, v in rdn)

            async def tagged(scope, receive, send):  # type: ignore[no-untyped-def]
                ext = scope.setdefault("extensions", {})
                ext["tls"] = {"client_cert_name": name or None, "privdigit_role": role}
                return await app(scope, receive, send)

            self.app = tagged

    ClientRole.__name__ = f"ClientRole{protocol.__name__}"
    return ClientRole

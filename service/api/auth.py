"""Who may talk to whom: HMAC-SHA256 with a per-deployment secret shared by replicas and dealer.

- Replica -> dealer: each request carries `X-PrivDigit-Auth: hex(HMAC(secret, "dealer" | party |
  body))`; the dealer refuses anything else (401) and serves each (request id, party) once.
- Replica <-> replica: a mutual challenge-response when the peer stream opens. Each side sends
  a fresh 32-byte nonce; each proves knowledge of the secret with a MAC over both nonces, its
  role and the model versions it holds, so a stranger can neither join nor replay a handshake.
The secret never travels. Comparison of MACs is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

AUTH_HEADER = "X-PrivDigit-Auth"


class AuthError(PermissionError):
    """The other side could not prove it holds the deployment secret."""


def mac(secret: bytes, *parts: str | bytes) -> str:
    h = hmac.new(secret, b"privdigit/auth/v1", hashlib.sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(4, "big") + b)
    return h.hexdigest()


def verify(secret: bytes, tag: str | None, *parts: str | bytes) -> None:
    if not isinstance(tag, str) or not tag.isascii() or not tag:
        raise AuthError("authentication failed: wrong or missing deployment secret")
    if not hmac.compare_digest(tag, mac(secret, *parts)):
        raise AuthError("authentication failed: wrong or missing deployment secret")


def nonce() -> str:
    return secrets.token_hex(32)


def dealer_tag(secret: bytes, party: int, body: bytes) -> str:
    return mac(secret, "dealer", str(party), body)


def parse_secret(value: str) -> bytes:
    """The deployment secret from settings: at least 32 characters (e.g. `token_hex(32)`)."""
    if len(value) < 32:
        raise ValueError(
            "the deployment secret must be at least 32 characters; create one with "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return value.encode()

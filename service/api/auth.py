"""How a party proves it holds a credential: HMAC-SHA256 over length-prefixed parts.

Which credential each hop uses is `service.identity`'s business (one per pair of parties):
- Replica p -> dealer: each request carries `X-PrivDigit-Auth: hex(HMAC(key_p, "dealer" | p |
  body))` with the key only replica p and the dealer hold; the dealer serves (request id, p)
  once, and to the holder of key_p only.
- Replica <-> replica: a mutual challenge-response when the peer stream or a lane opens, with
  the key only the two replicas hold. Each side sends a fresh 32-byte nonce; each proves the key
  with a MAC over both nonces, its role and the model versions it holds, so a stranger can
  neither join nor replay a handshake.
- Operator -> replica (`/v1/admin/reload`): a MAC with the replica's admin key over its party,
  a time and a fresh nonce, so that a recorded call cannot be replayed (`admin_tag`).
No key ever travels. MACs are compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

AUTH_HEADER = "X-PrivDigit-Auth"


class AuthError(PermissionError):
    """The other side could not prove it holds the credential this hop needs."""


def mac(secret: bytes, *parts: str | bytes) -> str:
    h = hmac.new(secret, b"privdigit/auth/v1", hashlib.sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(4, "big") + b)
    return h.hexdigest()


def verify(secret: bytes, tag: str | None, *parts: str | bytes) -> None:
    if not isinstance(tag, str) or not tag.isascii() or not tag:
        raise AuthError("authentication failed: wrong or missing credential")
    if not hmac.compare_digest(tag, mac(secret, *parts)):
        raise AuthError("authentication failed: wrong or missing credential")


def nonce() -> str:
    return secrets.token_hex(32)


def dealer_tag(secret: bytes, party: int, body: bytes) -> str:
    return mac(secret, "dealer", str(party), body)


ADMIN_WINDOW_S = 60.0  # how far an admin call's time may be from the replica's clock


def admin_tag(secret: bytes, party: int, now: float | None = None) -> str:
    """The header value of one admin call: `time:nonce:mac`, usable once, for a minute."""
    stamp, n = f"{time.time() if now is None else now:.3f}", nonce()
    return f"{stamp}:{n}:{mac(secret, 'reload', str(party), stamp, n)}"


class AdminGuard:
    """Checks admin calls: the MAC, the time within `ADMIN_WINDOW_S`, each nonce once."""

    def __init__(self, secret: bytes, party: int) -> None:
        self._secret, self._party = secret, party
        self._seen: dict[str, float] = {}

    def check(self, header: str | None, now: float | None = None) -> None:
        if not self._secret:
            raise AuthError("this replica has no admin credential (PRIVDIGIT_ADMIN_SECRET)")
        now = time.time() if now is None else now
        stamp, n, tag = (
            (header or "").split(":", 2) if (header or "").count(":") == 2 else ("",) * 3
        )
        verify(self._secret, tag, "reload", str(self._party), stamp, n)
        try:
            when = float(stamp)
        except ValueError:
            raise AuthError("malformed admin call") from None
        if not abs(now - when) <= ADMIN_WINDOW_S:
            raise AuthError("stale admin call: its time is more than a minute off this clock")
        self._seen = {k: t for k, t in self._seen.items() if now - t <= 2 * ADMIN_WINDOW_S}
        if n in self._seen:
            raise AuthError("replayed admin call: this nonce was already used")
        self._seen[n] = now

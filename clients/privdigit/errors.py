"""The client's errors: one shallow hierarchy under `PrivDigitError`, one line each.

Transport failures (httpx, http.client) are translated into these at the transport boundary;
nothing else escapes the client on purpose.
"""

from __future__ import annotations

REPLICAS_ENV = "PRIVDIGIT_REPLICAS"
START_HINT = (
    "is the cluster running? start it with `python -m service up`, or point --replicas / "
    f"{REPLICAS_ENV} at the two replicas"
)


class PrivDigitError(Exception):
    """Base class of every error this client raises on purpose."""


class ImageError(PrivDigitError):
    """An input that is not a usable digit image: unreadable file, bad array or blank image."""

    def __init__(self, reason: str, source: str | None = None) -> None:
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason
        self.source = source


class ReplicaUnreachable(PrivDigitError):
    """A replica could not be reached (connection refused, DNS, TLS, timeout)."""

    def __init__(self, replica: str, reason: str) -> None:
        hint = START_HINT
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower():
            hint = "pass the replicas' CA certificate with --cacert PATH (or verify=PATH)"
        super().__init__(f"replica {replica} is unreachable ({reason}); {hint}")
        self.replica = replica
        self.reason = reason


class VersionMismatch(PrivDigitError):
    """The two replicas disagree on the model (version or fixed point), or answer for another."""


class BadResponse(PrivDigitError):
    """A replica answered something that does not follow the protocol."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, when the answer was an unexplained error


class ServiceError(PrivDigitError):
    """A replica answered with an error status and a well-formed `{"error": {...}}` body."""

    def __init__(self, replica: str, status: int, code: str, message: str) -> None:
        super().__init__(f"replica {replica} answered {status} {code}: {message}")
        self.replica = replica
        self.status = status
        self.code = code
        self.message = message

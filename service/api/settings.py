"""Settings for replica and dealer, from flags or environment (pydantic-settings).

Environment variables use the prefix `PRIVDIGIT_` (e.g. `PRIVDIGIT_PARTY=1`,
`PRIVDIGIT_MODEL=/models/current`, `PRIVDIGIT_PEER_SECRET=...`). Command-line flags win.
Credentials (`service.identity`) come from their own variables or from files in the role's
folder (`--credentials DIR/replica-0`, `PRIVDIGIT_CREDENTIALS`; `python -m service certs DIR`
makes the folders), so that Kubernetes or compose can mount them as secret files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service import identity
from service.mpc import protocols

PAIR_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # a replica pair's name


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRIVDIGIT_", extra="ignore")

    host: str = "127.0.0.1"
    secret: str = Field(
        default="",
        description="no longer accepted: one secret shared by all parties lets any of them "
        "speak as another (use per-pair credentials)",
        repr=False,
    )
    credentials: Path | None = Field(
        default=None,
        description="this role's folder from `python -m service certs DIR` (e.g. "
        "DIR/replica-0): credential files for the settings not given otherwise",
    )
    log_level: str = "info"
    tls_cert: Path | None = Field(default=None, description="PEM certificate to serve HTTPS")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(
        default=None, description="CA bundle to verify the peer replica and the dealer"
    )
    allow_http: bool = Field(
        default=False,
        description="serve (and, replicas: dial) plain HTTP (local use or a private network only)",
    )

    @property
    def mutual_tls(self) -> bool:
        """Serving TLS with a CA: clients' certificates are verified and their role read."""
        return self.tls_cert is not None and self.tls_ca is not None

    @field_validator("secret")
    @classmethod
    def _no_shared_secret(cls, v: str) -> str:
        if v:
            raise ValueError(
                "PRIVDIGIT_SECRET (one secret for all three parties) is no longer accepted: it "
                "lets any party speak as another. Make one credential per pair of parties with "
                "`python -m service certs DIR` and pass --credentials DIR/<role>"
            )
        return v

    # credential file -> setting, in this role's folder; the settings it must have
    _credential_files: ClassVar[dict[str, str]] = {}
    _required_credentials: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _credentials_from_files(cls, data: Any) -> Any:
        folder = data.get("credentials") if isinstance(data, dict) else None
        if folder is None:
            return data
        if not Path(folder).is_dir():
            raise ValueError(f"credentials folder {folder} not found")
        found = identity.read_credentials(Path(folder), cls._credential_files)
        return {**found, **{k: v for k, v in data.items() if v not in (None, "")}}

    @model_validator(mode="after")
    def _own_credentials(self) -> _Base:
        """Every required credential is there, and each is its own (`identity.check_distinct`)."""
        for name in self._required_credentials:
            if not getattr(self, name):
                raise ValueError(
                    f"{name} missing: set PRIVDIGIT_{name.upper()} or pass --credentials with "
                    "this role's folder from `python -m service certs DIR`"
                )
        identity.check_distinct({n: getattr(self, n) for n in self._credential_files.values()})
        return self

    def transport_problem(self) -> str | None:
        """Why this configuration must not start, or None."""
        if (self.tls_cert is None) != (self.tls_key is None):
            return "--tls-cert and --tls-key go together"
        for path in (self.tls_cert, self.tls_key, self.tls_ca):
            if path is not None and not Path(path).is_file():
                return f"{path} not found"
        if self.tls_cert is None and not self.allow_http:
            return (
                "no TLS certificate: pass --tls-cert and --tls-key (make development ones with "
                "`python -m service certs DIR`), or --allow-http for local use"
            )
        return None


class ReplicaSettings(_Base):
    _credential_files: ClassVar[dict[str, str]] = identity.REPLICA_KEYS
    _required_credentials: ClassVar[tuple[str, ...]] = ("peer_secret", "dealer_secret")
    party: int = Field(ge=0, le=1)
    pair: str = Field(
        default="0",
        pattern=PAIR_PATTERN,
        description="name of this replica's pair (both replicas of a pair share it; /v1/health "
        "reports it)",
    )
    peer_secret: str = Field(
        default="", repr=False, description="credential shared with the other replica only"
    )
    dealer_secret: str = Field(
        default="", repr=False, description="credential shared with the dealer only"
    )
    admin_secret: str = Field(
        default="",
        repr=False,
        description="this replica's operator credential for /v1/admin/reload (unset: refused)",
    )
    model: Path = Field(description="model directory written by `python -m training`")
    port: int = 8000
    peer_url: str = Field(
        default="ws://127.0.0.1:8001/v1/peer",
        description="party 0 dials this WebSocket URL of party 1; party 1 ignores it",
    )
    dealer_url: str = "http://127.0.0.1:8002"
    max_batch: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="most images per request and per protocol run; default 64, or the "
        "protocol's own cap where its dealer material is large (fss: 8)",
    )
    max_inflight: int = Field(default=32, ge=1, le=1024)
    pair_grace_s: float = Field(
        default=1.0,
        gt=0,
        description="when max_inflight requests are in flight, a new one may take the place of "
        "a share that has waited this long for its twin, from the client holding the most",
    )
    max_batches: int = Field(
        default=1,
        ge=1,
        le=64,
        description="protocol runs in flight; requests that arrive while all are busy queue "
        "and leave together as one batch. 1 (default): runs in one process share one "
        "interpreter lock, so a second concurrent run mostly delays the first (32 clients on 2 "
        "cores: 266 images/s with 1, 147 with 2)",
    )
    comparison: Literal[protocols.NAMES] = Field(  # type: ignore[valid-type]
        default=protocols.DEFAULT,
        description=f"comparison protocol, the same on both replicas: {protocols.help_text()}",
    )
    prefetch: int = Field(
        default=4,
        ge=0,
        le=64,
        description="dealer material kept ready for one-image runs (offline phase); 0: off",
    )
    prefetch_max_entries: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="most prefetched entries a replica holds (about 0.3 MB per image each); "
        "party 0 asks for no more, party 1 drops its oldest beyond it",
    )
    prefetch_max_age_s: float = Field(
        default=120.0,
        gt=0,
        description="prefetched entries older than this are dropped (party 1: plus the peer "
        "timeout, so that it never drops an entry before party 0 does)",
    )
    lanes: bool = Field(
        default=True,
        description="run protocol rounds on direct TCP lanes between the replicas, one per "
        "run slot (party 1 listens on lane_port); false: all rounds over the peer WebSocket",
    )
    lane_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="party 1: the TCP port of its lanes (0: any free port, announced to party 0 "
        "over the peer stream); party 0 ignores it",
    )
    peer_timeout_s: float = Field(default=10.0, gt=0)
    dealer_timeout_s: float = Field(default=10.0, gt=0)
    reload_poll_s: float = Field(
        default=1.0, ge=0, description="how often to look for a new model; 0 turns watching off"
    )
    scores_enabled: bool = Field(
        default=False, description="let clients ask for the logits' shares (output=scores)"
    )
    torch_threads: int = Field(default=1, ge=1)
    api_keys: list[str] = Field(
        default_factory=list,
        description="if set, /v1/predict and /v1/model need one of these in X-API-Key",
        repr=False,
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="page origins allowed to call this replica from a browser (exact match); "
        "none by default",
    )
    replay_window_s: float = Field(
        default=600.0,
        gt=0,
        description="a request id is refused (409) for this many seconds after its first use",
    )

    def transport_problem(self) -> str | None:
        """As for every server, and: without --allow-http, what this replica dials is TLS too.

        A replica that serves TLS but dials `http://` or `ws://` would send its dealer material
        (seeds, corrections) or the peer frames and lanes (openings) in the clear."""
        if problem := super().transport_problem():
            return problem
        if self.allow_http:
            return None
        dials = [("--dealer-url", self.dealer_url, "https://")]
        if self.party == 0:  # party 1 never dials its peer
            dials.append(("--peer-url", self.peer_url, "wss://"))
        for option, url, scheme in dials:
            if not url.startswith(scheme):
                return (
                    f"{option} {url} is not {scheme}: this replica serves TLS and would send "
                    f"{'its dealer material' if option == '--dealer-url' else 'its openings'} "
                    f"in the clear; use {scheme}, or --allow-http if plain traffic is intended"
                )
        return None

    @model_validator(mode="after")
    def _protocol_batch(self) -> ReplicaSettings:
        cap = protocols.get(self.comparison).max_batch
        if cap is not None and "max_batch" not in self.model_fields_set:
            self.max_batch = cap
        return self


class DealerSettings(_Base):
    _credential_files: ClassVar[dict[str, str]] = identity.DEALER_KEYS
    _required_credentials: ClassVar[tuple[str, ...]] = ("party0_secret", "party1_secret")
    port: int = 8002
    party0_secret: str = Field(default="", repr=False, description="credential of replica 0")
    party1_secret: str = Field(default="", repr=False, description="credential of replica 1")
    max_plan_elements: int = Field(
        default=50_000_000, description="refuse plans asking for more ring elements than this"
    )
    run_id_window_s: float = Field(
        default=600.0,
        gt=0,
        description="serve only run ids minted within this many seconds of the dealer's clock, "
        "and forget served ones as they leave it (bounded memory; the clocks must agree)",
    )

    def party_secrets(self) -> tuple[bytes, bytes]:
        return self.party0_secret.encode(), self.party1_secret.encode()

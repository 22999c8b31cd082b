"""The local cluster: dealer and both replicas as three processes on one machine.

`Cluster` starts them with fresh credentials (one key per pair of parties and, with TLS, one
certificate per role: `service.identity`), waits until both replicas are ready and
stops them all on exit; `python -m service up` wraps it for people, tests and benchmarks use it
directly (with free ports). Each process logs (JSON) into its own file under `log_dir`.

`Pairs` runs several replica pairs side by side (`python -m service up --pairs N`): one
`Cluster` each, so each pair has its own dealer and its own credentials (a dealer serves one
pair's run ids; sharing one would let a replica of one pair ask for another pair's material).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"
DEFAULT_PORTS = (8000, 8001, 8002)


class ClusterError(RuntimeError):
    """A process of the cluster failed to start or become ready."""


def free_ports(n: int) -> tuple[int, ...]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = tuple(s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    return ports


@dataclass
class Cluster:
    model: Path | tuple[Path, Path] = DEFAULT_MODEL  # one directory, or one per party
    ports: tuple[int, int, int] = DEFAULT_PORTS
    host: str = "127.0.0.1"
    scores: bool = False
    log_dir: Path | None = None
    replica_args: tuple[str, ...] = ()
    role_args: dict[str, tuple[str, ...]] = field(default_factory=dict)  # last: they override
    web_port: int | None = None  # also serve the web page (its own origin) on this port
    tls: bool = False  # HTTPS/WSS everywhere with fresh development certificates
    api_keys: tuple[str, ...] = ()
    # Several hosts (`service.netrig`): per role, a command prefix (e.g. `ip netns exec NS`) and
    # the address it listens on; per (from, to) role pair, the host `from` dials `to` at ("client"
    # for the replica and dealer URLs of `replica_urls` and `dealer_url`); `host` otherwise.
    wrap: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bind: dict[str, str] = field(default_factory=dict)
    routes: dict[tuple[str, str], str] = field(default_factory=dict)
    cert_hosts: tuple[str, ...] = ()  # names and addresses the TLS certificates also name
    pair: str = "0"  # the pair's name, reported in each replica's /v1/health
    web_pairs: tuple[tuple[str, str], ...] = ()  # the pairs the page may use (default: this one)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def reach(self, src: str, dst: str) -> str:
        """The host role `src` dials role `dst` at."""
        return self.routes.get((src, dst), self.host)

    @property
    def replica_urls(self) -> tuple[str, str]:
        return (
            f"{self.scheme}://{self.reach('client', 'replica0')}:{self.ports[0]}",
            f"{self.scheme}://{self.reach('client', 'replica1')}:{self.ports[1]}",
        )

    @property
    def web_url(self) -> str | None:
        return None if self.web_port is None else f"{self.scheme}://{self.host}:{self.web_port}"

    @property
    def credentials(self) -> Path:
        """The folder of one folder per role (`python -m service certs`); made by `start`."""
        assert self.log_dir is not None, "start the cluster first"
        return self.log_dir / "credentials"

    def key(self, role: str, name: str) -> bytes:
        """One of `role`'s credentials, e.g. `key("replica-0", "admin.key")` (for tests)."""
        return (self.credentials / role / name).read_text().strip().encode()

    @property
    def ca(self) -> Path | None:
        """The development CA that signs every party's certificate (TLS only)."""
        return (self.credentials / "ca.pem") if self.tls and self.log_dir else None

    @property
    def verify(self) -> bool | ssl.SSLContext:
        """What an HTTP client should pass as `verify` to trust this cluster."""
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else True

    def _serve_tls_args(self, role: str) -> list[str]:
        """What `role` (replica-0, replica-1, dealer, web) needs to serve this transport."""
        if not self.tls:
            return ["--allow-http"]
        folder = self.credentials / role
        return ["--tls-cert", str(folder / "cert.pem"), "--tls-key", str(folder / "key.pem")]

    def _transport_args(self, role: str) -> list[str]:
        """Serving args plus, with TLS, the CA that verifies the other parties; and the role's
        own credentials."""
        ca = ["--tls-ca", str(self.credentials / role / "ca.pem")] if self.tls else []
        creds = ["--credentials", str(self.credentials / role)]
        return [*self._serve_tls_args(role), *ca, *creds]

    @property
    def roles(self) -> tuple[str, ...]:
        return ("dealer", "replica1", "replica0") + (("web",) if self.web_port else ())

    @property
    def dealer_url(self) -> str:
        return self._dealer_url("client")

    def _dealer_url(self, src: str) -> str:
        return f"{self.scheme}://{self.reach(src, 'dealer')}:{self.ports[2]}"

    def _env(self) -> dict[str, str]:
        # each process takes its credentials from its own folder, never from this environment
        env = {k: v for k, v in os.environ.items() if not k.endswith("_SECRET")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        return env

    def command(self, role: str) -> list[str]:
        """The command line of `role`, ending with its `role_args` (argparse: last one wins)."""
        return [*self.wrap.get(role, ()), *self._command(role), *self.role_args.get(role, ())]

    def _command(self, role: str) -> list[str]:
        base = [sys.executable, "-m", "service"]
        if role == "dealer":
            port = str(self.ports[2])
            return [*base, "dealer", "--host", self.bind.get(role, self.host), "--port", port,
                    *self._transport_args("dealer")]  # fmt: skip
        if role == "web":
            tls = self._serve_tls_args("web") if self.tls else []
            pairs = [f"--replicas={u0},{u1}" for u0, u1 in self.web_pairs or [self.replica_urls]]
            return [*base, "web", "--host", self.host, "--port", str(self.web_port),
                    *pairs, *tls]  # fmt: skip
        party = int(role[-1])
        model = self.model[party] if isinstance(self.model, tuple) else self.model
        peer = self.reach(role, "replica1")
        cmd = [
            *base,
            "replica",
            "--party",
            str(party),
            "--pair",
            self.pair,
            "--model",
            str(model),
            "--host",
            self.bind.get(role, self.host),
            "--port",
            str(self.ports[party]),
            "--dealer-url",
            self._dealer_url(role),
            "--peer-url",
            f"{'wss' if self.tls else 'ws'}://{peer}:{self.ports[1]}/v1/peer",
            *self._transport_args(f"replica-{party}"),
            *self.replica_args,
        ]
        for key in self.api_keys:
            cmd += ["--api-key", key]
        if self.web_url:
            cmd += ["--cors-origin", self.web_url]
        return [*cmd, "--scores"] if self.scores else cmd

    def start_process(self, role: str) -> None:
        """(Re)start one of `dealer`, `replica0`, `replica1`."""
        assert self.log_dir is not None
        log = open(self.log_dir / f"{role}.log", "ab")  # noqa: SIM115 (the child owns it)
        self.procs[role] = subprocess.Popen(
            self.command(role), env=self._env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
        log.close()

    def stop_process(self, role: str, *, kill: bool = False) -> None:
        proc = self.procs.get(role)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def prepare(self) -> Cluster:
        """The log folder and every role's credentials (and certificates, with TLS)."""
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="privdigit-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not (self.credentials / "dealer" / "party-0.key").exists():
            from service.identity import make_credentials

            make_credentials(self.credentials)
        if self.tls and not (self.credentials / "ca.pem").exists():
            from service.devcerts import make_dev_certs

            make_dev_certs(self.credentials, hosts=self.cert_hosts, days=2)
        return self

    def start(self, *, timeout: float = 60.0) -> Cluster:
        self.prepare()
        for role in self.roles:
            self.start_process(role)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = [f"{u}/v1/ready" for u in self.replica_urls] + [f"{self.dealer_url}/v1/health"]
        if self.web_url:
            pending.append(f"{self.web_url}/config.json")
        while pending:
            for role, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{role} exited with code {proc.returncode}:\n{self.tail(role)}"
                    )
            for url in list(pending):
                try:
                    if httpx.get(url, timeout=2, verify=self.verify).status_code == 200:
                        pending.remove(url)
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"not ready after {timeout:g} s: {pending}\n{self.tails()}")
            if pending:
                time.sleep(0.1)

    def tail(self, role: str, lines: int = 20) -> str:
        path = (self.log_dir or Path(".")) / f"{role}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def tails(self) -> str:
        return "\n".join(f"--- {r}\n{self.tail(r)}" for r in self.roles)

    def stop(self) -> None:
        for role in ("web", "replica0", "replica1", "dealer"):
            self.stop_process(role)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Pairs:
    """Several replica pairs on this machine: one `Cluster` (dealer, two replicas) per pair.

    Pair k is named str(k) and listens on `ports` plus 10 k (or `pair_ports[k]`); the web page
    (pair 0's, when `web_port` is given) knows every pair, and every replica lets it call.
    """

    n: int
    model: Path | tuple[Path, Path] = DEFAULT_MODEL
    ports: tuple[int, int, int] = DEFAULT_PORTS
    scores: bool = False
    log_dir: Path | None = None
    replica_args: tuple[str, ...] = ()
    web_port: int | None = None
    pair_ports: tuple[tuple[int, int, int], ...] = ()  # instead of `ports` + 10 k (tests)
    clusters: list[Cluster] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("at least one pair")
        for k in range(self.n):
            ports = self.pair_ports[k] if self.pair_ports else tuple(p + 10 * k for p in self.ports)
            log_dir = None if self.log_dir is None else self.log_dir / f"pair-{k}"
            cluster = Cluster(
                model=self.model,
                ports=(ports[0], ports[1], ports[2]),
                scores=self.scores,
                log_dir=log_dir,
                replica_args=self.replica_args,
                pair=str(k),
                web_port=self.web_port if k == 0 else None,
            )
            self.clusters.append(cluster)
        web = self.clusters[0].web_url
        self.clusters[0].web_pairs = self.replica_pairs
        if web:
            for c in self.clusters[1:]:
                c.replica_args = (*c.replica_args, "--cors-origin", web)

    @property
    def replica_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(c.replica_urls for c in self.clusters)

    @property
    def web_url(self) -> str | None:
        return self.clusters[0].web_url

    def start(self, *, timeout: float = 60.0) -> Pairs:
        try:
            for c in self.clusters:
                c.prepare()
                for role in c.roles:
                    c.start_process(role)
            for c in self.clusters:
                c.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for c in self.clusters:
            c.stop()

    def __enter__(self) -> Pairs:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

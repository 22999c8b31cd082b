"""Three hosts and a client on one machine: each party in its own network namespace.

`NetRig` (root only: `ip netns`) makes one namespace per party (dealer, replica0, replica1,
client) and a hub. Each party has one veth to the hub, address 10.77.K.2/24 (K = 1 dealer,
2 replica0, 3 replica1, 4 client), and no route: it reaches only its own link, where the hub
holds one address per other party, 10.77.K.(10+J) for party J. Nothing forwards packets in the
hub; the relay (`service.relay`, in the hub) listens on those addresses and carries each
connection to the party's own address, so every byte between two parties crosses the relay of
their link and nothing leaves the namespaces. The relay delays each chunk by half the link's
round-trip time (with jitter and loss if asked); where the kernel has netem (`netem_available`),
the rig delays the hub's veths with netem instead and the relay only forwards.
A per-namespace hosts file (`/etc/netns/NS/hosts`, which `ip netns exec` mounts over
/etc/hosts) names the parties (`replica-1.privdigit.test`), so the processes dial each other by
host name; the client, a thread of this process (`run`), dials by address. The rig's cluster
uses TLS with certificates that name both.

Links: `replicas` (replica0 -> replica1: the peer stream and the lanes), `dealer0`, `dealer1`
(each replica -> dealer), `client0`, `client1` (client -> each replica) and `probe` (client ->
dealer, for start-up only). `link(name, "down" | "stall" | "up")` cuts, stalls or restores one.

    with NetRig(rtt_ms=10, client_rtt_ms=1) as rig:
        cluster = rig.cluster(model=DEFAULT_MODEL)
        rig.run("client", cluster.start)
        try:
            labels = rig.run("client", lambda: ...)  # e.g. a PrivDigitClient
        finally:
            cluster.stop()

Every namespace, veth and hosts file the rig made is removed on exit, also when start-up fails;
`remove_leftovers()` removes those of rigs whose process died.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from service.cluster import REPO, Cluster

T = TypeVar("T")
PREFIX = "pdrig"  # every namespace of a rig: pdrig<pid>x<hex>-<role>
PARTIES = ("dealer", "replica0", "replica1", "client")
_INDEX = {role: k for k, role in enumerate(PARTIES, 1)}
NAMES = {"dealer": "dealer", "replica0": "replica-0", "replica1": "replica-1", "client": "client"}
DOMAIN = "privdigit.test"
PORTS = {"replica0": 8000, "replica1": 8001, "dealer": 8002, "lanes": 8003}
_CLONE_NEWNET = 0x40000000


class RigError(RuntimeError):
    """The rig cannot be built here (not root, no `ip`), or a command of it failed."""


def address(role: str) -> str:
    """The party's own address (on its link to the hub)."""
    return f"10.77.{_INDEX[role]}.2"


def view(src: str, dst: str) -> str:
    """The address at which `src` reaches `dst` (the relay's, on `src`'s link)."""
    return f"10.77.{_INDEX[src]}.{10 + _INDEX[dst]}"


def host_name(role: str) -> str:
    return f"{NAMES[role]}.{DOMAIN}"


@dataclass(frozen=True)
class LinkSpec:
    name: str
    src: str  # who dials
    dst: str  # who listens
    ports: tuple[int, ...]


LINKS = (
    LinkSpec("replicas", "replica0", "replica1", (PORTS["replica1"], PORTS["lanes"])),
    LinkSpec("dealer0", "replica0", "dealer", (PORTS["dealer"],)),
    LinkSpec("dealer1", "replica1", "dealer", (PORTS["dealer"],)),
    LinkSpec("client0", "client", "replica0", (PORTS["replica0"],)),
    LinkSpec("client1", "client", "replica1", (PORTS["replica1"],)),
    LinkSpec("probe", "client", "dealer", (PORTS["dealer"],)),
)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RigError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _tc(namespace: str, *args: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", namespace, "tc", *args], capture_output=True)
    if r.returncode != 0:
        raise RigError(f"tc {' '.join(args)}: {r.stderr.decode(errors='replace').strip()}")


def unavailable() -> str | None:
    """Why a rig cannot be built here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the rig's tests as root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}-probe"
    try:
        _ip("netns", "add", name)
    except RigError as exc:
        return f"cannot create a network namespace: {exc}"
    with contextlib.suppress(RigError):
        _ip("netns", "delete", name)
    return None


def netem_available() -> bool:
    """Whether this kernel delays packets with `tc ... netem` (tried in a throwaway namespace)."""
    name = f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}-netem"
    try:
        _ip("netns", "add", name)
    except RigError:
        return False
    try:
        _ip("-n", name, "link", "add", "t0", "type", "dummy")
        _tc(name, "qdisc", "add", "dev", "t0", "root", "netem", "delay", "1ms")
        return True
    except (RigError, OSError):
        return False
    finally:
        with contextlib.suppress(RigError):
            _ip("netns", "delete", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Delete the namespaces and hosts files of rigs whose process is gone; their names."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.startswith(PREFIX)]
    names += [p.name for p in Path("/etc/netns").glob(f"{PREFIX}*")]
    gone = []
    for name in sorted(set(names)):
        pid = name[len(PREFIX) :].split("x", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        with contextlib.suppress(RigError):
            _ip("netns", "delete", name)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        gone.append(name)
    return gone


def enter(namespace: str) -> None:
    """Move the calling thread (and the threads it starts later) into `namespace`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise RigError(f"setns({namespace}): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


@dataclass
class NetRig:
    """Namespaces, links and the relay; a context manager (see the module docstring)."""

    rtt_ms: float = 0.0  # between the replicas
    client_rtt_ms: float = 0.0  # between the client and each replica
    dealer_rtt_ms: float | None = None  # between each replica and the dealer (None: rtt_ms)
    jitter_ms: float = 0.0  # added to each chunk's one-way delay, uniform in [0, jitter]
    loss: float = 0.0  # relay: chance a chunk waits one retransmission timeout; netem: loss
    delay: Literal["auto", "relay", "netem"] = "auto"
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}")
    used: str = ""  # "relay" or "netem", once started
    _made: list[str] = field(default_factory=list)
    _relay: subprocess.Popen | None = None
    _dir: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def rtt(self, link: LinkSpec) -> float:
        if link.name == "replicas":
            return self.rtt_ms
        if link.src == "client":
            return self.client_rtt_ms
        return self.rtt_ms if self.dealer_rtt_ms is None else self.dealer_rtt_ms

    # -- building and tearing down -------------------------------------------------------------

    def start(self) -> NetRig:
        reason = unavailable()
        if reason is not None:
            raise RigError(reason)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        if self.delay == "netem" or self.delay == "auto":
            has_netem = netem_available()
            if self.delay == "netem" and not has_netem:
                raise RigError("this kernel has no netem (tc ... netem); use delay='relay'")
            self.used = "netem" if has_netem else "relay"
        else:
            self.used = "relay"
        hub = self.ns("hub")
        for role in ("hub", *PARTIES):
            _ip("netns", "add", self.ns(role))
            self._made.append(self.ns(role))
            _ip("-n", self.ns(role), "link", "set", "lo", "up")
        for role in PARTIES:
            k = _INDEX[role]
            _ip("link", "add", f"h{k}", "netns", hub, "type", "veth", "peer", "name", "eth0",
                "netns", self.ns(role))  # fmt: skip
            _ip("-n", hub, "addr", "add", f"10.77.{k}.1/24", "dev", f"h{k}")
            for other in PARTIES:
                if other != role:
                    _ip("-n", hub, "addr", "add", f"{view(role, other)}/32", "dev", f"h{k}")
            _ip("-n", self.ns(role), "addr", "add", f"{address(role)}/24", "dev", "eth0")
            _ip("-n", hub, "link", "set", f"h{k}", "up")
            _ip("-n", self.ns(role), "link", "set", "eth0", "up")
            self._write_hosts(role)
        if self.used == "netem":
            self._netem()
        self._start_relay()

    def _write_hosts(self, role: str) -> None:
        folder = Path("/etc/netns") / self.ns(role)
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", f"{address(role)} {host_name(role)}"]
        lines += [f"{view(role, o)} {host_name(o)}" for o in PARTIES if o != role]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def set_rtt(self, rtt_ms: float) -> None:
        """Change the round-trip time between the replicas (and, unless `dealer_rtt_ms` is set,
        to the dealer) on the running rig; open connections keep going."""
        self.rtt_ms = rtt_ms
        if self.used == "netem":
            self._netem(change=True)
            return
        for link in LINKS:
            if link.src != "client":
                self.link(link.name, f"delay {self.rtt(link)}")

    def _netem(self, *, change: bool = False) -> None:
        """Each link's delay on the hub's veths: packets the relay writes towards a party leave
        from the address of the link they belong to, so a prio qdisc with one netem band per
        peer (matched by source address) delays each link by half its round trip each way."""
        hub = self.ns("hub")
        for role in PARTIES:
            dev = f"h{_INDEX[role]}"
            run = functools.partial(_tc, hub)
            if not change:
                run("qdisc", "add", "dev", dev, "root", "handle", "1:", "prio", "bands", "6",
                "priomap", *["0"] * 16)  # fmt: skip
            for link in LINKS:
                if role not in (link.src, link.dst):
                    continue
                other = link.dst if role == link.src else link.src
                band = _INDEX[other] + 1
                netem = ["delay", f"{self.rtt(link) / 2}ms"]
                if self.jitter_ms:
                    netem.append(f"{self.jitter_ms}ms")
                if self.loss:
                    netem += ["loss", f"{100 * self.loss}%"]
                verb = "change" if change else "add"
                run("qdisc", verb, "dev", dev, "parent", f"1:{band}", "netem", *netem)
                if not change:
                    run("filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                    "u32", "match", "ip", "src", f"{view(role, other)}/32", "flowid",
                    f"1:{band}")  # fmt: skip

    def _start_relay(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        relay = self.used == "relay"
        config = {
            "links": [
                {
                    "name": link.name,
                    "rtt_ms": self.rtt(link) if relay else 0.0,
                    "jitter_ms": self.jitter_ms if relay else 0.0,
                    "loss": self.loss if relay else 0.0,
                    "routes": [
                        [
                            view(link.src, link.dst),
                            port,
                            address(link.dst),
                            port,
                            view(link.dst, link.src),
                        ]
                        for port in link.ports
                    ],
                }
                for link in LINKS
            ]
        }
        path = self._dir / "relay.json"
        path.write_text(json.dumps(config))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self._relay = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns("hub"),
                sys.executable,
                "-m",
                "service.relay",
                str(path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert self._relay.stdout is not None
        line = self._relay.stdout.readline().strip()
        if line != "ready":
            raise RigError(f"the relay did not start (said {line!r})")

    def close(self) -> None:
        if self._relay is not None:
            with contextlib.suppress(OSError):
                self._relay.kill()
            self._relay.wait(10)
            self._relay = None
        for name in reversed(self._made):
            with contextlib.suppress(RigError):
                _ip("netns", "delete", name)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        self._made.clear()
        with contextlib.suppress(OSError):  # only if no other rig or tool has files there
            Path("/etc/netns").rmdir()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> NetRig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- using it ------------------------------------------------------------------------------

    def link(self, name: str, command: str) -> str:
        """`down`, `stall`, `up` or `refused` one link, or `delay MS`, `loss P` (see
        `service.relay`); the relay's answer after `ok` (a count for `refused`)."""
        if self._relay is None or self._relay.stdin is None or self._relay.stdout is None:
            raise RigError("the rig is not running")
        with self._lock:
            verb, *rest = command.split()
            self._relay.stdin.write(" ".join([verb, name, *rest]) + "\n")
            self._relay.stdin.flush()
            answer = self._relay.stdout.readline().strip()
        if answer.split(" ", 1)[0] != "ok":
            raise RigError(f"relay: {answer or 'no answer'}")
        return answer[3:]

    def run(self, role: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a thread inside `role`'s namespace (threads it starts stay there)."""
        out: dict[str, Any] = {}

        def target() -> None:
            try:
                enter(self.ns(role))
                out["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller
                out["error"] = exc

        thread = threading.Thread(target=target, name=f"netrig-{role}", daemon=True)
        thread.start()
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def cluster(self, **kwargs: Any) -> Cluster:
        """A `Cluster` (TLS) whose three processes run in their namespaces: replicas and dealer
        dial each other by host name, `replica_urls` are the client's view (addresses)."""
        routes = {(link.src, link.dst): host_name(link.dst) for link in LINKS}
        routes |= {("client", dst): view("client", dst) for dst in ("replica0", "replica1")}
        routes[("client", "dealer")] = view("client", "dealer")
        cert_hosts = [host_name(r) for r in PARTIES if r != "client"]
        cert_hosts += [view(s, d) for s in PARTIES for d in PARTIES if s != d]
        role_args = dict(kwargs.pop("role_args", {}))
        role_args["replica1"] = ("--lane-port", str(PORTS["lanes"]), *role_args.get("replica1", ()))
        return Cluster(
            ports=(PORTS["replica0"], PORTS["replica1"], PORTS["dealer"]),
            tls=True,
            wrap={r: ("ip", "netns", "exec", self.ns(r)) for r in PARTIES},
            bind={r: address(r) for r in PARTIES},
            routes=routes,
            cert_hosts=tuple(cert_hosts),
            role_args=role_args,
            **kwargs,
        )

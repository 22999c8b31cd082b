"""`python -m service`: run a replica, the dealer, or the whole local cluster.

    python -m service up [--model DIR] [--ports 8000,8001,8002] [--scores]
    python -m service replica --party 0|1 --model DIR [--port P] [--peer-url WS] [--dealer-url URL]
    python -m service dealer [--port 8002]
    python -m service demo                    # start, classify clients/samples/*.png, stop
    python -m service certs DIR               # development TLS certificates (CA + server)
    python -m service k8s-secrets --model DIR # the files of deploy/k8s's Secrets, per party
    python -m service web [--port 8003]       # the web page, from its own origin
    python -m service openapi [--check]       # print (or check) openapi.yaml from the app
    python -m service reload URL              # ask a replica to load its model directory now
    python -m service protocols [--json]      # each comparison protocol's rounds and bytes

Replica and dealer also read `PRIVDIGIT_*` environment variables (flags win). Each party needs
its own credentials: one key per pair of parties, in the role's folder that `certs` writes
(`--credentials DIR/replica-0`; `up` makes a fresh set).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from service.memory import keep_freed_memory
from service.mpc import protocols

OPENAPI_FILE = Path(__file__).resolve().parent.parent / "openapi.yaml"
PROTOCOLS_DOC = OPENAPI_FILE.parent / "docs" / "protocols.md"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _settings(cls, given: dict):
    from pydantic import ValidationError

    try:
        return cls(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SystemExit(_fail(f"{where}: {first['msg']}")) from None


def _serve(
    app, host: str, port: int, log_level: str, tls_cert=None, tls_key=None, tls_ca=None
) -> None:
    """Run `app` under uvicorn; on SIGTERM/SIGINT drain first where the app can (replicas).

    With `tls_ca`, clients may present a certificate from that CA (verified; optional, since
    end users and probes have none), and the app sees its role (`service.identity`)."""
    import asyncio
    import ssl

    import uvicorn
    from uvicorn.config import HTTP_PROTOCOLS, WS_PROTOCOLS
    from uvicorn.importer import import_from_string

    from service.api.transport.peer import MAX_FRAME
    from service.identity import with_client_role

    tls: dict = {}
    if tls_cert is not None:
        tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
    if tls_cert is not None and tls_ca is not None:
        tls |= {
            "ssl_ca_certs": str(tls_ca),
            "ssl_cert_reqs": ssl.CERT_OPTIONAL,
            "http": with_client_role(import_from_string(HTTP_PROTOCOLS["auto"])),
            "ws": with_client_role(import_from_string(WS_PROTOCOLS["auto"])),
        }
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning" if log_level == "info" else log_level,
        access_log=False,
        ws_max_size=MAX_FRAME,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=30,
        **tls,
    )
    drain = getattr(getattr(app.state, "replica", None), "drain", None)

    class Server(uvicorn.Server):
        """A first signal drains (new requests get 503, in-flight ones finish); a second quits."""

        draining = False

        def handle_exit(self, sig, frame) -> None:
            if drain is None or self.draining:
                return super().handle_exit(sig, frame)
            self.draining = True
            loop = asyncio.get_event_loop()

            async def drain_then_exit() -> None:
                await drain()
                super(Server, self).handle_exit(sig, frame)

            loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_exit()))

    Server(config).run()


def _transport(a: argparse.Namespace) -> dict:
    return {
        "tls_cert": a.tls_cert,
        "tls_key": a.tls_key,
        "tls_ca": a.tls_ca,
        "allow_http": True if a.allow_http else None,
    }


def _add_transport(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (python -m service certs)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="CA bundle that verifies the peer replica and the dealer")
    p.add_argument("--allow-http", action="store_true", help="serve plain HTTP (local use only)")


def _add_comparison(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--comparison",
        choices=protocols.NAMES,
        default=protocols.DEFAULT,
        help=f"comparison protocol of both replicas: {protocols.help_text()}. Rounds and bytes: "
        "python -m service protocols",
    )


def cmd_replica(a: argparse.Namespace) -> int:
    from service.api.observability import setup_logging
    from service.api.replica_app import create_replica_app
    from service.api.settings import ReplicaSettings
    from service.store import StoreError, load_share

    s = _settings(
        ReplicaSettings,
        {
            "party": a.party,
            "pair": a.pair,
            "model": a.model,
            "host": a.host,
            "port": a.port,
            "peer_url": a.peer_url,
            "dealer_url": a.dealer_url,
            "max_batch": a.max_batch,
            "max_inflight": a.max_inflight,
            "max_batches": a.max_batches,
            "comparison": a.comparison,
            "prefetch": a.prefetch,
            "prefetch_max_entries": a.prefetch_max_entries,
            "prefetch_max_age_s": a.prefetch_max_age,
            "lanes": a.lanes,
            "lane_port": a.lane_port,
            "scores_enabled": True if a.scores else None,
            "reload_poll_s": a.reload_poll,
            "secret": a.secret,
            "credentials": a.credentials,
            "peer_timeout_s": a.peer_timeout,
            "cors_origins": a.cors_origin,
            "api_keys": a.api_key,
            **_transport(a),
        },
    )
    if problem := s.transport_problem():
        return _fail(problem)
    try:
        load_share(
            s.model, s.party, s.comparison
        )  # fail fast with a clear message; the app reloads itself
    except StoreError as exc:
        return _fail(str(exc))
    setup_logging(s.log_level)
    _serve(create_replica_app(s), s.host, s.port, s.log_level, s.tls_cert, s.tls_key, s.tls_ca)
    return 0


def cmd_dealer(a: argparse.Namespace) -> int:
    from service.api.dealer_app import create_dealer_app
    from service.api.observability import setup_logging
    from service.api.settings import DealerSettings

    given = {"host": a.host, "port": a.port, "secret": a.secret, "credentials": a.credentials}
    s = _settings(DealerSettings, {**given, **_transport(a)})
    if problem := s.transport_problem():
        return _fail(problem)
    setup_logging(s.log_level)
    _serve(create_dealer_app(s), s.host, s.port, s.log_level, s.tls_cert, s.tls_key, s.tls_ca)
    return 0


def cmd_web(a: argparse.Namespace) -> int:
    from service.api.web_app import WEB_DIR, create_web_app

    pairs = []
    for text in a.replicas or ["http://127.0.0.1:8000,http://127.0.0.1:8001"]:
        for item in text.split(";"):
            pair = tuple(u.strip().rstrip("/") for u in item.split(","))
            if len(pair) != 2 or not all(u.startswith(("http://", "https://")) for u in pair):
                return _fail(
                    "--replicas must be two URLs: http(s)://HOST:PORT,http(s)://HOST:PORT "
                    "(repeat it, or separate pairs with ';', for several pairs)"
                )
            pairs.append(pair)
    if not (WEB_DIR / "index.html").is_file():
        return _fail(f"{WEB_DIR}/index.html not found")
    if (a.tls_cert is None) != (a.tls_key is None):
        return _fail("--tls-cert and --tls-key go together")
    _serve(create_web_app(pairs), a.host, a.port, "info", a.tls_cert, a.tls_key)  # type: ignore[arg-type]
    return 0


def cmd_certs(a: argparse.Namespace) -> int:
    from service import identity
    from service.devcerts import make_dev_certs
    from service.identity import make_credentials
    from service.k8s import SecretsError, parse_hosts

    out = Path(a.directory)
    if out.exists() and any(out.iterdir()) and not a.force:
        return _fail(f"{out} is not empty; pick a new folder or pass --force to replace it")
    given = a.host or []
    try:  # ROLE=NAME: that role's certificate only; NAME: every role's
        role_hosts = parse_hosts([h for h in given if "=" in h], identity.ROLES)
    except SecretsError as exc:
        return _fail(str(exc))
    shared = tuple(h for h in given if "=" not in h)
    make_dev_certs(out, shared, days=a.days, role_hosts=role_hosts)
    make_credentials(out)
    print(
        f"wrote one folder per role under {out}: replica-0, replica-1, dealer (each: cert.pem, "
        f"key.pem, ca.pem and its own pairwise keys; run each party with --credentials "
        f"{out}/ROLE, plus --tls-cert/--tls-key/--tls-ca from that folder for TLS), web (the "
        f"page's certificate); {out}/ca.pem for clients (--cacert). Keep {out}/ca-key.pem "
        "away from every party."
    )
    return 0


def cmd_k8s_secrets(a: argparse.Namespace) -> int:
    from service.k8s import SecretsError, parse_hosts, write_secrets

    try:
        hosts = parse_hosts(a.host or [])
        done = write_secrets(
            Path(a.overlays),
            Path(a.ca),
            model=Path(a.model) if a.model else None,
            hosts=hosts,
            days=a.days,
            force=a.force,
        )
    except SecretsError as exc:
        return _fail(str(exc))
    print(("issued credentials in" if done.issued else "reused the credentials in") + f" {a.ca}")
    for folder, names in done.files.items():
        print(f"wrote {Path(a.overlays) / folder}: {', '.join(names)}")
    print(
        f"hand each organisation only its overlay's secrets/ folder; keep {a.ca} (it holds the "
        "CA's private key and every party's keys) with the signer, never in a cluster"
    )
    return 0


def _ports(text: str) -> tuple[int, int, int]:
    try:
        ports = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("ports must be three integers: R0,R1,DEALER") from None
    if len(ports) != 3 or len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError("ports must be three distinct ports: R0,R1,DEALER")
    return ports  # type: ignore[return-value]


def model_summary(directory: Path) -> str:
    """One line on the served model: its version and how it was made (manifest provenance)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return f"{directory} (no readable manifest)"
    line = f"version {manifest.get('model_version')}"
    origin = manifest.get("provenance")
    if not isinstance(origin, dict):
        note = manifest.get("note") or "no provenance recorded"
        return f"{line}; {note}"
    line += f", made by `{origin.get('command')}`"
    acc, private = origin.get("plaintext_test_accuracy"), origin.get("private_test_accuracy")
    if isinstance(acc, float):
        line += f"; test accuracy {100 * acc:.2f}%"
    if isinstance(private, float):
        line += f", privately {100 * private:.2f}% on {origin.get('test_images')} images"
    return line


def cmd_up(a: argparse.Namespace) -> int:
    from service.cluster import DEFAULT_MODEL, REPO, Cluster, ClusterError, Pairs
    from service.store import StoreError, load_share

    model = Path(a.model) if a.model else DEFAULT_MODEL
    for party in (0, 1):
        try:
            load_share(model, party)
        except StoreError as exc:
            return _fail(f"{exc} (train one with `python -m training --out DIR`)")
    if not 1 <= a.pairs <= 16:
        return _fail("--pairs must be between 1 and 16")
    if a.pairs > 1 and a.tls:
        return _fail("--tls serves one pair only here (each pair would have its own dev CA)")
    web_port = None if a.no_web or not (REPO / "web" / "index.html").is_file() else a.web_port
    log_dir = Path(a.log_dir) if a.log_dir else None
    replica_args = ("--comparison", a.comparison)
    if a.pairs > 1:
        group: Cluster | Pairs = Pairs(a.pairs, model=model, ports=a.ports, scores=a.scores,
                                       log_dir=log_dir, replica_args=replica_args,
                                       web_port=web_port)  # fmt: skip
        clusters = group.clusters
    else:
        group = Cluster(model=model, ports=a.ports, scores=a.scores, web_port=web_port,
                        tls=a.tls, log_dir=log_dir, replica_args=replica_args)  # fmt: skip
        clusters = [group]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    what = "dealer and two replicas" if a.pairs == 1 else f"{a.pairs} pairs (dealer, two replicas)"
    print(f"starting {what} with the model in {model} ...", flush=True)
    try:
        group.start(timeout=a.ready_timeout)
    except ClusterError as exc:
        return _fail(str(exc))
    for cluster in clusters:
        r0, r1 = cluster.replica_urls
        pair = "" if a.pairs == 1 else f"pair {cluster.pair} "
        print(f"{pair}replica 0: {r0}\n{pair}replica 1: {r1}")
        print(f"{pair}dealer:    {cluster.dealer_url}\n{pair}logs:      {cluster.log_dir}")
    if clusters[0].web_url:
        print(f"web page:  {clusters[0].web_url}/   (open it in a browser)")
    print(f"model:     {model_summary(model)}")
    cacert = f" --cacert {clusters[0].ca}" if clusters[0].ca else ""
    replicas = " ".join(f"--replicas {c.replica_urls[0]},{c.replica_urls[1]}" for c in clusters)
    print(f"try:       python clients/predict.py digit.png {replicas}{cacert}")
    if not a.tls:
        print("transport: plain HTTP on 127.0.0.1 (local use); --tls for HTTPS with dev certs")
    if a.model is None:
        print(
            "note: the bundled demo model's two shares both ship in the repository; for real "
            "use train and split your own (python -m training --out DIR; then --model DIR)"
        )
    print("ready. Ctrl-C stops them all.", flush=True)
    try:
        while not stop.is_set():
            for cluster in clusters:
                for role, proc in cluster.procs.items():
                    if proc.poll() is not None:
                        print(
                            f"error: {role} of pair {cluster.pair} exited ({proc.returncode}); "
                            f"stopping\n{cluster.tail(role)}",
                            file=sys.stderr,
                        )
                        stop.set()
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        group.stop()
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Start the cluster, classify the sample digits with the real client CLI, stop."""
    import subprocess

    from service.cluster import DEFAULT_MODEL, REPO, Cluster, ClusterError, free_ports

    samples = sorted((REPO / "clients" / "samples").glob("*.png"))
    cluster = Cluster(
        model=Path(a.model) if a.model else DEFAULT_MODEL,
        ports=free_ports(3),
        replica_args=("--comparison", a.comparison),
    )
    print("starting the local cluster (dealer + two replicas) ...", flush=True)
    try:
        with cluster:
            r0, r1 = cluster.replica_urls
            print(f"replica 0 {r0}, replica 1 {r1}, dealer {cluster.dealer_url}")
            print(
                f"classifying {len(samples)} sample digits; each image is split into two "
                "shares, one per replica:\n",
                flush=True,
            )
            cmd = [
                sys.executable,
                str(REPO / "clients" / "predict.py"),
                *(str(p.relative_to(REPO)) for p in samples),
                "--replicas",
                f"{r0},{r1}",
            ]
            return subprocess.run(cmd, cwd=REPO).returncode
    except ClusterError as exc:
        return _fail(str(exc))


def openapi_text() -> str:
    import yaml

    from service.api.replica_app import create_replica_app
    from service.api.settings import ReplicaSettings

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    app = create_replica_app(
        ReplicaSettings(party=0, model=Path("."), peer_secret="p" * 32, dealer_secret="d" * 32)
    )
    return yaml.dump(app.openapi(), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)


def cmd_openapi(a: argparse.Namespace) -> int:
    text = openapi_text()
    if a.check:
        if not OPENAPI_FILE.exists() or OPENAPI_FILE.read_text() != text:
            return _fail(f"{OPENAPI_FILE} differs from the app; run `make openapi`")
        print(f"{OPENAPI_FILE} matches the app")
        return 0
    if a.write:
        OPENAPI_FILE.write_text(text)
        print(f"wrote {OPENAPI_FILE}")
        return 0
    sys.stdout.write(text)
    return 0


def cmd_protocols(a: argparse.Namespace) -> int:
    from service.cluster import DEFAULT_MODEL
    from service.mpc import costs
    from service.store import StoreError, load_share

    try:
        model = load_share(Path(a.model) if a.model else DEFAULT_MODEL, 0)
    except StoreError as exc:
        return _fail(str(exc))
    net = model.network
    names = a.comparison.split(",") if a.comparison else protocols.NAMES
    unknown = [n for n in names if n not in protocols.REGISTRY]
    if unknown:
        return _fail(f"unknown protocols {unknown}; known: {', '.join(protocols.NAMES)}")
    found = [
        costs.measure(net.layers, net.input_shape, model.weight_shapes, n, net.fp) for n in names
    ]
    if a.json:
        print(json.dumps([c.row() for c in found], indent=2))
    elif a.write_docs:
        PROTOCOLS_DOC.write_text(costs.with_table(PROTOCOLS_DOC.read_text(), found))
        print(f"wrote the table in {PROTOCOLS_DOC}")
    else:
        sys.stdout.write(costs.markdown(found))
    return 0


def cmd_reload(a: argparse.Namespace) -> int:
    import ssl

    import httpx

    from service.api import auth

    secret = os.environ.get("PRIVDIGIT_ADMIN_SECRET", "")
    if a.credentials:
        from service.identity import read_credentials

        secret = read_credentials(Path(a.credentials), {"admin.key": "admin"}).get("admin", "")
        if not secret:
            return _fail(f"no admin.key in {a.credentials}: pass the replica's folder")
    from service.identity import MIN_SECRET

    if len(secret) < MIN_SECRET:
        return _fail(
            "pass --credentials with the replica's folder (its admin.key), or set "
            "PRIVDIGIT_ADMIN_SECRET to the replica's admin key"
        )
    verify = ssl.create_default_context(cafile=a.cacert) if a.cacert else True
    try:
        party = httpx.get(f"{a.url}/v1/health", timeout=5, verify=verify).json()["party"]
        r = httpx.post(
            f"{a.url}/v1/admin/reload",
            headers={auth.AUTH_HEADER: auth.admin_tag(secret.encode(), int(party))},
            timeout=30,
            verify=verify,
        )
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        return _fail(f"cannot reach the replica at {a.url}: {exc}")
    print(json.dumps(r.json()))
    return 0 if r.status_code == 200 else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start dealer and both replicas on 127.0.0.1")
    up.add_argument("--model", help="model directory from `python -m training` (default: bundled)")
    up.add_argument("--ports", type=_ports, default=(8000, 8001, 8002), help="R0,R1,DEALER")
    up.add_argument("--scores", action="store_true", help="let clients ask for scores")
    up.add_argument("--tls", action="store_true", help="HTTPS/WSS with fresh development certs")
    up.add_argument("--web-port", type=int, default=8003, help="port of the web page")
    up.add_argument("--no-web", action="store_true", help="do not serve the web page")
    up.add_argument("--log-dir", help="where the three processes log (default: a temp dir)")
    up.add_argument("--ready-timeout", type=float, default=60.0)
    up.add_argument(
        "--pairs",
        type=int,
        default=1,
        metavar="N",
        help="start N replica pairs, each with its own dealer; pair k on --ports plus 10 k",
    )
    _add_comparison(up)
    up.set_defaults(fn=cmd_up)

    rep = sub.add_parser("replica", help="run one replica (party 0 or 1)")
    rep.add_argument("--party", type=int, choices=(0, 1))
    rep.add_argument("--pair", metavar="NAME", help="this replica's pair, shown in /v1/health")
    rep.add_argument("--model", help="model directory holding manifest.json and this party's share")
    rep.add_argument("--host")
    rep.add_argument("--port", type=int)
    rep.add_argument("--peer-url", help="party 0: party 1's ws://HOST:PORT/v1/peer")
    rep.add_argument("--dealer-url")
    rep.add_argument("--max-batch", type=int, help="most images in one request and one run")
    rep.add_argument("--max-inflight", type=int, help="requests in flight before 429 busy")
    rep.add_argument("--max-batches", type=int, help="protocol runs in flight (dynamic batching)")
    rep.add_argument(
        "--comparison",
        choices=protocols.NAMES,
        help=f"comparison protocol (same on both replicas; default {protocols.DEFAULT})",
    )
    rep.add_argument(
        "--prefetch", type=int, help="dealer material kept ready for one-image runs; 0 = off"
    )
    rep.add_argument(
        "--prefetch-max-entries", type=int, help="most prefetched entries held (default 16)"
    )
    rep.add_argument(
        "--prefetch-max-age",
        type=float,
        help="seconds after which prefetched entries are dropped (default 120)",
    )
    rep.add_argument(
        "--lanes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="direct TCP lanes for protocol rounds (default on); --no-lanes: peer WebSocket only",
    )
    rep.add_argument("--lane-port", type=int, help="party 1: TCP port of its lanes (0: any free)")
    rep.add_argument("--peer-timeout", type=float)
    rep.add_argument("--reload-poll", type=float, help="seconds between model checks; 0 = off")
    rep.add_argument("--scores", action="store_true", help="let clients ask for scores")
    rep.add_argument("--secret", help=argparse.SUPPRESS)  # refused with a message saying why
    rep.add_argument(
        "--credentials",
        help="this replica's folder from `python -m service certs DIR` (DIR/replica-0 or "
        "DIR/replica-1): its peer, dealer and admin keys",
    )
    rep.add_argument(
        "--cors-origin", action="append", help="a web page origin allowed by CORS (repeatable)"
    )
    rep.add_argument(
        "--api-key", action="append", help="require this client key in X-API-Key (repeatable)"
    )
    _add_transport(rep)
    rep.set_defaults(fn=cmd_replica)

    web = sub.add_parser("web", help="serve the web page (web/) from its own origin")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8003)
    web.add_argument(
        "--replicas",
        action="append",
        metavar="R0,R1",
        help="a replica pair the page may call (repeatable for several pairs; default "
        "http://127.0.0.1:8000,http://127.0.0.1:8001)",
    )
    web.add_argument("--tls-cert", help="PEM certificate: serve the page over HTTPS")
    web.add_argument("--tls-key", help="PEM private key of --tls-cert")
    web.set_defaults(fn=cmd_web)

    certs = sub.add_parser(
        "certs",
        help="create each party's credentials and development TLS certificates (one per role)",
    )
    certs.add_argument("directory", help="where to write one folder per role and ca.pem")
    certs.add_argument("--force", action="store_true", help="write into a non-empty folder")
    certs.add_argument(
        "--host",
        action="append",
        help="another DNS name or IP in every role's certificate, or ROLE=NAME in that role's "
        "only (repeatable; e.g. --host replica-1=replica-1.example.org)",
    )
    certs.add_argument("--days", type=int, default=30, help="validity in days")
    certs.set_defaults(fn=cmd_certs)

    k8s = sub.add_parser(
        "k8s-secrets",
        help="write each Kubernetes overlay's Secret files (deploy/k8s/*/secrets) from the "
        "signer's folder, issuing credentials there on first use",
    )
    k8s.add_argument("--model", help="model directory: copies each party its own share")
    k8s.add_argument(
        "--ca",
        default="deploy/k8s-ca",
        help="the signer's folder (CA key, every role's credentials); made on first use",
    )
    k8s.add_argument("--overlays", default="deploy/k8s", help="holds party-0, party-1, dealer")
    k8s.add_argument(
        "--host",
        action="append",
        help="ROLE=NAME: another name in that role's certificate only, e.g. "
        "replica-1=*.party-1.example.org (repeatable; with a fresh set)",
    )
    k8s.add_argument("--days", type=int, default=90, help="certificate validity in days")
    k8s.add_argument("--force", action="store_true", help="issue a fresh set in --ca")
    k8s.set_defaults(fn=cmd_k8s_secrets)

    dl = sub.add_parser("dealer", help="run the dealer of correlated randomness")
    dl.add_argument("--host")
    dl.add_argument("--port", type=int)
    dl.add_argument("--secret", help=argparse.SUPPRESS)  # refused with a message saying why
    dl.add_argument(
        "--credentials",
        help="the dealer's folder from `python -m service certs DIR` (DIR/dealer): the key of "
        "each replica",
    )
    _add_transport(dl)
    dl.set_defaults(fn=cmd_dealer)

    demo = sub.add_parser("demo", help="start the cluster, classify the sample digits, stop")
    demo.add_argument("--model", help="model directory (default: bundled)")
    _add_comparison(demo)
    demo.set_defaults(fn=cmd_demo)

    oa = sub.add_parser("openapi", help="print the replica's OpenAPI contract as YAML")
    g = oa.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 2 if openapi.yaml differs")
    g.add_argument("--write", action="store_true", help="rewrite openapi.yaml")
    oa.set_defaults(fn=cmd_openapi)

    pr = sub.add_parser(
        "protocols",
        help="the comparison protocols and what one label costs with each: rounds, bytes",
        description="Measures, for the model's architecture, one label at batch 1 with each "
        "comparison protocol (in one process, on zeros: the counts depend only on the "
        "architecture): rounds, bytes each replica sends, dealer material per party.",
    )
    pr.add_argument("--model", help="model directory (default: the bundled models/default)")
    pr.add_argument("--comparison", help="comma list of protocols (default: all registered)")
    out = pr.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per protocol")
    out.add_argument(
        "--write-docs", action="store_true", help="rewrite the table in docs/protocols.md"
    )
    pr.set_defaults(fn=cmd_protocols)

    rl = sub.add_parser("reload", help="ask a replica to load its model directory now")
    rl.add_argument("url", help="the replica's base URL, e.g. http://127.0.0.1:8000")
    rl.add_argument(
        "--credentials",
        help="the replica's folder from `python -m service certs DIR` (its admin.key; or set "
        "PRIVDIGIT_ADMIN_SECRET)",
    )
    rl.add_argument("--cacert", help="CA certificate that verifies an https replica")
    rl.set_defaults(fn=cmd_reload)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    keep_freed_memory()  # replicas and dealer: no page faults on every round's arrays
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

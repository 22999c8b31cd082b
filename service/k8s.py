"""The files behind each Kubernetes overlay's Secrets (`deploy/k8s`), from one signer's folder.

    python -m service k8s-secrets [--model DIR] [--ca deploy/k8s-ca] [--overlays deploy/k8s]
                                  [--host ROLE=NAME ...] [--days 90] [--force]

The signer (whoever holds the CA key) keeps one folder (`--ca`): the first run issues a CA, one
certificate per role and the pairwise keys there (`service.devcerts`, `service.identity`), each
role's certificate naming only its own party's Kubernetes services; later runs reuse it
(`--force` issues a fresh set). Each run copies into `OVERLAY/secrets/`, for the overlay's
`secretGenerator`, exactly what that party may hold:

    party-0/secrets/credentials   replica-0's certificate, key, CA certificate, peer.key,
                                  dealer.key, admin.key
    party-0/secrets/model         manifest.json and share-0.safetensors (with --model)
    party-1/secrets/...           the same for replica-1 and share-1
    dealer/secrets/credentials    the dealer's certificate, key, CA certificate, party-0.key,
                                  party-1.key

The CA's private key never leaves `--ca`. What each party learns: only its own folder (and the
public manifest). The signer sees every credential, so it is one of the parties or the model
owner, who knows the weights anyway (docs/deploy.md).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from service.identity import DEALER_ROLE, REPLICA_ROLES, make_credentials

# overlay directory -> the role it deploys, and the namespace the overlay deploys into
OVERLAYS = {"party-0": "replica-0", "party-1": "replica-1", "dealer": DEALER_ROLE}
NAMESPACES = {
    "replica-0": "privdigit-party-0",
    "replica-1": "privdigit-party-1",
    DEALER_ROLE: "privdigit-dealer",
}
HEADLESS = "pairs"  # the replicas' headless Service: pod k is pair-k.pairs.NAMESPACE.svc
ROLES = (*REPLICA_ROLES, DEALER_ROLE)


class SecretsError(ValueError):
    """The signer's folder, the model or a --host cannot make the overlays' files."""


@dataclass(frozen=True)
class Written:
    """What a run did: whether it issued credentials, and the files it wrote per overlay."""

    issued: bool
    files: dict[str, list[str]]


def cluster_names(role: str) -> tuple[str, ...]:
    """The in-cluster DNS names a role's certificate carries (and no other role's does)."""
    ns = NAMESPACES[role]
    if role == DEALER_ROLE:
        return (f"dealer.{ns}.svc", f"dealer.{ns}.svc.cluster.local")
    # per-pod client Services (pair-k.NS.svc) and the headless Service (pair-k.pairs.NS.svc)
    return tuple(
        f"*.{sub}{ns}.svc{tail}" for sub in ("", f"{HEADLESS}.") for tail in ("", ".cluster.local")
    )


def parse_hosts(given: list[str], roles: tuple[str, ...] = ROLES) -> dict[str, tuple[str, ...]]:
    """`ROLE=NAME` items (e.g. `replica-1=*.party-1.example.org`) -> extra names per role, for
    `roles` (the overlays' by default)."""
    out: dict[str, list[str]] = {}
    for item in given:
        role, _, name = item.partition("=")
        if role not in roles or not name:
            raise SecretsError(
                f"--host {item!r}: write ROLE=NAME with ROLE one of {', '.join(roles)}"
            )
        out.setdefault(role, []).append(name)
    return {role: tuple(names) for role, names in out.items()}


def _issued(ca: Path) -> bool:
    return (ca / "ca.pem").is_file() and all((ca / role / "cert.pem").is_file() for role in ROLES)


def issue(ca: Path, hosts: dict[str, tuple[str, ...]], days: int) -> None:
    """A CA, one certificate per role (its cluster names + `hosts`) and the pairwise keys."""
    from service.devcerts import make_dev_certs

    names = {role: cluster_names(role) + hosts.get(role, ()) for role in ROLES}
    make_dev_certs(ca, days=days, roles=ROLES, role_hosts=names)
    make_credentials(ca)


def _replace(folder: Path, files: dict[str, Path]) -> list[str]:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, folder / name)
        (folder / name).chmod(0o600)
    return sorted(files)


def write_secrets(
    overlays: Path,
    ca: Path,
    *,
    model: Path | None = None,
    hosts: dict[str, tuple[str, ...]] | None = None,
    days: int = 90,
    force: bool = False,
) -> Written:
    """Issue the credentials into `ca` unless already there (or `force`), then fill each
    overlay's `secrets/credentials` (and with `model`, the replicas' `secrets/model`)."""
    missing = [o for o in OVERLAYS if not (overlays / o / "kustomization.yaml").is_file()]
    if missing:
        raise SecretsError(f"{overlays} has no overlay {', '.join(missing)} (kustomization.yaml)")
    if model is not None:
        for name in ("manifest.json", "share-0.safetensors", "share-1.safetensors"):
            if not (model / name).is_file():
                raise SecretsError(
                    f"{model / name} not found: --model takes a directory written by "
                    "`python -m training`"
                )
    issued = force or not _issued(ca)
    if issued:
        if ca.exists() and any(ca.iterdir()) and not force:
            raise SecretsError(
                f"{ca} holds files but no complete set of credentials; pick a new folder or "
                "pass --force to issue a fresh set there"
            )
        issue(ca, hosts or {}, days)
    elif hosts:
        raise SecretsError(
            f"{ca} already holds certificates; --host names go into new ones: pass --force"
        )
    written: dict[str, list[str]] = {}
    for overlay, role in OVERLAYS.items():
        folder = ca / role
        files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
        written[f"{overlay}/secrets/credentials"] = _replace(
            overlays / overlay / "secrets" / "credentials", files
        )
        if model is not None and role in REPLICA_ROLES:
            share = f"share-{REPLICA_ROLES.index(role)}.safetensors"
            written[f"{overlay}/secrets/model"] = _replace(
                overlays / overlay / "secrets" / "model",
                {"manifest.json": model / "manifest.json", share: model / share},
            )
    return Written(issued, written)

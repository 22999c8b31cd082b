"""Share files on disk: load and verify one replica's share of a model, and notice new versions.

A model directory (written by the training package) holds a public `manifest.json` and one share
file per replica. A replica reads only the manifest and its own `share-{party}.safetensors`; it
checks the share against the manifest's SHA-256 commitment, the file's own metadata (party,
model version) and the weight shapes the manifest lists, and builds the private runner from the
manifest's layer list. Anything that does not check out raises `StoreError` and loads nothing,
so a half-written or mismatched model can never replace a good one.

The manifest is the contract with the training package; this module never imports `training`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from service.mpc import protocols
from service.mpc.network import ModelSpecError, PrivateNetwork
from service.mpc.ring import FixedPoint

MANIFEST_FORMAT = "privdigit-model/1"
MANIFEST_FILE = "manifest.json"


class StoreError(RuntimeError):
    """The model directory does not hold a complete, consistent share for this replica."""


@dataclass(frozen=True)
class LoadedModel:
    """One replica's share of one model version, verified, with its private runner."""

    version: str
    party: int
    manifest: dict[str, Any]
    network: PrivateNetwork
    weights: dict[str, torch.Tensor]

    @property
    def mask_id(self) -> str:
        """Names this model's fixed weight masks (`beaver.linear`), bound to both shares' hashes:
        other weights, or another split of the same weights, never reuse a mask."""
        shares = sorted(self.manifest["shares"], key=lambda s: int(s["party"]))
        digests = "|".join(str(s["sha256"]) for s in shares)
        return hashlib.sha256(b"privdigit/mask-id/v1|" + digests.encode()).hexdigest()[:40]

    @property
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.weights.items()}

    def public_info(self) -> dict[str, Any]:
        """What anyone may know about this model: the manifest minus nothing secret."""
        m = self.manifest
        return {
            "model_version": self.version,
            "created": m.get("created"),
            "architecture": m["architecture"],
            "fixed_point": m["fixed_point"],
            "shares": m["shares"],
            "provenance": m.get("provenance"),
            "comparison": self.comparison_info(),
        }

    def comparison_info(self) -> dict[str, str]:
        """The comparison protocol this replica runs the model with, from the registry."""
        name = self.network.comparison
        classes = int(self.weights[self.network.weight_names()[-1]].shape[0])  # the last bias
        return {
            "name": name,
            "summary": protocols.get(name).summary,
            "label_sharing": self.network.label_sharing(classes),
        }


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(
            f"{path} not found: point --model at a directory written by `python -m training`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise StoreError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    for key in ("model_version", "architecture", "fixed_point", "weights", "shares"):
        if key not in manifest:
            raise StoreError(f"{path}: missing {key!r}")
    return manifest


def load_share(
    directory: Path | str, party: int, comparison: str = protocols.DEFAULT
) -> LoadedModel:
    """Load and verify party `party`'s share of the model in `directory`."""
    directory = Path(directory)
    if party not in (0, 1):
        raise StoreError(f"party must be 0 or 1, got {party}")
    manifest = _read_manifest(directory)
    version = str(manifest["model_version"])
    entries = [s for s in manifest["shares"] if s.get("party") == party]
    if len(entries) != 1:
        raise StoreError(f"manifest lists no single share for party {party}")
    entry = entries[0]
    path = directory / str(entry["file"])
    if path.name != entry["file"] or not path.is_file():
        raise StoreError(f"share file {entry['file']!r} is missing from {directory}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise StoreError(
            f"{path.name} does not match the manifest's commitment (half-written or from "
            "another split?)"
        )
    try:
        weights = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as exc:
        raise StoreError(f"{path.name} is not a safetensors file ({exc})") from None
    if meta.get("model_version") != version or meta.get("party") != str(party):
        raise StoreError(
            f"{path.name} is party {meta.get('party')}'s share of version "
            f"{meta.get('model_version')}, not party {party}'s of {version}"
        )
    arch, fixed = manifest["architecture"], manifest["fixed_point"]
    try:
        network = PrivateNetwork(
            tuple(arch["layers"]),
            tuple(int(d) for d in arch["input_shape"]),
            FixedPoint(int(fixed["frac_bits"])),
            comparison,
        )
    except (ModelSpecError, KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"manifest architecture is not runnable: {exc}") from None
    if int(fixed.get("ring_bits", 64)) != 64:
        raise StoreError("only the ring Z_2^64 is supported")
    expected = {k: tuple(v) for k, v in manifest["weights"].items()}
    if set(network.weight_names()) != set(expected):
        raise StoreError("manifest weights do not match its layer list")
    for name, shape in expected.items():
        t = weights.get(name)
        if t is None or t.dtype != torch.int64 or tuple(t.shape) != shape:
            raise StoreError(f"{path.name}: tensor {name!r} missing or not int64{list(shape)}")
    return LoadedModel(version, party, manifest, network, weights)


def signature(directory: Path | str, party: int) -> tuple:
    """A cheap fingerprint of the files a replica reads; it changes when any of them changes."""
    directory = Path(directory)
    out = []
    for name in (MANIFEST_FILE, f"share-{party}.safetensors"):
        try:
            st = os.stat(directory / name)
            out.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None))
    return tuple(out)


class ModelRegistry:
    """The versions one replica holds (newest last), reloaded from its model directory.

    A reload that fails verification raises `StoreError` and changes nothing. The last `keep`
    versions stay loaded so that requests the peer started on the previous version still find
    it while both replicas switch; a request keeps a reference to its `LoadedModel`, so it
    finishes on the version it started with even if that version is dropped meanwhile.
    """

    def __init__(
        self,
        directory: Path | str,
        party: int,
        *,
        keep: int = 2,
        comparison: str = protocols.DEFAULT,
    ) -> None:
        self.directory, self.party, self.keep = Path(directory), party, keep
        self.comparison = comparison
        self._models: dict[str, LoadedModel] = {}
        self._signature: tuple | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None

    @property
    def latest(self) -> LoadedModel | None:
        with self._lock:
            return next(reversed(self._models.values()), None)

    def versions(self) -> list[str]:
        """Held versions, newest first."""
        with self._lock:
            return list(reversed(self._models))

    def get(self, version: str) -> LoadedModel | None:
        with self._lock:
            return self._models.get(version)

    def newest_common(self, peer_versions: list[str]) -> LoadedModel | None:
        """The newest version both this replica and its peer hold: the one to serve."""
        with self._lock:
            held = list(reversed(self._models.items()))
        return next((m for v, m in held if v in peer_versions), None)

    def changed_on_disk(self) -> bool:
        return signature(self.directory, self.party) != self._signature

    def reload(self) -> bool:
        """Load the directory's model if it is new; True when a new version was added."""
        sig = signature(self.directory, self.party)
        try:
            model = load_share(self.directory, self.party, self.comparison)
        except (StoreError, OSError) as exc:
            self._signature = sig  # do not retry the same broken files on every poll
            self.last_error = str(exc)
            raise StoreError(str(exc)) from None
        self._signature, self.last_error = sig, None
        with self._lock:
            if model.version in self._models:
                return False
            self._models[model.version] = model
            while len(self._models) > self.keep:
                del self._models[next(iter(self._models))]
        return True

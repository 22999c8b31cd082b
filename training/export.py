"""Model export: a trained model -> a public manifest plus one share file per replica.

Writes, atomically (a temporary directory beside the target, then a rename):
  model.safetensors   the plaintext weights (the model owner's; never given to a replica)
  share-0.safetensors, share-1.safetensors   additive shares over Z_2^64 at f fractional bits
  manifest.json       public: architecture (layer list), input shape, fixed-point parameters,
                      model version, and the SHA-256 commitment of each share file
Each share alone is uniform: it says nothing about the weights. A new split gets a new model
version, so replicas holding shares of different splits refuse to pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from service.mpc.ring import FixedPoint
from service.mpc.sharing import share_tensors

MANIFEST_FORMAT = "privdigit-model/1"
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class ExportError(RuntimeError):
    """The output directory cannot be written as asked (exists without --force, bad model)."""


def share_file(party: int) -> str:
    return f"share-{party}.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_split(
    directory: Path,
    state: dict[str, torch.Tensor],
    layers: list[dict[str, Any]],
    input_shape: tuple[int, ...],
    fp: FixedPoint,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write model, shares and manifest into `directory` (which is not yet visible)."""
    plain = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    save_file(plain, str(directory / MODEL_FILE))
    weights_sha = sha256_file(directory / MODEL_FILE)
    version = f"{weights_sha[:12]}-{secrets.token_hex(4)}"
    s0, s1 = share_tensors({k: v.double() for k, v in plain.items()}, fp)
    shares = []
    for party, tensors in ((0, s0), (1, s1)):
        meta = {"model_version": version, "party": str(party), "format": MANIFEST_FORMAT}
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(directory / share_file(party)),
            metadata=meta,
        )
        shares.append(
            {
                "party": party,
                "file": share_file(party),
                "sha256": sha256_file(directory / share_file(party)),
            }
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": {"layers": layers, "input_shape": list(input_shape), "classes": 10},
        "fixed_point": {"ring_bits": 64, "frac_bits": fp.frac_bits},
        "weights": {k: list(v.shape) for k, v in plain.items()},
        "shares": shares,
        **extra,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def publish(out: Path, write, *, force: bool) -> Any:
    """Run `write(tmp_dir)` and move the result to `out` in one rename; never half-written."""
    out = Path(out)
    if out.exists() and not force and any(out.iterdir()):
        raise ExportError(f"{out} already holds a model; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        result = write(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_model(
    state: dict[str, torch.Tensor],
    layers: list[dict[str, Any]],
    out: Path,
    *,
    input_shape: tuple[int, ...] = (1, 28, 28),
    fp: FixedPoint | None = None,
    force: bool = False,
    extra_files: dict[str, bytes] | None = None,
    extra_manifest: dict[str, Any] | None = None,
    amend: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Export `state` (a plaintext state dict) into `out`; returns the manifest.

    `amend(directory, manifest)`: runs on the written model before it is published (e.g. to
    evaluate the shares privately) and returns what to add to the manifest."""
    fp = fp or FixedPoint(16)

    def write(tmp: Path) -> dict[str, Any]:
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        manifest = _write_split(tmp, state, layers, input_shape, fp, extra_manifest or {})
        if amend is not None:
            manifest = {**manifest, **amend(tmp, manifest)}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    return publish(out, write, force=force)


def resplit(directory: Path) -> dict[str, Any]:
    """Fresh shares (and a new model version) for the model already in `directory`."""
    directory = Path(directory)
    manifest_path, model_path = directory / MANIFEST_FILE, directory / MODEL_FILE
    if not manifest_path.is_file() or not model_path.is_file():
        raise ExportError(f"{directory} has no {MODEL_FILE} and {MANIFEST_FILE} to re-split")
    old = json.loads(manifest_path.read_text())
    state = load_file(str(model_path))
    keep = {
        k: v
        for k, v in old.items()
        if k
        not in {
            "format",
            "model_version",
            "created",
            "architecture",
            "fixed_point",
            "weights",
            "shares",
        }
    }
    others = {
        p.name: p.read_bytes()
        for p in directory.iterdir()
        if p.is_file() and p.name not in {MODEL_FILE, MANIFEST_FILE, share_file(0), share_file(1)}
    }
    return export_model(
        state,
        old["architecture"]["layers"],
        directory,
        input_shape=tuple(old["architecture"]["input_shape"]),
        fp=FixedPoint(int(old["fixed_point"]["frac_bits"])),
        force=True,
        extra_files=others,
        extra_manifest=keep,
    )

"""Classify handwritten digit images on the privdigit replicas, which see only secret shares.

    python clients/predict.py digit.png [more.png ...] [--replicas URL0,URL1] [--json] [--scores]

Several replica pairs (`--replicas A0,A1 --replicas B0,B1`, or `--pairs-file FILE` with one pair
per line) share the work; a pair that is down or not ready is skipped without an error.

Every file is preprocessed first (files that fail are reported and skipped); the readable ones
go to the replicas in one batch. Exit status: 0 all files classified, 1 some file failed,
2 usage error or the service is unreachable or misbehaving.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python clients/predict.py`: make `clients` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from clients.privdigit import (
    DEFAULT_REPLICAS,
    REPLICAS_ENV,
    ImageError,
    PrivDigitClient,
    PrivDigitError,
    ServiceError,
    VersionMismatch,
    preprocess,
    read_pairs_file,
)

HINTS = {
    "not_ready": "the replicas are not ready yet (GET /v1/ready says why); wait and retry",
    "busy": "the replicas are busy; retry in a moment",
    "scores_disabled": "the operator has not enabled scores; run without --scores",
    "peer_timeout": "the replicas could not complete together; check that both are up",
    "dealer_unavailable": "the dealer is down or refused; check the cluster",
    "unauthenticated": "this deployment needs an API key: --api-key KEY or $PRIVDIGIT_API_KEY",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, parsed (argparse exits with status 2 on usage errors)."""
    parser = argparse.ArgumentParser(
        prog="predict.py",
        description="Classify handwritten digit images on two privdigit replicas. Each replica "
        "receives only a random additive share of the image; only this client reconstructs "
        "the predicted label.",
        epilog="Exit status: 0 all files classified, 1 some file could not be read, 2 usage "
        "error or the service is unreachable or misbehaving.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="image files (PNG, JPEG, ...)")
    parser.add_argument(
        "--replicas",
        action="append",
        metavar="URL0,URL1",
        help=f"base URLs of party 0 and party 1 of a replica pair; repeat it for several pairs "
        f"(default: ${REPLICAS_ENV}, pairs separated by ';', or {','.join(DEFAULT_REPLICAS)})",
    )
    parser.add_argument(
        "--pairs-file",
        metavar="FILE",
        help="replica pairs, one URL0,URL1 per line (# comments); with --replicas, both count",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    parser.add_argument(
        "--scores",
        action="store_true",
        help="ask for the logits' shares to report a confidence (if the operator enabled it)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="HTTP timeout in seconds"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="client API key, where the operator requires one (default: $PRIVDIGIT_API_KEY)",
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--cacert", metavar="PATH", help="CA bundle to verify the replicas' TLS")
    tls.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    return parser.parse_args(argv)


def describe(exc: PrivDigitError) -> str:
    """A one-line message for a service failure, with a hint on what to do."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ServiceError) and exc.code in HINTS:
        text += f"; {HINTS[exc.code]}"
    elif isinstance(exc, VersionMismatch) and "retry" not in text:
        text += "; the replicas must serve the same model version"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the process exit status."""
    args = parse_args(argv)
    errors: dict[int, str] = {}
    images: list[np.ndarray] = []
    for i, name in enumerate(args.files):
        try:
            images.append(preprocess(name))
        except ImageError as exc:
            errors[i] = exc.reason
            print(f"error: {name}: {exc.reason}", file=sys.stderr)
    failure: PrivDigitError | None = None
    predictions = []
    if images:
        verify: bool | str = False if args.insecure else (args.cacert or True)
        try:
            pairs = [
                *(args.replicas or []),
                *(read_pairs_file(args.pairs_file) if args.pairs_file else []),
            ]
            with PrivDigitClient(
                pairs or None,
                timeout=args.timeout,
                verify=verify,
                scores=args.scores,
                api_key=args.api_key,
            ) as client:
                predictions = client.predict_encoded(np.stack(images))
        except PrivDigitError as exc:
            failure = exc
    results = iter(predictions)
    for i, name in enumerate(args.files):
        if i in errors:
            if args.json:
                print(json.dumps({"file": name, "error": errors[i]}))
            continue
        if failure is not None:
            continue
        p = next(results)
        if args.json:
            row: dict[str, Any] = {
                "file": name,
                "label": p.label,
                "confidence": None if p.confidence is None else round(p.confidence, 4),
                "model_version": p.model_version,
                "latency_ms": round(p.latency_ms, 1),
            }
            print(json.dumps(row))
        elif p.confidence is None:
            print(f"{name}: {p.label}")
        else:
            print(f"{name}: {p.label} (confidence {p.confidence:.2f})")
    if failure is not None:
        print(f"error: {describe(failure)}", file=sys.stderr)
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

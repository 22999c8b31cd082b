"""The race: one CNN, one set of weights, four ways to run it, in one invocation on this machine.

    python -m benchmarks.race [--json] [--repeats 20] [--no-crypten] [--batch-sizes 1,64]

The default CNN (conv16-avgpool-relu, conv16-avgpool-relu, fc100-relu, fc10) with the weights of
tests/fixtures/cnn.safetensors runs through
  plaintext   PyTorch, one thread;
  engine      this project's engine in-process: both parties on threads, the dealer's randomness
              dealt and expanded beforehand (as a replica prefetches it); once per comparison
              protocol (`service.mpc.protocols.NAMES`);
  service     a local cluster (dealer and two replicas, loopback HTTP) through clients/privdigit,
              running the fastest engine protocol: one request per batch, from the client's
              call to the reconstructed labels;
  crypten     CrypTen 0.4.1, two parties plus its trusted third party (TTP provider), gloo on
              127.0.0.1, one thread per party, in its own venv under .cache/race/crypten-venv
              (created on first use, reused after; --no-crypten leaves it out).
Per system and batch size: latency p50 (label output; also logits where the system has both),
images/s, and at batch 1 the rounds and bytes per image between the two parties (both
directions). `speedup_vs_crypten` is CrypTen's batch-1 label latency over the fastest engine
protocol's. Every label is checked against plaintext's on the same images (the first
max(batch sizes) of tests/fixtures/mnist_test_1000.npz). Progress bars go to stderr (a tty).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from benchmarks import metric
from service.memory import keep_freed_memory
from service.mpc.beaver import WeightMasks
from service.mpc.dealer import Dealer
from service.mpc.inprocess import private_forward, share_images, share_model
from service.mpc.ring import DEFAULT_FP
from training.model import DigitCNN

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "tests" / "fixtures" / "cnn.safetensors"
IMAGES = REPO / "tests" / "fixtures" / "mnist_test_1000.npz"
WORKER = Path(__file__).resolve().parent / "_crypten_worker.py"
CACHE = REPO / ".cache" / "race"
VENV = CACHE / "crypten-venv"

# CrypTen's venv, installed in this order. Its own requirements name the dead `sklearn` package
# (and torchvision and tensorboard, which inference does not import), so crypten goes in with
# --no-deps and its real imports after it. torch is the CPU wheel: the local version label
# `+cpu` cannot resolve to PyPI's CUDA builds (the project's .venv gets the same wheel from the
# machine's pip find-links when pyproject pins torch==2.13.0).
CRYPTEN_INSTALL: tuple[tuple[str, ...], ...] = (
    ("--only-binary=:all:", "torch==2.13.0+cpu"),
    ("--no-deps", "crypten==0.4.1"),
    (
        "omegaconf==2.4.0",
        "onnx==1.23.2",
        "pandas==3.1.1",
        "pyyaml==6.0.4",
        "scipy==1.17.1",
        "scikit-learn==1.9.1",
        "future==1.0.0",
    ),
)


class Skip(Exception):
    """CrypTen cannot run here; the message says why (one line)."""


# -- helpers ------------------------------------------------------------------------------------


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None)


def _p50(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 2)


def _p95(seconds: list[float]) -> float:
    return round(float(np.percentile(seconds, 95)) * 1e3, 2)


def _runs(batch: int, repeats: int) -> int:
    """Timed runs at `batch`: `repeats` at batch 1, a tenth of that (at least 3) above."""
    return repeats if batch == 1 else max(3, repeats // 10)


def _indices(run: int, batch: int, n: int) -> list[int]:
    """Images of one run: batch 1 walks through the images, larger batches take the first."""
    start = run % n if batch == 1 else 0
    return [(start + k) % n for k in range(batch)]


def _load() -> tuple[DigitCNN, dict[str, torch.Tensor]]:
    state = load_file(WEIGHTS)
    model = DigitCNN()
    model.load_state_dict(state)
    return model.eval(), state


def _images(n: int) -> torch.Tensor:
    data = np.load(IMAGES)
    return torch.from_numpy(data["images"][:n]).float().unsqueeze(1) / 255.0


def _whole(v: float) -> float | int:
    return int(v) if v == int(v) else round(v, 2)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- (a) plaintext ------------------------------------------------------------------------------


def bench_plaintext(model, x: torch.Tensor, batches: list[int], repeats: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    with torch.no_grad():
        labels = model(x).argmax(-1).tolist()
        for b in batches:
            xb = x[_indices(0, b, len(x))]
            model(xb)
            times = []
            for _ in range(max(repeats, 50)):
                t0 = time.perf_counter()
                model(xb)
                times.append(time.perf_counter() - t0)
            rows[str(b)] = {
                "latency_ms_p50": round(statistics.median(times) * 1e3, 4),
                "images_per_s": round(b / statistics.median(times), 1),
            }
    return {"batches": rows, "labels": dict(enumerate(labels))}


# -- (b) the engine in-process ------------------------------------------------------------------


def engine_protocols() -> list[str]:
    """The registered comparison protocols, the default first."""
    from service.mpc import protocols

    return list(protocols.NAMES)


def bench_engine(
    model, state, x: torch.Tensor, batches: list[int], repeats: int, protocol: str
) -> dict[str, Any]:
    shared = share_model(model.layers(), state, (1, 28, 28), DEFAULT_FP, protocol)
    net, weights = shared.net, shared.weights
    dealer = Dealer()
    # fixed weight masks, as a replica keeps them: the warm-up run opens the masked weights
    masks = (WeightMasks("race"), WeightMasks("race"))
    n = len(x)
    labels: dict[int, int] = {}
    rows: dict[str, Any] = {}
    outputs = [(b, "label") for b in batches] + ([(1, "logits")] if 1 in batches else [])
    bar = _bar(sum(_runs(b, repeats) + 1 for b, _ in outputs), f"engine {protocol}")
    with bar:
        for b, output in outputs:
            online, dealt, stats = [], [], None
            for run in range(_runs(b, repeats) + 1):  # run 0 warms up (plan, kernels)
                idx = _indices(run, b, n)
                res = private_forward(
                    net, weights, share_images(x[idx]), dealer, uuid.uuid4().hex, output, masks,
                    prefetch=True,
                )  # fmt: skip
                if output == "label":
                    got = net.open_label(res.out0, res.out1)
                else:
                    got = DEFAULT_FP.decode(res.out0 + res.out1).argmax(-1)
                labels.update(zip(idx, got.tolist(), strict=True))
                if run:
                    online.append(res.online_s)
                    dealt.append(res.dealer_s)
                    stats = (res.stats0, res.stats1)  # every query after the weights' opening
                bar.update()
            key = str(b) if output == "label" else f"{b}_logits"
            rows[key] = {
                "batch": b,
                "output": output,
                "latency_ms_p50": _p50(online),
                "latency_ms_p95": _p95(online),
                "dealer_ms_p50": _p50(dealt),
                "images_per_s": round(b / statistics.median(online), 1),
                "rounds": stats[0].rounds,
                "bytes_per_image": (stats[0].bytes_sent + stats[1].bytes_sent) // b,
            }
    return {"protocol": protocol, "batches": rows, "labels": labels}


# -- (c) the service end to end -----------------------------------------------------------------


def _service_model(state: dict[str, torch.Tensor], layers: list[dict], tmp: Path) -> Path:
    """The bundled model when it holds these weights, else a fresh export of them."""
    from service.cluster import DEFAULT_MODEL

    bundled = DEFAULT_MODEL / "model.safetensors"
    if bundled.is_file() and _sha256(bundled) == _sha256(WEIGHTS):
        return DEFAULT_MODEL
    from training.export import export_model

    export_model(state, layers, tmp / "model")
    return tmp / "model"


def bench_service(
    state, layers, x: torch.Tensor, batches: list[int], repeats: int, protocol: str | None
) -> dict[str, Any]:
    """`protocol`: the engine's fastest, served alike (None, when no engine protocol ran: the
    replicas' default)."""
    import httpx

    from clients.privdigit import PrivDigitClient
    from service.cluster import Cluster, free_ports

    arrays = x.squeeze(1).double().numpy()
    n = len(arrays)
    # one request per batch, whatever the protocol's default cap (fss: 8 images)
    replica_args = ("--max-batch", str(max(64, *batches)))
    replica_args += ("--comparison", protocol) if protocol else ()
    labels: dict[int, int] = {}
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="race-service-") as tmp:
        model_dir = _service_model(state, layers, Path(tmp))
        bar = _bar(1 + sum(_runs(b, repeats) + 1 for b in batches), "service")
        with bar:
            cluster = Cluster(model=model_dir, ports=free_ports(3), replica_args=replica_args)
            with cluster:
                bar.update()
                urls = cluster.replica_urls
                with PrivDigitClient(urls) as client:
                    for b in batches:
                        metrics = [httpx.get(f"{u}/metrics").text for u in urls]
                        times = []
                        for run in range(_runs(b, repeats) + 1):
                            if run == 1:
                                metrics = [httpx.get(f"{u}/metrics").text for u in urls]
                            idx = _indices(run, b, n)
                            t0 = time.perf_counter()
                            preds = client.predict_encoded(arrays[idx])
                            if run:
                                times.append(time.perf_counter() - t0)
                            labels.update(zip(idx, (p.label for p in preds), strict=True))
                            bar.update()
                        after = [httpx.get(f"{u}/metrics").text for u in urls]
                        runs = len(times)
                        peer = sum(
                            metric(a, "privdigit_peer_bytes_sent_total")
                            - metric(m, "privdigit_peer_bytes_sent_total")
                            for a, m in zip(after, metrics, strict=True)
                        )
                        rounds = metric(after[0], "privdigit_protocol_rounds_total") - metric(
                            metrics[0], "privdigit_protocol_rounds_total"
                        )
                        rows[str(b)] = {
                            "batch": b,
                            "latency_ms_p50": _p50(times),
                            "latency_ms_p95": _p95(times),
                            "images_per_s": round(b / statistics.median(times), 1),
                            "rounds": _whole(rounds / runs),
                            "bytes_per_image": int(peer / runs / b),
                        }
    return {
        "protocol": protocol or "default",
        "model": str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else "export"),
        "batches": rows,
        "labels": labels,
    }


# -- (d) CrypTen --------------------------------------------------------------------------------


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _install_spec() -> str:
    return json.dumps([list(step) for step in CRYPTEN_INSTALL])


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    import fcntl

    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "setup.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_crypten_venv() -> float:
    """Create (once) the CrypTen venv; returns the seconds spent (0 when it was ready)."""
    stamp = VENV / ".race-installed"
    with _lock():
        if stamp.is_file() and stamp.read_text() == _install_spec() and _venv_python().exists():
            return 0.0
        t0 = time.perf_counter()
        shutil.rmtree(VENV, ignore_errors=True)
        log = CACHE / "setup.log"
        steps = [
            [sys.executable, "-m", "venv", str(VENV)],
            *[
                [str(_venv_python()), "-m", "pip", "install", "--quiet", *step]
                for step in CRYPTEN_INSTALL
            ],
        ]
        bar = _bar(len(steps), "crypten venv (once)")
        with bar, open(log, "w") as out:
            for cmd in steps:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                try:
                    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=CACHE)
                except OSError as exc:
                    raise Skip(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
                if proc.returncode:
                    tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:]
                    raise Skip(
                        f"could not install {cmd[-1]} into {VENV.relative_to(REPO)} "
                        f"(exit {proc.returncode}: {tail[0] if tail else ''}); see {log}"
                    )
                bar.update()
        stamp.write_text(_install_spec())
        return time.perf_counter() - t0


def run_crypten(
    layers: list[dict],
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    batches: list[int],
    repeats: int,
    timeout: float,
) -> dict[str, Any]:
    """CrypTen's numbers from `_crypten_worker.py`, run with the CrypTen venv's python."""
    setup_s = ensure_crypten_venv()
    with tempfile.TemporaryDirectory(prefix="race-crypten-") as tmp:
        data = Path(tmp) / "input.pt"
        torch.save({"layers": json.dumps(layers), "state": state, "images": x}, data)
        cmd = [str(_venv_python()), "-I", str(WORKER), str(data)]
        cmd += ["--repeats", str(repeats), "--batch-sizes", ",".join(map(str, batches))]
        cmd += ["--timeout", str(timeout)]
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its three processes go down together on a timeout
        )
        errors: list[str] = []
        bar = _bar(0, "crypten")

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith("PROGRESS "):
                    done, total = map(int, line.split()[1:3])
                    bar.total = total
                    bar.n = done
                    bar.refresh()
                else:
                    errors.append(line.rstrip())

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            out, _ = proc.communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise Skip(f"CrypTen did not finish within {timeout:g} s") from None
        finally:
            reader.join(5)
            bar.close()
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = next((e for e in reversed(errors) if e.strip()), "no output")
        raise Skip(f"CrypTen worker exited {proc.returncode}: {last}") from None
    if "error" in result:
        last = [ln for ln in result["error"].splitlines() if ln.strip()]
        raise Skip(f"CrypTen failed: {last[-1] if last else result['error']}")
    result["setup_s"] = round(setup_s, 1)
    result["venv"] = str(VENV.relative_to(REPO))
    return result


def crypten_summary(raw: dict[str, Any], batches: list[int]) -> dict[str, Any]:
    """The worker's rows as this benchmark reports them, plus its labels."""
    rows = raw["rows"]
    labels: dict[int, int] = {}
    per_batch: dict[str, Any] = {}
    for b in batches:
        for output in ("logits", "label"):
            row = rows[f"{output}_b{b}"]
            labels.update({int(k): v for k, v in row["labels"].items()})
        lab, log = rows[f"label_b{b}"], rows[f"logits_b{b}"]
        per_batch[str(b)] = {
            "batch": b,
            "latency_ms_p50": lab["latency_ms_p50"],
            "latency_ms_p50_logits": log["latency_ms_p50"],
            "images_per_s": lab["images_per_s"],
            "images_per_s_logits": log["images_per_s"],
            "rounds": lab["rounds"],
            "rounds_logits": log["rounds"],
            "bytes_per_image": lab["bytes"] // b,
            "bytes_per_image_logits": log["bytes"] // b,
            "ttp_rounds": lab["ttp_rounds"],
            "ttp_bytes_per_image": lab.get("ttp_bytes", 0) // b,
        }
    first = per_batch[str(min(batches))]
    return {
        "latency_ms_p50_logits": first["latency_ms_p50_logits"],
        "latency_ms_p50_label": first["latency_ms_p50"],
        "rounds_logits": first["rounds_logits"],
        "rounds_label": first["rounds"],
        "bytes_logits": first["bytes_per_image_logits"],
        "bytes_label": first["bytes_per_image"],
        "batches": per_batch,
        "version": raw.get("crypten_version"),
        "torch": raw.get("torch_version"),
        "provider": raw.get("provider"),
        "setup_s": raw.get("setup_s"),
        "venv": raw.get("venv"),
        "labels": labels,
    }


# -- the race -----------------------------------------------------------------------------------


def _mismatches(reference: dict[int, int], labels: dict[int, int]) -> list[dict[str, int]]:
    return [
        {"image": i, "label": labels[i], "plaintext": reference[i]}
        for i in sorted(labels)
        if labels[i] != reference[i]
    ]


def race(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    batches = args.batch_sizes
    big = max(batches)
    model, state = _load()
    layers = model.layers()
    x = _images(big)
    truth = np.load(IMAGES)["labels"][:big]
    out: dict[str, Any] = {
        "model": "cnn (tests/fixtures/cnn.safetensors)",
        "batch_sizes": batches,
        "throughput_batch": big,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2)},
    }
    errors: dict[str, str] = {}

    plain = bench_plaintext(model, x, batches, args.repeats)
    out["plaintext_ms"] = plain["batches"]["1" if 1 in batches else str(batches[0])][
        "latency_ms_p50"
    ]
    out["plaintext"] = {"batches": plain["batches"]}
    labels = {"plaintext": plain["labels"]}

    out["engine"] = {}
    for name in engine_protocols():
        try:
            row = bench_engine(model, state, x, batches, args.repeats, name)
        except Exception as exc:  # one protocol failing must not hide the others
            errors[f"engine_{name}"] = f"{type(exc).__name__}: {exc}"
            say(f"race: engine protocol {name} failed: {type(exc).__name__}: {exc}")
            continue
        labels[f"engine_{name}"] = row.pop("labels")
        b1 = row["batches"][str(batches[0])]
        logits = row["batches"].get("1_logits", {})
        out["engine"][name] = {
            "latency_ms_p50": b1["latency_ms_p50"],
            "latency_ms_p50_logits": logits.get("latency_ms_p50"),
            "images_per_s": row["batches"][str(big)]["images_per_s"],
            "rounds": b1["rounds"],
            "rounds_logits": logits.get("rounds"),
            "bytes_per_image": b1["bytes_per_image"],
            "bytes_per_image_logits": logits.get("bytes_per_image"),
            "dealer_ms_p50": b1["dealer_ms_p50"],
            "batches": row["batches"],
        }
    best = min(out["engine"], key=lambda k: out["engine"][k]["latency_ms_p50"], default=None)
    out["engine_best"] = best

    out["service_latency_ms_p50"] = out["service_latency_ms_p95"] = None
    out["service_images_per_s"] = None
    if not args.no_service:
        try:
            svc = bench_service(state, layers, x, batches, args.repeats, best)
            labels["service"] = svc.pop("labels")
            b1 = svc["batches"][str(batches[0])]
            out["service_latency_ms_p50"] = b1["latency_ms_p50"]
            out["service_latency_ms_p95"] = b1["latency_ms_p95"]
            out["service_images_per_s"] = svc["batches"][str(big)]["images_per_s"]
            out["service"] = svc
        except Exception as exc:
            errors["service"] = f"{type(exc).__name__}: {exc}"
            say(f"race: service failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")

    out["crypten"] = None
    if args.no_crypten:
        out["crypten_skipped"] = "--no-crypten"
    else:
        try:
            raw = run_crypten(layers, state, x, batches, args.repeats, args.crypten_timeout)
            cr = crypten_summary(raw, batches)
            labels["crypten"] = cr.pop("labels")
            out["crypten"] = cr
        except Skip as exc:
            out["crypten_skipped"] = str(exc)
            say(f"race: CrypTen skipped: {exc}")
        except Exception as exc:  # anything else CrypTen does wrong is a skip, too
            out["crypten_skipped"] = f"{type(exc).__name__}: {exc}"
            say(f"race: CrypTen skipped: {type(exc).__name__}: {exc}")

    ref = labels["plaintext"]
    mism = {k: _mismatches(ref, v) for k, v in labels.items() if k != "plaintext"}
    out["labels"] = {
        "images": big,
        "plaintext_accuracy": float(np.mean(np.array([ref[i] for i in range(big)]) == truth)),
        "checked": {k: len(v) for k, v in labels.items() if k != "plaintext"},
        "mismatches": {k: len(v) for k, v in mism.items()},
        "mismatched": {k: v for k, v in mism.items() if v},
        "agree": not any(mism.values()),
    }

    ratios: dict[str, Any] = {}
    eng = out["engine"].get(best) if best else None
    cr = out["crypten"]
    if eng and cr:
        ratios["label_b1"] = round(cr["latency_ms_p50_label"] / eng["latency_ms_p50"], 2)
        if eng["latency_ms_p50_logits"]:
            ratios["logits_b1"] = round(
                cr["latency_ms_p50_logits"] / eng["latency_ms_p50_logits"], 2
            )
        ratios[f"images_per_s_b{big}"] = round(
            eng["images_per_s"] / cr["batches"][str(big)]["images_per_s"], 2
        )
        ratios["rounds_label"] = round(cr["rounds_label"] / eng["rounds"], 2)
        ratios["bytes_label"] = round(cr["bytes_label"] / eng["bytes_per_image"], 2)
        if out["service_latency_ms_p50"]:
            ratios["service_label_b1"] = round(
                cr["latency_ms_p50_label"] / out["service_latency_ms_p50"], 2
            )
    out["speedup_vs_crypten"] = ratios.get("label_b1")
    out["vs_crypten"] = ratios
    if eng:
        out["engine_vs_plaintext_b1"] = round(eng["latency_ms_p50"] / out["plaintext_ms"], 1)
    if errors:
        out["errors"] = errors
    return out


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "-" if v is None else ""
    if isinstance(v, float):
        return f"{v:.3g}" if v < 10 else f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"
    return f"{v:,}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def print_table(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    big, b0 = out["throughput_batch"], out["batch_sizes"][0]
    cr = out["crypten"]
    table = Table(title="Private inference race: default CNN, same weights, one machine")
    heads = ["system", f"b{b0} label ms", f"b{b0} logits ms", f"b{big} ms", f"img/s b{big}"]
    heads += ["rounds", "MiB/img", "CrypTen/this"]
    for col in heads:
        table.add_column(col, justify="left" if col == "system" else "right")

    def ratio(ms: float | None) -> str:
        return f"{cr['latency_ms_p50_label'] / ms:.1f}x" if cr and ms else "-"

    p = out["plaintext"]["batches"]
    table.add_row(
        "plaintext PyTorch",
        _fmt(p[str(b0)]["latency_ms_p50"]),
        "",
        _fmt(p[str(big)]["latency_ms_p50"]),
        _fmt(p[str(big)]["images_per_s"]),
        *[""] * 3,
    )
    for name, e in out["engine"].items():
        star = " *" if name == out["engine_best"] and len(out["engine"]) > 1 else ""
        rounds = str(e["rounds"]) + (f" ({e['rounds_logits']})" if e["rounds_logits"] else "")
        table.add_row(
            f"engine {name}{star}",
            _fmt(e["latency_ms_p50"]),
            _fmt(e["latency_ms_p50_logits"]),
            _fmt(e["batches"][str(big)]["latency_ms_p50"]),
            _fmt(e["images_per_s"]),
            rounds,
            _mib(e["bytes_per_image"]),
            ratio(e["latency_ms_p50"]),
        )
    if out.get("service"):
        s = out["service"]["batches"]
        table.add_row(
            f"service ({out['service']['protocol']})",
            _fmt(s[str(b0)]["latency_ms_p50"]),
            "",
            _fmt(s[str(big)]["latency_ms_p50"]),
            _fmt(s[str(big)]["images_per_s"]),
            _fmt(s[str(b0)]["rounds"]),
            _mib(s[str(b0)]["bytes_per_image"]),
            ratio(s[str(b0)]["latency_ms_p50"]),
        )
    if cr:
        c = cr["batches"][str(big)]
        table.add_row(
            "CrypTen 0.4.1 2PC+TTP",
            _fmt(cr["latency_ms_p50_label"]),
            _fmt(cr["latency_ms_p50_logits"]),
            _fmt(c["latency_ms_p50"]),
            _fmt(c["images_per_s"]),
            f"{cr['rounds_label']} ({cr['rounds_logits']})",
            _mib(cr["bytes_label"]),
            "1.0x",
        )
    console = Console(width=max(Console().width, 110))
    console.print(table)
    notes = [
        "latency p50; rounds: label output (logits in brackets); MiB between the two parties"
        f" per image at batch {b0}, both directions; * fastest engine protocol"
    ]
    if out.get("service"):
        s0 = out["service"]["batches"][str(b0)]
        notes.append(f"service batch-{b0} p95: {_fmt(s0['latency_ms_p95'])} ms")
    if cr:
        cb = cr["batches"][str(b0)]
        notes.append(
            f"speedup_vs_crypten (batch-{b0} label, best engine protocol): "
            f"{out['speedup_vs_crypten']}x; CrypTen's TTP adds {cb['ttp_rounds']} messages and "
            f"{_mib(cb['ttp_bytes_per_image'])} MiB with party 0"
        )
        if cr.get("setup_s"):
            notes.append(f"CrypTen venv created in {cr['setup_s']} s ({cr['venv']})")
    else:
        notes.append(f"CrypTen skipped: {out.get('crypten_skipped')}")
    lab = out["labels"]
    agree = "all agree" if lab["agree"] else f"MISMATCHES {lab['mismatches']}"
    notes.append(f"labels vs plaintext on {lab['images']} images: {agree}")
    for key, msg in out.get("errors", {}).items():
        notes.append(f"{key} failed: {msg.splitlines()[0]}")
    for note in notes:
        console.print(note, highlight=False)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 1000:
        raise argparse.ArgumentTypeError("batch sizes must lie in 1..1000")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.race",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 runs per system")
    parser.add_argument("--no-crypten", action="store_true", help="leave CrypTen out")
    parser.add_argument("--no-service", action="store_true", help="leave the service out")
    parser.add_argument(
        "--batch-sizes", type=_batch_sizes, default=[1, 64], help="comma list (default 1,64)"
    )
    parser.add_argument(
        "--crypten-timeout", type=float, default=1800.0, help="seconds for CrypTen's runs"
    )
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the service's processes do
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the two parties share the two cores; plaintext gets one too
    try:
        out = race(args, lambda msg: print(msg, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 1 if out.get("errors") or not out["engine"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""CrypTen 0.4.1 side of `benchmarks.race`: runs under the CrypTen venv's python, not the project's.

    python _crypten_worker.py INPUT.pt [--repeats 10] [--batch-sizes 1,64] [--timeout 900]

INPUT.pt (written by `benchmarks.race`, loaded with `weights_only=True`) holds the layer list as
JSON (the engine's manifest format), the plaintext state dict and the images (N,1,28,28) in
[0, 1]. This script starts CrypTen's two parties and its trusted third party (TTP provider) as
three processes that rendezvous over gloo on 127.0.0.1, encrypts the model (party 0 owns it),
and for each batch size times private inference from encrypting the input (party 1 owns it)
to the revealed output, once for the logits and once for the label (CrypTen's one-hot argmax).
It prints one JSON object on stdout; progress goes to stderr as `PROGRESS done total` lines.

Rounds and bytes are what party 1's communicator logs for one query (CrypTen counts a party's
sent plus received elements, 8 bytes each): party 1 never talks to the TTP, so that is the
traffic between the two parties. `ttp_rounds` and `ttp_bytes` are what party 0 adds in its
exchanges with the TTP (on-the-fly triples: one request and one answer per product).
CrypTen's preprocessing (`crypten.fill_cache`) fails in 0.4.1: triples are made on the fly.

Needs only torch and CrypTen; it must not import the project (another venv, another numpy).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback


def _shim_torch() -> None:
    """Two fixes CrypTen 0.4.1 needs under torch 2.13, applied before `import crypten`."""
    import importlib

    import torch

    try:
        importlib.import_module("torch.onnx._internal.registration")
    except ImportError:  # moved under the TorchScript exporter
        sys.modules["torch.onnx._internal.registration"] = importlib.import_module(
            "torch.onnx._internal.torchscript_exporter.registration"
        )
    export = torch.onnx.export
    if getattr(export, "_race_shim", False):
        return

    def legacy_export(*args, **kwargs):  # crypten.nn.from_pytorch reads the legacy ONNX graph
        kwargs.setdefault("dynamo", False)
        return export(*args, **kwargs)

    legacy_export._race_shim = True  # type: ignore[attr-defined]
    torch.onnx.export = legacy_export


def build_model(layers: list[dict], state: dict):
    """A plaintext torch model of the engine's layer list, with the given weights."""
    import torch
    from torch import nn

    mods: list[nn.Module] = []
    for layer in layers:
        kind = layer["type"]
        if kind == "conv2d":
            m = nn.Conv2d(
                int(layer["in_channels"]),
                int(layer["out_channels"]),
                int(layer["kernel_size"]),
                stride=int(layer.get("stride", 1)),
                padding=int(layer.get("padding", 0)),
            )
        elif kind == "linear":
            m = nn.Linear(int(layer["in_features"]), int(layer["out_features"]))
        elif kind == "avgpool2d":
            m = nn.AvgPool2d(int(layer["kernel_size"]))
        elif kind == "maxpool2d":
            m = nn.MaxPool2d(int(layer["kernel_size"]))
        elif kind == "relu":
            m = nn.ReLU()
        elif kind == "flatten":
            m = nn.Flatten(1)
        else:
            raise ValueError(f"layer type {kind!r} has no CrypTen counterpart here")
        if kind in ("conv2d", "linear"):
            with torch.no_grad():
                m.weight.copy_(state[f"{layer['name']}.weight"].float())
                m.bias.copy_(state[f"{layer['name']}.bias"].float())
        mods.append(m)
    return nn.Sequential(*mods).eval()


def _progress(done: int, total: int) -> None:
    print(f"PROGRESS {done} {total}", file=sys.stderr, flush=True)


def _party(rank: int, args: dict, queue) -> None:
    """One of CrypTen's parties (0 and 1) or, as rank 2, its trusted third party."""
    try:
        os.environ["RANK"] = str(rank)
        _shim_torch()
        import crypten
        import crypten.communicator as comm
        import torch
        import torch.distributed as dist

        torch.set_num_threads(args["threads"])  # 1: three processes on two shared cores
        crypten.cfg.mpc.provider = "TTP"
        crypten.cfg.communicator.verbose = True  # count rounds and bytes
        if rank == 2:
            crypten.init()
            crypten.mpc.provider.TTPServer()  # serves until party 0 says terminate
            crypten.uninit()
            queue.put((rank, None))
            return
        crypten.init()
        data = torch.load(args["input"], weights_only=True)
        layers = json.loads(data["layers"])
        images = data["images"].float()
        model = build_model(layers, data["state"])
        dummy = torch.zeros((1, *images.shape[1:]))
        private = crypten.nn.from_pytorch(model, dummy).encrypt(src=0)
        private.eval()
        party = comm.get()

        def query(x: torch.Tensor, output: str):
            """(seconds, labels, party-1 stats) of one private inference."""
            dist.barrier(group=party.main_group)
            party.reset_communication_stats()
            t0 = time.perf_counter()
            with crypten.no_grad():
                enc = crypten.cryptensor(x, src=1)
                out = private(enc)
                if output == "label":
                    out = out.argmax(dim=1, one_hot=True)
                plain = out.get_plain_text()
            seconds = time.perf_counter() - t0
            stats = party.get_communication_stats()
            return seconds, plain.argmax(dim=1).tolist(), stats

        batch_sizes = args["batch_sizes"]
        repeats = args["repeats"]
        runs = {b: repeats if b == 1 else max(3, repeats // 10) for b in batch_sizes}  # as race.py
        total = sum(2 * (runs[b] + 1) for b in batch_sizes)
        done = 0
        rows: dict[str, dict] = {}
        n = images.shape[0]
        for b in batch_sizes:
            for output in ("logits", "label"):
                times, labels, stats = [], {}, None
                for r in range(runs[b] + 1):  # the first run warms up and is not timed
                    start = (r * b) % n if b == 1 else 0
                    idx = [(start + k) % n for k in range(b)]
                    seconds, lab, st = query(images[idx], output)
                    labels.update(zip(idx, lab, strict=True))
                    if r:
                        times.append(seconds)
                    stats = stats or st
                    done += 1
                    if rank == 0:
                        _progress(done, total)
                rows[f"{output}_b{b}"] = {
                    "batch": b,
                    "output": output,
                    "latency_ms": [round(t * 1e3, 3) for t in times],
                    "latency_ms_p50": round(statistics.median(times) * 1e3, 2),
                    "images_per_s": round(b / statistics.median(times), 2),
                    "rounds": int(stats["rounds"]),
                    "bytes": int(stats["bytes"]),
                    "labels": {str(k): int(v) for k, v in labels.items()},
                }
        queue.put((rank, rows))
        crypten.uninit()
    except BaseException:
        queue.put((rank, {"error": traceback.format_exc()}))
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="the .pt file benchmarks.race writes")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for everything")
    a = p.parse_args(argv)
    args = {
        "input": a.input,
        "repeats": a.repeats,
        "threads": a.threads,
        "batch_sizes": [int(b) for b in a.batch_sizes.split(",") if b.strip()],
    }
    t0 = time.perf_counter()
    _shim_torch()
    import crypten  # fail here rather than in three children
    import torch

    import_s = time.perf_counter() - t0
    os.environ.update(
        {
            "WORLD_SIZE": "2",
            "RENDEZVOUS": f"tcp://127.0.0.1:{_free_port()}",
            "DISTRIBUTED_BACKEND": "gloo",
            "GLOO_SOCKET_IFNAME": "lo",
            "MASTER_ADDR": "127.0.0.1",
        }
    )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = []
    for rank in range(3):
        proc = ctx.Process(target=_party, args=(rank, args, queue), daemon=True)
        proc.start()
        procs.append(proc)
    results: dict[int, object] = {}
    deadline = time.monotonic() + a.timeout
    error = None
    while len(results) < 3 and error is None:
        try:
            rank, value = queue.get(timeout=1.0)
            results[rank] = value
            if isinstance(value, dict) and "error" in value:
                error = f"party {rank} failed:\n{value['error']}"
        except Exception:  # queue.Empty: check on the children
            dead = [i for i, pr in enumerate(procs) if pr.exitcode not in (None, 0)]
            if dead and not error:
                error = f"CrypTen process {dead[0]} exited with code {procs[dead[0]].exitcode}"
            if time.monotonic() > deadline:
                error = f"CrypTen did not finish within {a.timeout:g} s"
    for proc in procs:
        proc.join(5 if error is None else 0.5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if error:
        print(json.dumps({"error": error}))
        return 1
    rows = results[0]
    for key, row in rows.items():  # party 1 talks only to party 0; party 0 also to the TTP
        other = results[1][key]
        row["ttp_rounds"] = row["rounds"] - other["rounds"]
        row["ttp_bytes"] = row["bytes"] - other["bytes"]
        row["rounds"], row["bytes"] = other["rounds"], other["bytes"]
    print(
        json.dumps(
            {
                "crypten_version": crypten.__version__,
                "torch_version": torch.__version__,
                "provider": "TTP",
                "parties": 2,
                "import_s": round(import_s, 2),
                "threads_per_party": a.threads,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

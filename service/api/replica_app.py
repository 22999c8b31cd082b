"""A replica's web app: it holds one share of the model and runs the network with its peer.

Routes (the contract is `openapi.yaml`): `GET /v1/health`, `GET /v1/ready`, `GET /v1/model`,
`POST /v1/predict`, `POST /v1/admin/reload` (the operator's admin key), `GET /metrics`, and the
WebSocket `/v1/peer` (party 1 accepts party 0 there; protocol rounds run on the direct lanes
of `lanes.py` when they are up). One predict request:
  1. validate the body and the share's shape; refuse a request id seen before (409);
  2. pair it with the peer's copy and batch it with concurrent ones (`batching.py`: party 0
     pairs, checks both copies describe the same job, and announces each batch);
  3. fetch this party's randomness for the batch id from the dealer;
  4. run `PrivateNetwork.forward` on the batch in a worker thread over the peer channel;
  5. answer with this request's rows of this party's share of the label (XOR) or logits.
What this replica sees: its share of the image, its share of the weights, masked openings.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Header, Request, Security, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import identity
from service.api import auth
from service.api.batching import Batcher, Run
from service.api.dealer_client import DealerClient
from service.api.errors import ERRORS, ApiError, RequestGuard, install_error_handlers
from service.api.observability import ReplicaMetrics
from service.api.prefetch import MaterialPool
from service.api.schemas import (
    ErrorBody,
    Health,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    Readiness,
    ReloadResult,
    Tensor,
)
from service.api.settings import ReplicaSettings
from service.api.transport import wire
from service.api.transport.lanes import Lanes
from service.api.transport.peer import (
    FramedChannel,
    MaterialMismatch,
    PeerAborted,
    PeerLink,
    PeerLost,
    PeerTimeout,
)
from service.mpc.beaver import WeightMasks
from service.mpc.channel import ChannelError
from service.mpc.dealer import Randomness
from service.mpc.party import Party
from service.store import LoadedModel, ModelRegistry, StoreError

log = logging.getLogger("privdigit.replica")


PROTOCOL_TAG = "comparison="  # the marker among the advertised versions naming the protocol

# The peer's own failures, reported here as `peer_error`; its other codes pass through as-is.
_PEER_FAULTS = {"internal", "peer_timeout"}


class ReplayGuard:
    """Request ids this replica has accepted; a second use within the window is refused (409).

    Client request ids carry no time, so the guard times them itself: it remembers each id for
    `window_s` seconds after claiming it, and at most `capacity` ids (when more arrive within a
    window, the oldest go early). Memory is bounded by min(capacity, claim rate x window). An id
    forgotten can run again; that reuses no randomness (every run has a fresh run id, so fresh
    dealer material), see docs/security.md, section 4.3.
    """

    def __init__(
        self,
        capacity: int = 1_000_000,
        window_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()  # id -> claim time, oldest first
        self._capacity, self._window, self._clock = capacity, window_s, clock

    def claim(self, request_id: str) -> None:
        now = self._clock()
        while self._seen:
            rid, claimed = next(iter(self._seen.items()))
            if claimed > now - self._window:
                break
            del self._seen[rid]
        if request_id in self._seen:
            raise ApiError("replayed_request", f"request id {request_id!r} was already used")
        self._seen[request_id] = now
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


class _StarletteConn:
    """Starlette's WebSocket as the peer link's `Conn`."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, bytes):
            await self._ws.send_bytes(data)
        else:
            await self._ws.send_text(data)

    async def recv(self) -> bytes | str:
        msg = await self._ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise ConnectionError("peer closed the stream")
        return msg["bytes"] if msg.get("bytes") is not None else msg.get("text", "")

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code, reason)


class Replica:
    """Everything one replica process holds; built once by `create_replica_app`, never global."""

    def __init__(self, settings: ReplicaSettings) -> None:
        self.settings = s = settings
        self.party = s.party
        self.metrics = ReplicaMetrics()
        peer_key, dealer_key = s.peer_secret.encode(), s.dealer_secret.encode()
        self.admin = auth.AdminGuard(s.admin_secret.encode(), s.party)
        # With TLS and a CA: this replica shows its own certificate when it dials, and expects
        # the other replica's (peer stream, lanes) or the dealer's.
        self.mutual_tls = s.tls_cert is not None and s.tls_ca is not None
        self.peer_role = identity.replica_role(1 - s.party)
        self.registry = ModelRegistry(s.model, s.party, comparison=s.comparison)
        # The comparison protocol travels with the held versions (authenticated by the
        # handshake), so replicas that would run different protocols never pair up.
        self.protocol_tag = f"{PROTOCOL_TAG}{s.comparison}"
        self.peer = PeerLink(
            peer_key,
            lambda: [*self.registry.versions(), self.protocol_tag],
            timeout=s.peer_timeout_s,
            on_auth_failure=lambda: self.metrics.auth_failures.labels("peer").inc(),
        )
        self.ssl = identity.client_context(s.tls_ca, s.tls_cert, s.tls_key)
        self.dealer = DealerClient(
            s.dealer_url,
            dealer_key,
            s.party,
            timeout=s.dealer_timeout_s,
            context=self.ssl,
            expect_role=identity.DEALER_ROLE if self.mutual_tls else None,
        )
        self._api_keys = [hashlib.sha256(k.encode()).digest() for k in s.api_keys]
        self.draining = False
        self.replay = ReplayGuard(window_s=s.replay_window_s)
        self.lanes = Lanes(
            s.party,
            peer_key,
            count=s.max_batches if s.lanes else 0,
            timeout=s.peer_timeout_s,
            on_auth_failure=lambda: self.metrics.auth_failures.labels("lane").inc(),
        )
        self.lane_port: int | None = None  # party 1: where its lanes listen
        self.pool = MaterialPool(
            self._fetch_material,
            s.prefetch,
            on_drop=self._prefetch_dropped,
            max_entries=s.prefetch_max_entries,
            max_age_s=s.prefetch_max_age_s,
        )
        self._dealer = b""  # the dealer instance of the newest material fetched
        self.inflight = 0
        self.batcher = Batcher(
            s.party,
            self.peer,
            self.registry,
            self.run_batch,
            self.lanes,
            max_batch=s.max_batch,
            max_batches=s.max_batches,
            timeout=s.peer_timeout_s,
            weights_opened=lambda model: model.version in self.weight_masks,
            pool=self.pool,
            scores_enabled=s.scores_enabled,
            on_refuse=lambda reason: self.metrics.batches_refused.labels(reason).inc(),
        )
        # Per model version: the dealer instance whose seeds made the masks, and the opened
        # masked weights (public to both replicas). Party 0 forgets them with the connection, so
        # the next run on a new one opens them again; material from a restarted dealer comes
        # with new masks, so both replicas open the weights again for it.
        self.weight_masks: dict[str, tuple[bytes, WeightMasks]] = {}
        self.peer.on_control = self._on_control
        self.peer.on_connect = self._on_connect
        self.peer.on_disconnect = self._on_disconnect

    def _prefetch_dropped(self, ids: list[str]) -> None:
        self.metrics.prefetch.labels("dropped").inc(len(ids))
        self.batcher.discarded(ids)  # party 0 names them to party 1

    def _on_connect(self) -> None:
        if self.party == 1 and self.lane_port is not None:
            self.peer.send(wire.encode_json(wire.LANES, "", {"port": self.lane_port}))

    def _on_control(self, frame: wire.Frame) -> None:
        if frame.kind != wire.LANES:
            self.batcher.on_control(frame)
            return
        port = (frame.payload or {}).get("port")
        if self.party == 0 and self.settings.lanes and isinstance(port, int) and 0 < port < 65536:
            tls, role = self.peer_transport()
            host = urlsplit(self.settings.peer_url).hostname or "127.0.0.1"
            self.lanes.connect_to(host, port, tls, check_role=role is not None)

    def peer_transport(self) -> tuple[ssl.SSLContext | None, str | None]:
        """Party 0: how it dials party 1 (stream and lanes): TLS where the peer URL is wss://,
        and, with mutual TLS, the role party 1's certificate must name."""
        if urlsplit(self.settings.peer_url).scheme != "wss":
            return None, None
        return self.ssl, (self.peer_role if self.mutual_tls else None)

    def _on_disconnect(self, reason: str) -> None:
        self.weight_masks.clear()
        if self.party == 0:
            self.lanes.forget_target()
        else:
            self.lanes.close_all()
        self.batcher.on_disconnect(reason)

    def start_lanes(self) -> None:
        """Party 1: listen for lanes; party 0: dial them once party 1 names its port."""
        s = self.settings
        if not s.lanes:
            return
        if self.party == 1:
            tls = None
            if s.tls_cert is not None and s.tls_key is not None:
                tls = identity.server_context(s.tls_cert, s.tls_key, s.tls_ca)
            self.lane_port = self.lanes.listen(s.host, s.lane_port, tls)
            log.info("lanes listening", extra={"fields": {"port": self.lane_port}})
        else:
            threading.Thread(target=self.lanes.dial_forever, name="lane-dial", daemon=True).start()

    def check_api_key(self, key: str | None) -> None:
        """Refuse (401) a client without a valid X-API-Key when the operator set keys."""
        if not self._api_keys:
            return
        digest = hashlib.sha256((key or "").encode()).digest()
        if not any(hmac.compare_digest(digest, k) for k in self._api_keys):
            self.metrics.auth_failures.labels("client").inc()
            raise ApiError("unauthenticated", "missing or unknown API key (header X-API-Key)")

    # -- readiness -----------------------------------------------------------------------------

    def protocol_problem(self) -> str | None:
        """Why this replica and its peer cannot run one protocol together, or None."""
        theirs = [v for v in self.peer.peer_versions if v.startswith(PROTOCOL_TAG)]
        if theirs == [self.protocol_tag]:
            return None
        peer = theirs[0].removeprefix(PROTOCOL_TAG) if theirs else "unknown"
        return (
            f"comparison protocols differ: this replica runs {self.settings.comparison}, "
            f"the peer {peer}; set PRIVDIGIT_COMPARISON (--comparison) alike on both"
        )

    def readiness(self) -> Readiness:
        latest = self.registry.latest
        serving = self.registry.newest_common(self.peer.peer_versions)
        reasons = ["shutting down"] if self.draining else []
        if latest is None:
            reasons.append(f"no model loaded: {self.registry.last_error or 'not yet loaded'}")
        if not self.peer.connected:
            reasons.append(f"peer not connected ({self.peer.last_error or 'waiting for it'})")
        elif problem := self.protocol_problem():
            reasons.append(problem)
        elif latest is not None and serving is None:
            reasons.append(
                f"model versions disagree: this replica holds {self.registry.versions()}, "
                f"the peer {self.peer.peer_versions}"
            )
        ready = not reasons
        self.metrics.ready.set(1 if ready else 0)
        return Readiness(
            ready=ready,
            party=self.party,
            model_version=latest.version if latest else None,
            serving_version=serving.version if serving else None,
            peer_connected=self.peer.connected,
            peer_versions=self.peer.peer_versions,
            reasons=reasons,
            last_reload_error=self.registry.last_error,
        )

    async def drain(self) -> None:
        """Stop taking requests (503) and wait for the in-flight ones to finish."""
        self.draining = True
        log.info("draining", extra={"fields": {"inflight": self.inflight}})
        deadline = time.monotonic() + self.settings.peer_timeout_s + 5
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- reload --------------------------------------------------------------------------------

    async def reload(self) -> bool:
        try:
            changed = await asyncio.to_thread(self.registry.reload)
        except StoreError as exc:
            self.metrics.reloads.labels("refused").inc()
            log.warning("model reload refused; keeping %s: %s", self.registry.versions(), exc)
            raise
        if changed:
            held = set(self.registry.versions())
            for version in [v for v in list(self.weight_masks) if v not in held]:
                self.weight_masks.pop(version, None)  # opened for a version no longer held
            self.metrics.reloads.labels("loaded").inc()
            log.info("model loaded", extra={"fields": {"versions": self.registry.versions()}})
            await self.peer.announce()
        return changed

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            if self.registry.changed_on_disk():
                with contextlib.suppress(StoreError):
                    await self.reload()

    # -- one inference (worker thread) ---------------------------------------------------------

    def _fetch_material(
        self, material_id: str, model: LoadedModel, batch: int, output: str
    ) -> Randomness:
        """Worker thread: this party's dealer material for one run, expanded (offline work)."""
        kind = "label" if output == "label" else "logits"
        plan = model.network.plan(batch, kind, model.weight_shapes, model.mask_id)
        rand = Randomness(self.dealer.fetch(material_id, plan)).prefetch()
        if rand.dealer != self._dealer:  # the dealer restarted: older entries no longer fit
            self._dealer = rand.dealer
            self.pool.forget_other_dealers(rand.dealer)
        return rand

    def _material(self, run: Run, batch: int) -> Randomness:
        entry = self.pool.take(run.material_id) if run.material_id != run.batch_id else None
        if entry is not None and entry.fits(run.model, batch, run.output):
            try:
                rand = entry.future.result(timeout=self.settings.dealer_timeout_s)
                self.metrics.prefetch.labels("hit").inc()
                return rand
            except Exception:  # cancelled or failed: fetch it now, the dealer decides
                pass
        self.metrics.prefetch.labels("miss").inc()
        return self._fetch_material(run.material_id, run.model, batch, run.output)

    def run_batch(self, run: Run, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Worker thread: one protocol run on a batch, with the peer, keyed by the batch id.

        `run.open_weights` (party 0 decides, party 1 follows): this run opens the masked weights
        anew; both also open them when none are held for this material's dealer instance. Party
        1 shares the object at once (a run party 0 announces after this one ended sees it
        filled); party 0 keeps it only once the run succeeded.
        """
        model, output = run.model, run.output
        try:
            ch: FramedChannel = (
                self.lanes.channel(run.slot, run.batch_id)
                if run.lane
                else self.peer.channel(run.batch_id)
            )
        except PeerLost as exc:
            raise ApiError("not_ready", f"lost the peer replica: {exc}") from None
        self.metrics.runs.labels("lane" if run.lane else "stream").inc()
        ok = False
        try:
            net, kind = model.network, "label" if output == "label" else "logits"
            t0 = time.perf_counter()
            rand = self._material(run, x.shape[0])
            ch.check = int.from_bytes(rand.dealer[:8], "little", signed=True)
            dealer, masks = self.weight_masks.get(model.version, (b"", None))
            opens = run.open_weights or masks is None or dealer != rand.dealer
            if opens:
                masks = WeightMasks(model.mask_id)
                if self.party == 1:
                    self.weight_masks[model.version] = (rand.dealer, masks)
            t1 = time.perf_counter()
            c1 = time.thread_time()
            party = Party(self.party, ch, rand, net.fp)
            share = net.forward(party, x, model.weights, kind, masks)
            cpu_ms = (time.thread_time() - c1) * 1000
            log.info(
                "run",
                extra={
                    "fields": {
                        "batch_id": run.batch_id,
                        "images": x.shape[0],
                        "prefetched": run.material_id != run.batch_id,
                        "dealer_ms": round((t1 - t0) * 1000, 2),
                        "protocol_ms": round((time.perf_counter() - t1) * 1000, 2),
                        "rounds": ch.stats.rounds,
                        "lane": run.lane,
                        "protocol_cpu_ms": round(cpu_ms, 2),
                    }
                },
            )
            if self.party == 0 and opens:
                self.weight_masks[model.version] = (rand.dealer, masks)
            ok = True
            return share, ch.stats.rounds, ch.stats.bytes_sent
        except ApiError as exc:
            ch.abort(exc.code, exc.message)
            raise
        except PeerAborted as exc:
            code = exc.code if exc.code in ERRORS and exc.code not in _PEER_FAULTS else "peer_error"
            raise ApiError(code, f"the peer replica aborted: {exc}") from None
        except PeerTimeout as exc:
            raise ApiError("peer_timeout", str(exc)) from None
        except MaterialMismatch as exc:  # both replicas see it; stale entries must go
            self.pool.forget_other_dealers(self._dealer)
            raise ApiError("dealer_unavailable", str(exc)) from None
        except PeerLost as exc:
            raise ApiError(
                "not_ready", f"lost the peer replica during the request: {exc}"
            ) from None
        except ChannelError as exc:
            ch.abort("peer_error", str(exc))
            raise ApiError("peer_error", f"protocol error with the peer: {exc}") from None
        except Exception as exc:
            log.exception("inference failed", extra={"fields": {"batch_id": run.batch_id}})
            ch.abort("internal", "the peer replica failed")
            raise ApiError("internal", f"inference failed: {type(exc).__name__}") from None
        finally:
            ch.close(ok)
            if not ok and self.party == 0:  # whatever went wrong, the next run re-opens them
                self.weight_masks.pop(model.version, None)

    # -- one predict request (event loop) ------------------------------------------------------

    async def predict(self, body: PredictRequest, client: str = "") -> PredictResponse:
        """One predict request; `client`: its address (`Batcher.make_room` keeps clients fair)."""
        s = self.settings
        try:
            x = wire.tensor_from_json(body.input.dtype, body.input.shape, body.input.data)
        except wire.WireError as exc:
            raise ApiError("bad_tensor", f"input: {exc}") from None
        latest = self.registry.latest
        if latest is None:
            raise ApiError("not_ready", "no model loaded")
        want_shape = latest.network.input_shape
        if x.dim() != 1 + len(want_shape) or tuple(x.shape[1:]) != want_shape or x.shape[0] < 1:
            raise ApiError(
                "bad_tensor",
                f"input shape {list(x.shape)} is not [n, {', '.join(map(str, want_shape))}]",
            )
        if x.shape[0] > s.max_batch:
            raise ApiError(
                "batch_too_large", f"{x.shape[0]} images; this replica takes at most {s.max_batch}"
            )
        if body.output == "scores" and not s.scores_enabled:
            raise ApiError("scores_disabled", "this deployment returns labels only")
        if body.model_version is not None and self.registry.get(body.model_version) is None:
            raise ApiError(
                "model_version_mismatch",
                f"this replica does not hold model version {body.model_version!r} (it holds "
                f"{self.registry.versions()}); fetch /v1/model again",
            )
        if self.draining:
            raise ApiError("not_ready", "this replica is shutting down; retry on its successor")
        if not self.peer.connected:
            raise ApiError("not_ready", f"peer replica not connected ({self.peer.last_error})")
        if problem := self.protocol_problem():
            raise ApiError("not_ready", problem)
        if self.registry.newest_common(self.peer.peer_versions) is None:
            raise ApiError(
                "not_ready",
                f"the replicas hold no common model version (this one {self.registry.versions()}"
                f", the peer {self.peer.peer_versions})",
            )
        if self.inflight >= s.max_inflight and not self.batcher.make_room(client, s.pair_grace_s):
            raise ApiError(
                "busy", f"{self.inflight} inferences in flight", headers={"Retry-After": "1"}
            )
        self.replay.claim(body.request_id)
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        try:
            res = await self.batcher.submit(
                body.request_id, x, body.output, body.model_version, client
            )
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
        share, model, rounds, nbytes = res.share, res.model, res.rounds, res.peer_bytes
        self.metrics.rounds.inc(rounds * x.shape[0] / res.batch_images)
        self.metrics.peer_bytes.inc(nbytes * x.shape[0] / res.batch_images)
        self.metrics.images.inc(x.shape[0])
        return PredictResponse(
            request_id=body.request_id,
            party=self.party,
            model_version=model.version,
            output=body.output,
            sharing=model.network.label_sharing(share.shape[-1])
            if body.output == "label"
            else "additive",
            frac_bits=model.network.fp.frac_bits,
            share=Tensor(**wire.tensor_to_json(share)),
            serving_version=getattr(
                self.registry.newest_common(self.peer.peer_versions), "version", None
            ),
            rounds=rounds,
            peer_bytes=nbytes,
            batch_images=res.batch_images,
        )


_ERR = {"model": ErrorBody}
API_KEY = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="needed only where the operator configured client API keys",
)


def _errors(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error codes, grouped by status."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        status = ERRORS[code][0]
        entry = out.setdefault(status, {**_ERR, "description": ""})
        entry["description"] = "; ".join(
            d for d in (entry["description"], f"`{code}`: {ERRORS[code][1]}") if d
        )
    return out


API_DESCRIPTION = (
    """One of two replicas of a private MNIST classifier. Neither replica learns the image, the
weights, any activation or the label.

**Use.** Encode the 28x28 image (pixel/255, ink bright, background 0) in fixed point:
`round(v * 2^frac_bits)` as int64, with `frac_bits` from `GET /v1/model`. Split it into two
additive shares over Z_2^64 (`s0` uniform from a cryptographic source, `s1 = x - s0` with
wrapping int64 arithmetic). Post `s0` to replica 0 and `s1` to replica 1, concurrently, with the
same fresh `request_id` and the `model_version` both report. For a label, the answers' `sharing`
says how to open them: `zero` (the default protocol): add the two `share` tensors mod 65521;
each row is 0 at the label and random nonzero elsewhere; `xor` (fss, hybrid): XOR them to a
one-hot `[n, 10]` matrix (`output=scores`, where enabled: add them, read
as signed int64 and divide by 2^frac_bits for the logits).

**Tensors** travel as `{"dtype": "int64", "shape": [...], "data": base64}` where `data` is
standard padded base64 of the little-endian int64 values in C order; never as number lists.

**Errors** are `{"error": {"code": ..., "message": ...}}` with a stable code:

| code | HTTP | when |
|---|---|---|
"""
    + "\n".join(f"| `{c}` | {st} | {why} |" for c, (st, why) in ERRORS.items())
    + "\n"
)


def max_body_bytes(max_batch: int) -> int:
    """Largest predict body: base64 of max_batch images of 784 int64, plus JSON framing."""
    return (max_batch * 784 * 8 * 4) // 3 + 16_384


def create_replica_app(settings: ReplicaSettings) -> FastAPI:
    rep = Replica(settings)
    torch.set_num_threads(settings.torch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with contextlib.suppress(StoreError):
            await rep.reload()
        tasks = [asyncio.create_task(rep.peer.janitor())]
        rep.batcher.start()
        rep.start_lanes()
        if settings.reload_poll_s > 0:
            tasks.append(asyncio.create_task(rep.watch()))
        if settings.party == 0:
            tls, role = rep.peer_transport()
            dial = rep.peer.dial_forever(settings.peer_url, ssl=tls, expect=role)
            tasks.append(asyncio.create_task(dial))
        yield
        await rep.batcher.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        rep.lanes.stop()
        rep.pool.close()
        rep.dealer.close()

    app = FastAPI(
        title="privdigit replica",
        version="1.0.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.replica = rep
    install_error_handlers(app)
    limit = max_body_bytes(settings.max_batch)
    app.add_middleware(  # inside CORS, so that its refusals carry CORS headers
        RequestGuard,
        max_body_bytes=limit,
        body_timeout_s=settings.peer_timeout_s,
        on_refuse=lambda code: rep.metrics.errors.labels(code).inc(),
    )

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["content-type", "x-api-key"],
            max_age=600,
        )

    @app.get("/v1/health", response_model=Health, tags=["status"])
    async def health() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok", party=rep.party)

    @app.get(
        "/v1/ready",
        response_model=Readiness,
        tags=["status"],
        responses={503: {"model": Readiness, "description": "not ready; `reasons` says why"}},
    )
    async def ready() -> JSONResponse:
        """Ready when the share is loaded, the peer is connected and both hold the same version."""
        r = rep.readiness()
        return JSONResponse(r.model_dump(), status_code=200 if r.ready else 503)

    @app.get(
        "/v1/model",
        response_model=ModelInfo,
        tags=["model"],
        responses=_errors("unauthenticated", "not_ready"),
    )
    async def model_info(api_key: str | None = Security(API_KEY)) -> ModelInfo:
        """The public manifest of the model being served (else the newest this replica holds)."""
        rep.check_api_key(api_key)
        serving = rep.registry.newest_common(rep.peer.peer_versions)
        shown = serving or rep.registry.latest
        if shown is None:
            raise ApiError("not_ready", f"no model loaded: {rep.registry.last_error}")
        info = shown.public_info()
        return ModelInfo(
            party=rep.party,
            serving_version=serving.version if serving else None,
            scores_enabled=settings.scores_enabled,
            max_batch=settings.max_batch,
            **info,
        )

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        tags=["inference"],
        responses=_errors(
            "bad_tensor",
            "share_mismatch",
            "unauthenticated",
            "scores_disabled",
            "replayed_request",
            "model_version_mismatch",
            "payload_too_large",
            "batch_too_large",
            "invalid_request",
            "busy",
            "internal",
            "peer_error",
            "not_ready",
            "dealer_unavailable",
            "peer_timeout",
        ),
    )
    async def predict(
        body: PredictRequest, request: Request, api_key: str | None = Security(API_KEY)
    ) -> PredictResponse:
        """Run the network on this party's share of a batch; returns this party's share."""
        started = time.perf_counter()
        try:
            rep.check_api_key(api_key)
            out = await rep.predict(body, request.client.host if request.client else "")
        except ApiError as exc:
            rep.metrics.errors.labels(exc.code).inc()
            rep.metrics.requests.labels(body.output, str(exc.status)).inc()
            log.info(
                "predict refused",
                extra={"fields": {"request_id": body.request_id, "code": exc.code}},
            )
            raise
        ms = (time.perf_counter() - started) * 1000
        rep.metrics.requests.labels(body.output, "200").inc()
        rep.metrics.latency.observe(ms / 1000)
        log.info(
            "predict",
            extra={
                "fields": {
                    "request_id": body.request_id,
                    "batch": body.input.shape[0],
                    "output": body.output,
                    "model_version": out.model_version,
                    "rounds": out.rounds,
                    "peer_bytes": out.peer_bytes,
                    "ms": round(ms, 2),
                }
            },
        )
        return out

    @app.post(
        "/v1/admin/reload",
        response_model=ReloadResult,
        tags=["admin"],
        responses=_errors("unauthenticated", "not_ready"),
    )
    async def reload(
        x_privdigit_auth: str | None = Header(
            default=None,
            description="`time:nonce:mac` from the replica's admin key (`service.api.auth."
            "admin_tag`), usable once within a minute",
        ),
    ) -> ReloadResult:
        """Load the model directory's current model now (also done by the directory watch)."""
        try:
            rep.admin.check(x_privdigit_auth)
        except auth.AuthError as exc:
            rep.metrics.auth_failures.labels("admin").inc()
            raise ApiError("unauthenticated", str(exc)) from None
        try:
            changed = await rep.reload()
        except StoreError as exc:
            raise ApiError("not_ready", f"reload refused, old model kept: {exc}") from None
        latest = rep.registry.latest
        assert latest is not None
        return ReloadResult(
            changed=changed,
            model_version=latest.version,
            message="loaded a new version" if changed else "already serving this version",
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        rep.readiness()
        rep.metrics.pending.set(rep.peer.pending)
        rep.metrics.prefetch_entries.set(len(rep.pool) + rep.pool.claimed)
        return Response(generate_latest(rep.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/v1/peer")
    async def peer(ws: WebSocket) -> None:
        await ws.accept()
        if rep.party != 1:
            rep.metrics.auth_failures.labels("peer").inc()
            await ws.close(4403, "party 0 does not accept peer connections")
            return
        if rep.mutual_tls and identity.scope_role(ws.scope) != rep.peer_role:
            rep.metrics.auth_failures.labels("peer").inc()
            role = identity.scope_role(ws.scope) or "no certificate"
            await ws.close(4403, f"only {rep.peer_role} may dial here, not {role}")
            return
        await rep.peer.run(_StarletteConn(ws), initiator=False)

    return app

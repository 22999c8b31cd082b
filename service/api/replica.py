"""The replica, as a domain object: what one replica process holds and does, without routes.

`Replica` owns the share store (`store.ModelRegistry`), the peer stream and lanes
(`transport/`), the dealer client, the prefetch pool, the batcher (`batching/`), the runner of
protocol runs (`runs.py`), the replay guard (`replay.py`), the metrics and the admin and client
credentials. The routes (`routes/`) reach it through a dependency; `replica_app.py` builds it
once per app, never as a global. One predict request:
  1. validate the body and the share's shape; refuse a request id seen before (409);
  2. pair it with the peer's copy and batch it with concurrent ones (`batching/`: party 0
     pairs, checks both copies describe the same job, and announces each batch);
  3. fetch this party's randomness for the batch id from the dealer;
  4. run `PrivateNetwork.forward` on the batch in a worker thread over the peer channel;
  5. answer with this request's rows of this party's share of the label (or of the logits).
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
from urllib.parse import urlsplit

from service import identity
from service.api import auth
from service.api.batching import Batcher
from service.api.batching.prefetch import MaterialPool
from service.api.dealer_client import DealerClient
from service.api.errors import ApiError
from service.api.observability import ReplicaMetrics
from service.api.replay import ReplayGuard
from service.api.runs import Runner
from service.api.schemas import PredictRequest, PredictResponse, Readiness, Tensor
from service.api.settings import ReplicaSettings
from service.api.transport import messages, wire
from service.api.transport.lanes import Lanes
from service.api.transport.messages import BadMessage, LanesAt
from service.api.transport.peer import PeerLink
from service.store import ModelRegistry, StoreError

log = logging.getLogger("privdigit.replica")


PROTOCOL_TAG = "comparison="  # the marker among the advertised versions naming the protocol


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
        self.mutual_tls = s.mutual_tls
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
        self.runner = Runner(
            s.party,
            self.peer,
            self.lanes,
            self.dealer,
            self.metrics,
            dealer_timeout_s=s.dealer_timeout_s,
        )
        self.pool = self.runner.pool = MaterialPool(
            self.runner.fetch_material,
            s.prefetch,
            on_drop=self._prefetch_dropped,
            max_entries=s.prefetch_max_entries,
            max_age_s=s.prefetch_max_age_s,
        )
        self.inflight = 0
        self.batcher = Batcher(
            s.party,
            self.peer,
            self.registry,
            self.runner.run_batch,
            self.lanes,
            max_batch=s.max_batch,
            max_batches=s.max_batches,
            timeout=s.peer_timeout_s,
            weights_opened=lambda model: model.version in self.runner.weight_masks,
            pool=self.pool,
            scores_enabled=s.scores_enabled,
            on_refuse=lambda reason: self.metrics.batches_refused.labels(reason).inc(),
        )
        self.peer.on_control = self._on_control
        self.peer.on_connect = self._on_connect
        self.peer.on_disconnect = self._on_disconnect

    def _prefetch_dropped(self, ids: list[str]) -> None:
        self.metrics.prefetch.labels("dropped").inc(len(ids))
        self.batcher.discarded(ids)  # party 0 names them to party 1

    def _on_connect(self) -> None:
        if self.party == 1 and self.lane_port is not None:
            messages.send(self.peer, "", LanesAt(self.lane_port))

    def _on_control(self, frame: wire.Frame) -> None:
        if frame.kind != wire.LANES:
            self.batcher.on_control(frame)
            return
        try:
            port = LanesAt.from_payload(frame.payload).port
        except BadMessage:
            return
        if self.party == 0 and self.settings.lanes:
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
        self.runner.weight_masks.clear()
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

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> list[asyncio.Task]:
        """On the event loop, at app start: the background tasks (returned, for `stop`)."""
        s = self.settings
        tasks = [asyncio.create_task(self.peer.janitor())]
        self.batcher.start()
        self.start_lanes()
        if s.reload_poll_s > 0:
            tasks.append(asyncio.create_task(self.watch()))
        if s.party == 0:
            tls, role = self.peer_transport()
            dial = self.peer.dial_forever(s.peer_url, ssl=tls, expect=role)
            tasks.append(asyncio.create_task(dial))
        return tasks

    async def stop(self, tasks: list[asyncio.Task]) -> None:
        await self.batcher.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.lanes.stop()
        self.pool.close()
        self.dealer.close()

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
            masks = self.runner.weight_masks
            for version in [v for v in list(masks) if v not in held]:
                masks.pop(version, None)  # opened for a version no longer held
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

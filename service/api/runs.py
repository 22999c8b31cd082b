"""One protocol run on a batch, in a worker thread: the dealer material it uses (prefetched or
fetched now), the masked weights it opens or reuses, the engine's forward pass over the peer
channel, and the translation of every failure into the API error the batch's clients get.

What a run shows this replica: its own shares, its own dealer material, masked openings.
"""

from __future__ import annotations

import logging
import time

import torch

from service.api.batching.prefetch import MaterialPool
from service.api.batching.scheduler import Run
from service.api.dealer_client import DealerClient
from service.api.errors import ERRORS, ApiError
from service.api.observability import ReplicaMetrics
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
from service.store import LoadedModel

log = logging.getLogger("privdigit.replica")

# The peer's own failures, reported here as `peer_error`; its other codes pass through as-is.
_PEER_FAULTS = {"internal", "peer_timeout"}


class Runner:
    """Runs batches for one replica; `pool` is set once the replica made it (it fetches
    through `fetch_material`)."""

    def __init__(
        self,
        party: int,
        peer: PeerLink,
        lanes: Lanes,
        dealer: DealerClient,
        metrics: ReplicaMetrics,
        *,
        dealer_timeout_s: float,
    ) -> None:
        self.party, self.peer, self.lanes, self.dealer = party, peer, lanes, dealer
        self.metrics, self.dealer_timeout_s = metrics, dealer_timeout_s
        self.pool: MaterialPool | None = None
        self._dealer = b""  # the dealer instance of the newest material fetched
        # Per model version: the dealer instance whose seeds made the masks, and the opened
        # masked weights (public to both replicas). Party 0 forgets them with the connection, so
        # the next run on a new one opens them again; material from a restarted dealer comes
        # with new masks, so both replicas open the weights again for it.
        self.weight_masks: dict[str, tuple[bytes, WeightMasks]] = {}

    def fetch_material(
        self, material_id: str, model: LoadedModel, batch: int, output: str
    ) -> Randomness:
        """Worker thread: this party's dealer material for one run, expanded (offline work)."""
        kind = "label" if output == "label" else "logits"
        plan = model.network.plan(batch, kind, model.weight_shapes, model.mask_id)
        rand = Randomness(self.dealer.fetch(material_id, plan)).prefetch()
        if rand.dealer != self._dealer:  # the dealer restarted: older entries no longer fit
            self._dealer = rand.dealer
            if self.pool is not None:
                self.pool.forget_other_dealers(rand.dealer)
        return rand

    def _material(self, run: Run, batch: int) -> Randomness:
        pool, prefetched = self.pool, run.material_id != run.batch_id
        entry = pool.take(run.material_id) if pool is not None and prefetched else None
        if entry is not None and entry.fits(run.model, batch, run.output):
            try:
                rand = entry.future.result(timeout=self.dealer_timeout_s)
                self.metrics.prefetch.labels("hit").inc()
                return rand
            except Exception:  # cancelled or failed: fetch it now, the dealer decides
                pass
        self.metrics.prefetch.labels("miss").inc()
        return self.fetch_material(run.material_id, run.model, batch, run.output)

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
            if self.pool is not None and run.material_id != run.batch_id:
                self.pool.take(run.material_id)  # promised to this run, which will not come
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
            if self.pool is not None:
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

"""Dynamic batching: which client requests run together, agreed by both replicas.

pairing.py          a request's two shares met across the replicas and checked alike
scheduler.py        party 0's slots and batches (BATCH), both parties' runs on slot threads
follower.py         party 1's checks of each announced batch, and its refusals
prefetch.py         the pool of dealer material fetched ahead of time, bounded
prefetch_policy.py  when party 0 fills it (PREFETCH) and empties it (DISCARD)
batcher.py          `Batcher`: one replica's pieces wired together, control messages routed
"""

from service.api.batching.batcher import Batcher

__all__ = ["Batcher"]

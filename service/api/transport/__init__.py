"""Everything that crosses between the replicas' hosts: the wire formats (`wire.py`), the
authenticated peer stream multiplexed by run id (`peer.py`), the direct per-slot lanes for
protocol rounds (`lanes.py`), and the typed control messages the stream carries
(`messages.py`). No routes and no replica state live here."""

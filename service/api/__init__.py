"""The web layer: FastAPI apps for replica and dealer, their routes, the replica's domain object,
batching, and the transport between the replicas.

    replica_app.py, routes/   the replica's app and its APIRouters (the Replica via `Depends`)
    replica.py, runs.py, replay.py   the replica's domain object, one protocol run, replay guard
    batching/                 pairing, scheduling, party 1's checks, prefetching
    transport/                wire formats, peer stream, lanes, typed control messages
    dealer_app.py, dealer_client.py   the dealer's app and the replicas' client of it
    auth.py, errors.py, settings.py, schemas.py, observability.py   shared by both apps
"""

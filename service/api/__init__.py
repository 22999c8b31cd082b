"""The web layer: FastAPI apps for replica and dealer, the peer stream, settings, schemas."""

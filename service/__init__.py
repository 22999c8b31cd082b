"""Private inference service: the secure-computation engine (`service.mpc`) and its web layer."""

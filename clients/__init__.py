"""The thin privdigit client: numpy, httpx and Pillow only (no torch, no service code)."""

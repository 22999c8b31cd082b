"""The two-party engine: additive secret sharing over Z_2^64 with a dealer of correlated randomness.

Pure protocol code: no HTTP, no files, no settings. Parties, channels and randomness are passed in.
"""

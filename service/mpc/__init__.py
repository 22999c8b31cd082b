"""The two-party engine: additive secret sharing over Z_2^64 with a dealer of correlated randomness.

Pure protocol code: no HTTP, no files, no settings. Parties, channels and randomness are passed in.
"""

# The comparison protocols a deployment picks from (`network.PrivateNetwork.comparison`), the
# default first. Here, free of imports, so that command lines can list them cheaply.
PROTOCOLS = ("lut", "a2b", "fss", "hybrid")

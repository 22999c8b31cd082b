"""Plaintext training: MNIST loading, the reference models, and fixture generation."""

"""Credentials: API key generation and hashing."""

"""Bastion: serve machine-learning models to untrusted clients, safely and at scale."""

__version__ = "0.1.0"

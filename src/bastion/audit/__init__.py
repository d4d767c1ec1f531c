"""The decision log: every decision and admin change, once, in a signed Merkle log (control plane only).

Modules: ``tables`` (SQL), ``crypto`` (the key-encryption seam, data keys, pseudonyms),
``merkle`` / ``signing`` / ``verify`` / ``export`` (the tree, checkpoints, the one verifier and the
export format), ``log`` (appending and reading), ``consumer`` (the ``audit`` stream), ``subjects``
(erasure and access), ``retention`` and ``service`` (the control plane's wiring). The gateway and
the worker never import this package: they write the stream (``bastion.queue.decisions``).
"""

"""Choose the version that answers a request: weighted, sticky per subject, kill switch aware.

A subject (the ``X-Bastion-Subject`` header, or the tenant when absent) is hashed with the model
name into a bucket in ``[0, total weight)``; the routes own consecutive bucket ranges in their
order. The same subject therefore keeps the same version for as long as the weights stand, and
distinct subjects split in proportion to the weights.
"""

from __future__ import annotations

import hashlib

from bastion.errors import NotFound, Unavailable
from bastion.snapshot import ModelRoutes, VersionInfo


def bucket(model: str, subject: str, total: int) -> int:
    digest = hashlib.blake2b(f"{model}\x00{subject}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % total


def choose(model: str, routes: ModelRoutes | None, subject: str) -> tuple[VersionInfo, bool]:
    """(version, answered-by-fallback) for this subject, or NotFound / Unavailable."""
    if routes is None:
        raise NotFound(f"no model {model!r} is being served", model=model)
    if not routes.disabled and len(routes.routes) == 1:
        return routes.routes[0].version, False  # the common case: one production version
    if routes.disabled:
        if routes.fallback is not None:
            return routes.fallback, True
        raise Unavailable(f"model {model!r} is disabled by its operators", retry_after=30, model=model)
    total = routes.total_weight
    if total <= 0:
        raise NotFound(f"no model {model!r} is being served", model=model)
    point = bucket(model, subject, total) if len(routes.routes) > 1 else 0
    for route in routes.routes:
        if point < route.weight:
            return route.version, False
        point -= route.weight
    return routes.routes[-1].version, False  # unreachable: the weights cover [0, total)

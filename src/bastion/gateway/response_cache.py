"""The opt-in response cache: identical inputs to the same model version, per tenant.

A model's ``cache_ttl_s`` (serving options) turns it on. The key is the tenant, the version and
a digest of the validated, encoded input tensors (so two JSON spellings of the same numbers hit
the same entry); a tenant never reads another tenant's entries. Requests with an
Idempotency-Key skip the cache (their retries are answered by the idempotency record).
"""

from __future__ import annotations

import hashlib

from bastion.constants import response_cache_key
from bastion.snapshot import VersionInfo


def key_for(tenant: str, version: VersionInfo, blob: bytes) -> str:
    digest = hashlib.blake2b(blob, digest_size=16).hexdigest()
    return response_cache_key(tenant, version.model, version.version, digest)

"""The tokenizers of published text versions, kept in Redis for gateways: ``tok:{sha256}``.

Gateways count tokens and render chat templates before anything is queued, so each needs the
tokenizer of every text version the snapshot names; they read it from ``tok:{sha256}``
(``bastion.text.jobs.tokenizer_key``), which the control plane writes from the artifact store
when it publishes a snapshot. The digests written are members of the set ``toks``
(``TOKENIZERS_KEY``), so that pruning never scans the keyspace.

``before_publish`` writes the tokenizers a snapshot names that Redis lacks (before readers can see
the snapshot); ``after_publish`` deletes those no published version names, only while this
snapshot is still the published one (an older publisher never prunes a newer snapshot's
tokenizers), and writes again any the snapshot names that a concurrent, older publisher pruned
meanwhile. Stale tokenizers therefore live at most until the next publish.
"""

from __future__ import annotations

from typing import Any

from bastion import logs
from bastion.artifacts.store import ArtifactStore
from bastion.constants import SNAPSHOT_SERIAL_KEY, TOKENIZERS_KEY
from bastion.errors import IntegrityError, NotFound
from bastion.text.jobs import tokenizer_key

log = logs.get("bastion.control")

# KEYS[1] snap:serial  KEYS[2] toks   ARGV[1] the serial published  ARGV[2] 'tok:'  ARGV[3..] digests named
# Returns the digests named that have no tok: key ({} when a newer snapshot is published).
_PRUNE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {}
end
local named = {}
for i = 3, #ARGV do
  named[ARGV[i]] = true
end
for _, sha in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not named[sha] then
    redis.call('DEL', ARGV[2] .. sha)
    redis.call('SREM', KEYS[2], sha)
  end
end
local missing = {}
for i = 3, #ARGV do
  if redis.call('EXISTS', ARGV[2] .. ARGV[i]) == 0 then
    table.insert(missing, ARGV[i])
  end
end
return missing
"""


def named(data: dict[str, Any]) -> list[str]:
    """The tokenizer digests of every text version in a snapshot (``Registry.snapshot``)."""
    found: dict[str, None] = {}
    for model in (data.get("models") or {}).values():
        for version in (model.get("versions") or {}).values():
            text = version.get("text")
            if text and text.get("tokenizer"):
                found[str(text["tokenizer"])] = None
    return list(found)


def before_publish(redis: Any, store: ArtifactStore, digests: list[str]) -> None:
    """Write the tokenizers in ``digests`` that Redis does not hold yet."""
    if not digests:
        return
    pipe = redis.pipeline(transaction=False)
    for sha in digests:
        pipe.exists(tokenizer_key(sha))
    missing = [sha for sha, there in zip(digests, pipe.execute(), strict=True) if not there]
    _write(redis, store, missing)


def after_publish(redis: Any, store: ArtifactStore, serial: int, digests: list[str]) -> None:
    """Delete the tokenizers no version of the published snapshot ``serial`` names, while it is
    the one published; write again those it names that are missing."""
    script = redis.register_script(_PRUNE)
    missing = script(keys=[SNAPSHOT_SERIAL_KEY, TOKENIZERS_KEY], args=[str(serial), tokenizer_key(""), *digests])
    _write(redis, store, [m.decode() if isinstance(m, bytes) else str(m) for m in missing or []])


def _write(redis: Any, store: ArtifactStore, digests: list[str]) -> None:
    for sha in digests:
        try:
            data = store.open(sha)  # checked against its digest on the way
        except (NotFound, IntegrityError) as exc:  # that model's gateways cannot tokenize; nothing else suffers
            log.error("tokenizer_unavailable", sha256=sha[:16], error=type(exc).__name__)
            continue
        pipe = redis.pipeline(transaction=True)  # one step: a prune never sees the member without its key
        pipe.sadd(TOKENIZERS_KEY, sha)
        pipe.set(tokenizer_key(sha), data)
        pipe.execute()
        log.info("tokenizer_published", sha256=sha[:16], bytes=len(data))

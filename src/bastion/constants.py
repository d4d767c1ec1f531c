"""Every Redis key Bastion uses, with its owner and lifetime, in one place.

=======================  ==========================================  ==============================
key                      what                                        lifetime / owner
=======================  ==========================================  ==============================
q:{model}:{lane}         job stream of one model and lane            control plane (deleted with model);
                         (lane: ``sync``, ``batch`` or ``shadow``)   entries XDEL'd on completion
dlq:{model}              dead-letter stream (inputs over             complete.lua: MAXLEN max_dead_letters
                         dead_letter_max_input_bytes kept as size    and MINID now - max age on each
                         and digest only: not replayable)            letter; TTL: the max age, refreshed
r:{gateway}              reply stream of one gateway process         gateway deletes on exit; TTL
                                                                     refreshed while it lives
job:{id}                 job state hash (tenant, status, result)     TTL: result_ttl (async) or
                                                                     sync_result_ttl
sj:{id}                  a shadow copy's outcome (status only, no    complete.lua; TTL 10 min
                         outputs; no tenant can read it)
snap:current             the published control-plane snapshot        control plane (overwritten)
snap:serial              the published snapshot's serial (a few      control plane (overwritten with
                         bytes: what processes poll)                 snap:current)
snap:notify              pub/sub channel announcing a new snapshot   -
jobs:events              pub/sub channel: a tenant's async job id,   start.lua / complete.lua publish
                         each time its status changes (SSE streams   (never for sync jobs, shadow
                         wait on it)                                 copies or evaluations)
stored:{tenant}          sorted set: the tenant's stored async       enqueue.lua adds, expiry prunes;
                         results ("<id>" scored by expiry; bytes in  key TTL: the longest result
                         storedb:{tenant})
streams:{key id}         sorted set: open job event streams (SSE) of  stream_slot.lua (gateway/streams.py)
                         one API key, scored by when each lapses     adds, refreshes and removes; a
                                                                     slot lapses; key TTL: longest
storedb:{tenant}         hash: bytes of each stored result, and the  outcome.lua; same TTL as
                         total                                       stored:{tenant}
shadow:{model}:{ver}     shadow comparison counters of one version   workers; TTL 30 days, refreshed
                                                                     on each comparison
rl:t:{tenant}:{model}    compute-cost bucket of a tenant and model   enqueue.lua; TTL: time to refill
rl:k:{key id}            compute-cost bucket of one API key          enqueue.lua; TTL: time to refill
rl:tt:{tenant}:{model}   text-token bucket of a tenant and model     enqueue.lua; settle.lua gives
                         (text jobs only)                            unused back; TTL: time to refill
rl:tr:{tenant}:{model}   text-request bucket of a tenant and model   enqueue.lua; TTL: time to refill
rl:kt:{key id}           text-token bucket of one API key            enqueue.lua; settle.lua gives
                                                                     unused back; TTL: time to refill
rl:kr:{key id}           text-request bucket of one API key          enqueue.lua; TTL: time to refill
inflight:{tenant}        sorted set: job ids (and open event streams, enqueue.lua adds, the outcome
                         ``sse:...``) holding a slot of the tenant's (outcome.lua) removes;
                         in-flight cap, scored by when the slot      stream_slot.lua adds and removes
                         lapses                                      streams; a slot lapses by itself;
                                                                     key TTL: the longest slot
cost:{model}:{ver}       learned compute units per row (EWMA, from   workers (settle.lua); TTL 1 day
                         jobs that ran; never below the floor)
idem:{tenant}:{digest}   an Idempotency-Key's request fingerprint,   enqueue.lua; the outcome by
                         job id and (sync) stored outcome            outcome.lua; TTL 24 h
rc:{tenant}:{model}:     a cached answer (opt-in response cache)     gateway; TTL: the model's
{ver}:{digest}                                                       cache_ttl_s
warm:{model}:{ver}       sorted set: workers that loaded and warmed  workers (score: report time);
                         up this version                             TTL 1 h, refreshed
strike:{client}          a client's failures in the abuse window     strike.lua; TTL: the window
ban:{client}             the client is banned                        strike.lua; TTL: the ban
bans:{client}            bans of the client in the last day          strike.lua; TTL 1 day
abuse:bans               pub/sub channel announcing a ban            -
tok:{sha256}             a text version's tokenizer JSON (for        control plane: set at publish,
                         gateways: token counts, chat templates)     deleted when no version in the
                                                                     snapshot names it
toks                     set: the digests kept under tok:{sha256}    control plane (pruned at publish)
s:{job id}               a generation job's token chunks (the        worker appends; TTL
                         gateway relays them as SSE)                 text_stream_ttl_s, refreshed
x:{job id}               a generation job's cancel flag (the client  gateway sets; TTL
                         went away)                                  text_stream_ttl_s
abuse:banned             sorted set: live bans, client id scored by  strike.lua (trims ended ones);
                         the ban's end (epoch s, Redis clock)        TTL abuse_ban_max_s, renewed
=======================  ==========================================  ==============================

``{client}`` is ``a:<address>`` or ``k:<key id>``.
"""

from __future__ import annotations

QUEUE_PREFIX = "q:"
DEAD_LETTER_PREFIX = "dlq:"
REPLY_PREFIX = "r:"
GATEWAYS_KEY = "gateways"  # live gateways: id -> last beat (unix s); each adds, beats and removes itself
GATEWAY_BEAT_S = 20  # how often a gateway beats (and renews its reply stream's TTL)
GATEWAY_STALE_S = 60  # a gateway silent this long is gone (its reply stream expires then too)
JOB_PREFIX = "job:"
TOKENIZER_PREFIX = "tok:"
TOKENIZERS_KEY = "toks"  # set: the sha256 of every tokenizer the control plane keeps under tok:{sha256}
TEXT_STREAM_PREFIX = "s:"
CANCEL_PREFIX = "x:"
SHADOW_PREFIX = "shadow:"
WARM_PREFIX = "warm:"
TENANT_BUCKET_PREFIX = "rl:t:"
KEY_BUCKET_PREFIX = "rl:k:"
TENANT_TOKENS_PREFIX = "rl:tt:"
TENANT_REQUESTS_PREFIX = "rl:tr:"
KEY_TOKENS_PREFIX = "rl:kt:"
KEY_REQUESTS_PREFIX = "rl:kr:"
INFLIGHT_PREFIX = "inflight:"
COST_PREFIX = "cost:"
SHADOW_JOB_PREFIX = "sj:"
IDEMPOTENCY_PREFIX = "idem:"
RESPONSE_CACHE_PREFIX = "rc:"
STRIKE_PREFIX = "strike:"
BAN_PREFIX = "ban:"
BANS_PREFIX = "bans:"
BAN_CHANNEL = "abuse:bans"
BANNED_KEY = "abuse:banned"
SHADOW_RECORD_TTL_S = 600
WARM_TTL_S = 3600
SNAPSHOT_KEY = "snap:current"
SNAPSHOT_CHANNEL = "snap:notify"
SNAPSHOT_SERIAL_KEY = "snap:serial"
JOB_EVENTS_CHANNEL = "jobs:events"
STREAMS_PREFIX = "streams:"
STORED_PREFIX = "stored:"
STORED_BYTES_PREFIX = "storedb:"

AUDIT_STREAM = "audit"  # decision-log events on their way to the control plane (no MAXLEN: never dropped)
AUDIT_GROUP = "audit-log"  # the control plane's consumer group on it
AUDIT_CHECKPOINT_KEY = "audit:checkpoint"  # the latest signed checkpoint, published for anyone to read
MONITOR_PREFIX = "mon:"  # drift counts: mon:{model}:{version}:{minute} hashes, TTL monitoring_retention_s
FEEDBACK_STREAM = "feedback"  # labels on their way to the control plane (MAXLEN-capped; the caller waits)
FEEDBACK_GROUP = "feedback"  # the control plane's consumer group on it
CONSUMER_GROUP = "workers"
OPERATORS_TENANT = "operators"  # the only tenant whose keys may use the admin API
EVALUATION_TENANT = "_control"  # owner of evaluation jobs; '_' is not allowed in tenant names

LANE_SYNC = "sync"
LANE_BATCH = "batch"
LANE_SHADOW = "shadow"
LANES = (LANE_SYNC, LANE_BATCH, LANE_SHADOW)

STATUS_QUEUED = "queued"
STATUS_RUNNING = "running"
STATUS_SUCCEEDED = "succeeded"
STATUS_FAILED = "failed"
STATUS_EXPIRED = "expired"
STATUS_DEAD = "dead_lettered"
TERMINAL_STATUSES = frozenset({STATUS_SUCCEEDED, STATUS_FAILED, STATUS_EXPIRED, STATUS_DEAD})

API_KEY_PREFIX = "bst_"

SCOPES = (
    "predict",
    "jobs",
    "feedback",
    "models:read",
    "models:write",
    "deploy",
    "keys",
    "audit",
    "admin",
)
DEFAULT_TENANT_SCOPES = ("predict", "jobs", "models:read")


def queue_key(model: str, lane: str) -> str:
    return f"{QUEUE_PREFIX}{model}:{lane}"


def dead_letter_key(model: str) -> str:
    return f"{DEAD_LETTER_PREFIX}{model}"


def reply_key(gateway_id: str) -> str:
    return f"{REPLY_PREFIX}{gateway_id}"


def job_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def shadow_key(model: str, version: int) -> str:
    return f"{SHADOW_PREFIX}{model}:{version}"


def tenant_bucket_key(tenant: str, model: str) -> str:
    return f"{TENANT_BUCKET_PREFIX}{tenant}:{model}"


def key_bucket_key(key_id: str) -> str:
    return f"{KEY_BUCKET_PREFIX}{key_id}"


def inflight_key(tenant: str) -> str:
    return f"{INFLIGHT_PREFIX}{tenant}"


def shadow_job_key(job_id: str) -> str:
    return f"{SHADOW_JOB_PREFIX}{job_id}"


def idempotency_key(tenant: str, digest: str) -> str:
    return f"{IDEMPOTENCY_PREFIX}{tenant}:{digest}"


def cost_key(model: str, version: int) -> str:
    return f"{COST_PREFIX}{model}:{version}"


def warm_key(model: str, version: int) -> str:
    return f"{WARM_PREFIX}{model}:{version}"


def response_cache_key(tenant: str, model: str, version: int, digest: str) -> str:
    """A cached answer: per tenant (never shared across tenants), per version, by input digest."""
    return f"{RESPONSE_CACHE_PREFIX}{tenant}:{model}:{version}:{digest}"


def abuse_keys(client: str) -> tuple[str, str, str]:
    """strike.lua's keys for one client id: its strikes, its ban, its bans of the day."""
    return f"{STRIKE_PREFIX}{client}", f"{BAN_PREFIX}{client}", f"{BANS_PREFIX}{client}"


def stored_keys(tenant: str) -> tuple[str, str]:
    """The tenant's stored-result ledger: the sorted set of job ids and the hash of their bytes."""
    return f"{STORED_PREFIX}{tenant}", f"{STORED_BYTES_PREFIX}{tenant}"


def streams_key(key_id: str) -> str:
    return f"{STREAMS_PREFIX}{key_id}"


def monitor_traffic_key(model: str, version: int, minute: int) -> str:
    """A version's jobs, rows, failures and latency buckets per role in one minute (TTL: retention)."""
    return f"{MONITOR_PREFIX}{model}:{version}:{minute}:t"


def monitor_bins_key(model: str, version: int, minute: int, digest: str, part: int) -> str:
    """A version's drift counts in one minute, for one bin layout (``digest``), in parts of at most
    120 fields (small hashes stay listpack-encoded: a few bytes per field). TTL: retention."""
    return f"{MONITOR_PREFIX}{model}:{version}:{minute}:{digest}:{part}"

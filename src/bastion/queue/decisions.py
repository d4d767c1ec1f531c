"""Decision-log events as producers write them on the ``audit`` stream.

A decision is an answer a caller got from a model version: an answered sync prediction, a
finished async job, a fallback's answer, or a response-cache hit. Its event is written by the
same script that makes the decision final - ``complete.lua`` when a worker stores a job's first
outcome, ``cached.lua`` when a gateway answers from the cache - so there is never a decision
without its event, nor two events for one (a redelivery that runs again stores nothing, and a
job its gateway abandoned is stored as expired, not answered).

An entry has three fields: ``e``, this module's JSON document (below); ``o``, the outputs as
answered (the script adds them); ``i``, the inputs, only when the tenant's decision log keeps
payloads. The control plane (``bastion.audit``) turns the entry into a log leaf: it replaces
the subject digest with a keyed pseudonym, digests the outputs and encrypts what is kept.

Members of ``e``: id (the job id: the prediction id the caller holds), kind ("decision"), at
(ms since the epoch), tenant, key (the API key or token id), subj (the gateway's digest of a
named subject, '' none: never the subject itself), model, version, artifact (the version's
sha256), role (primary, canary, fallback), cache (answered from the response cache), rule (the
policy rule that applied), tp (the job's traceparent: with tracing on, the worker's job span,
which the control plane's ``audit append`` span continues; the gateway's for a cache hit), rid
(request id), input_sha256 (of the canonical encoded input tensors), latency_ms (queued or
asked → final), jurisdiction, consents, rows, retain, and for text models guards: each guard's
result (the gateway's input guards, then the worker's output guards: name, decision, latency in
microseconds, counts by kind, rule ids; never any text), absent when no guard ran.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from bastion.constants import EVALUATION_TENANT
from bastion.queue.envelope import ROLE_EVALUATION, ROLE_SHADOW, Envelope

KIND_DECISION = "decision"


def is_decision(job: Envelope) -> bool:
    """Whether answering ``job`` is a decision: not a shadow copy, not an evaluation."""
    return job.role not in (ROLE_SHADOW, ROLE_EVALUATION) and job.tenant != EVALUATION_TENANT


def event(
    job: Envelope,
    artifact: str,
    at_ms: int,
    *,
    cache: bool = False,
    latency_ms: float | None = None,
    guards: list[dict[str, Any]] | None = None,
) -> bytes:
    """The ``e`` document of ``job``'s decision, final at ``at_ms``."""
    doc: dict[str, Any] = {
        "id": job.job_id,
        "kind": KIND_DECISION,
        "at": at_ms,
        "tenant": job.tenant,
        "key": job.key_id,
        "subj": job.subject,
        "model": job.model,
        "version": job.version,
        "artifact": artifact,
        "role": job.role,
        "cache": cache,
        "rule": job.rule,
        "tp": job.traceparent,
        "rid": job.request_id,
        "input_sha256": hashlib.sha256(job.blob).hexdigest(),
        "latency_ms": latency_ms if latency_ms is not None else float(max(0, at_ms - job.created_ms)),
        "jurisdiction": job.jurisdiction or None,
        "consents": list(job.consents),
        "rows": job.rows,
        "retain": job.retain,
    }
    if job.guards or guards:
        doc["guards"] = [*job.guards, *(guards or ())]
    return orjson.dumps(doc)

"""The per-request call context: each step of the pipeline records its decision here.

authenticate → ``principal``; route → ``version``, ``role``, ``reason``, ``rule``; parse →
``rows``; breaker → ``permit`` (and a diverted ``version``/``role``); admit → ``admission``;
idempotency → ``idem``; the job → ``job_id``; tracing on → ``span`` (the request's server span,
whose ``traceparent`` the job carries). Cross-cutting steps (the job envelope, logs, the
decision log and tracing) read it instead of re-deriving what was decided.

The routing ``subject`` is the caller's own identity unless an operator marked its key
``subject_trusted``: only such a key's ``X-Bastion-Subject`` chooses its canary bucket, so no
caller can pick the version it gets by trying subject values. The envelope carries a digest of a
named subject, never the subject itself (a caller's own identity is its key id, already there).
"""

from __future__ import annotations

import hashlib
from typing import Any

from bastion.errors import InvalidInput
from bastion.gateway.breakers import Permit
from bastion.gateway.idempotency import Idempotency
from bastion.queue.envelope import Envelope
from bastion.queue.producer import Admission
from bastion.snapshot import KeyInfo, VersionInfo
from bastion.tracing import Span


class Call:
    __slots__ = (
        "admission",
        "allowed",
        "guards",
        "idem",
        "job_id",
        "model",
        "permit",
        "pinned",
        "principal",
        "reason",
        "request_id",
        "role",
        "rows",
        "rule",
        "span",
        "subject",
        "subject_named",
        "traceparent",
        "version",
    )

    def __init__(self, request_id: str, model: str = "", traceparent: str = "") -> None:
        self.request_id = request_id
        self.model = model
        self.traceparent = traceparent
        self.principal: KeyInfo | None = None
        self.subject = ""
        self.subject_named = False  # the subject is a trusted key's X-Bastion-Subject
        self.version: VersionInfo | None = None
        self.role = ""
        self.reason = ""  # why a fallback answers: 'disabled', 'policy', 'circuit-open'
        self.rule = ""
        self.allowed: frozenset[int] | None = None  # versions policy lets this caller reach (None: any)
        self.permit: Permit | None = None
        self.pinned = False  # the caller named the version (OIP /versions/{v}, gRPC model_version)
        self.idem: Idempotency | None = None
        self.admission: Admission | None = None
        self.job_id = ""
        self.rows = 0
        self.guards: list[dict[str, Any]] = []  # input guard results (GuardResult.to_dict()), for the decision log
        self.span: Span | None = None  # set only while tracing is on

    @property
    def key(self) -> KeyInfo:
        if self.principal is None:
            raise RuntimeError("the call is not authenticated yet")
        return self.principal

    @property
    def chosen(self) -> VersionInfo:
        if self.version is None:
            raise RuntimeError("the call is not routed yet")
        return self.version

    def choose_subject(self, header: str | None) -> None:
        """The routing subject: a trusted key's ``X-Bastion-Subject``, else the caller itself."""
        key = self.key
        if header is not None and key.subject_trusted:
            if not 0 < len(header) <= 256:
                raise InvalidInput("X-Bastion-Subject must be 1 to 256 characters")
            if header.startswith("key:"):  # the namespace of callers' own identities
                raise InvalidInput("X-Bastion-Subject must not start with 'key:'")
            self.subject = f"{key.tenant}\x00{header}"
            self.subject_named = True
        else:
            self.subject = f"{key.tenant}\x00key:{key.id}"

    def data_subject(self) -> str:
        """The digest of the data subject the decision is about: a trusted key's named subject,
        or a token's subject claim (``oidc_subject_claim``); '' when none is named (the key id,
        already in the envelope, identifies the caller)."""
        if self.subject_named:
            return pseudonym(self.subject)
        named = self.key.data_subject
        return pseudonym(f"{self.key.tenant}\x00{named}") if named else ""

    def permits(self, version: int) -> bool:
        """Whether policy lets this caller's data reach ``version`` (shadow copies included)."""
        return self.allowed is None or version in self.allowed

    def envelope(
        self,
        lane: str,
        job_id: str,
        blob: bytes,
        *,
        deadline_ms: int = 0,
        reply_to: str = "",
        version: VersionInfo | None = None,
        role: str = "",
    ) -> Envelope:
        """The job this call queues, carrying what the pipeline decided (``version`` and ``role``
        name another version for a shadow copy)."""
        version = version or self.chosen
        return Envelope(
            job_id=job_id,
            tenant=self.key.tenant,
            model=version.model,
            version=version.version,
            lane=lane,
            role=role or self.role,
            deadline_ms=deadline_ms,
            reply_to=reply_to,
            request_id=self.request_id,
            traceparent=self.traceparent,
            subject=self.data_subject(),
            rule=self.rule,
            idempotency=self.idem.redis_key if self.idem is not None and reply_to else "",
            key_id=self.key.id,
            rows=self.rows,
            jurisdiction=self.key.jurisdiction or "",
            consents=tuple(sorted(self.key.consents)),
            retain=self.key.retain_payloads,
            guards=self.guards,
            blob=blob,
        )


def pseudonym(subject: str) -> str:
    """A digest that names the subject in the envelope without revealing it (the decision log
    replaces it with an HMAC under the tenant's secret)."""
    return hashlib.blake2b(subject.encode(), digest_size=16).hexdigest() if subject else ""

"""Feedback desk: the control plane's side of ``POST /v1/predictions/{id}/feedback``.

The gateway has no SQL: it puts each label on the ``feedback`` stream (``FEEDBACK_STREAM``,
capped) and waits for the answer on its own reply stream. This desk reads the stream through the
consumer group ``FEEDBACK_GROUP``, a batch at a time, and for each label:

1. finds the decision it grades by prediction id in the decision log's table (``audit_leaves``,
   read only): a decision of the caller's tenant, else **404** - for an unknown id and another
   tenant's alike, so the answer tells nothing of other tenants. A decision the log has not
   appended yet (it trails the answer by well under a second) is looked for again until shortly
   before the caller's deadline (``_LOOK_AGAIN_MARGIN_MS``), and so is another tenant's: its 404
   comes no sooner than an unknown id's;
2. refuses a second label for one prediction (**409**) unless ``replace`` is set (**200**);
3. reads what the decision predicted from its outcome row (``decision_outcomes``, which the
   decision log writes with each decision's leaf from the outputs in clear on the ``audit``
   stream: ``bastion.audit.outcomes``), for every tenant, whether or not its log keeps payloads:
   the label output (or the class of a threshold), the positive class's score, or the value of a
   regression. A label whose prediction has no outcome to grade (more than one row, no label or
   value output, erased, or older than ``accuracy_window_s`` and swept) is recorded and counted,
   but not graded;
4. records it in ``feedback`` (one row per prediction; the unique prediction id keeps it so with
   any number of control planes) and answers on the gateway's reply stream (``XADD NOMKSTREAM``:
   a gateway gone has no stream, and none is made), then ``XACK`` + ``XDEL``.

A label that arrives after its caller's deadline is dropped unrecorded (the caller got a
retryable 503). Entries left pending by a control plane that died are claimed again after
``CLAIM_IDLE_MS``; by then their callers have given up, so they are dropped the same way.

``quality()`` turns a window of labels into live accuracy, AUC, F1 and MAE per version and per
role, each with its interval and sample size (``bastion.monitoring.quality``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import redis
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bastion import ids, logs, metrics
from bastion.audit.leaves import EVENT_ID
from bastion.audit.tables import AuditLeaf, DecisionOutcome
from bastion.constants import FEEDBACK_GROUP, FEEDBACK_STREAM
from bastion.monitoring import quality as figures
from bastion.registry.db import Sessions
from bastion.registry.tables import Feedback
from bastion.settings import Settings

log = logs.get("bastion.monitoring.feedback")

STREAM_CAP = 10_000  # entries at most on the feedback stream (MAXLEN ~): callers wait, so few are ever there
BATCH = 200
CLAIM_IDLE_MS = 30_000
_CLAIM_EVERY_S = 5.0
_RETRY_S = 1.0
_LOOK_AGAIN_MARGIN_MS = 1_000  # stop looking for a decision this long before the caller's deadline
_REPLY_CAP = 10_000
MAX_QUALITY_ROWS = 200_000  # labels read per quality() call: the most recent predictions' in the window

NOT_FOUND = "no such prediction"
DUPLICATE = "this prediction is already labelled; send replace: true to change it"


@dataclass(slots=True)
class Label:
    """One entry of the feedback stream, as the gateway wrote it (``bastion.gateway.feedback``):
    ``c`` correlation id, ``r`` reply stream, ``d`` deadline (epoch ms), ``t`` tenant, ``p``
    prediction id, ``l`` the class label or ``v`` the value (the other empty), ``x`` "1" to replace."""

    entry_id: bytes
    correlation: str
    reply_to: str
    deadline_ms: int
    tenant: str
    prediction_id: str
    label: int | None
    value: float | None
    replace: bool


@dataclass(slots=True)
class Answer:
    status: int
    body: dict[str, Any]


def parse(entry_id: bytes, fields: dict[bytes, bytes]) -> Label | None:
    """A stream entry as a label; None when it is not one the gateway writes."""
    try:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return Label(
            entry_id=entry_id,
            correlation=text["c"],
            reply_to=text["r"],
            deadline_ms=int(text["d"]),
            tenant=text["t"],
            prediction_id=text["p"],
            label=int(text["l"]) if text.get("l") else None,
            value=float(text["v"]) if text.get("v") else None,
            replace=text.get("x") == "1",
        )
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


class FeedbackDesk:
    """Records labels sent through the gateway and reports live quality per version."""

    def __init__(self, settings: Settings, sessions: Sessions, client: redis.Redis) -> None:
        self.settings = settings
        self.sessions = sessions
        self.client = client
        self.name = f"{socket.gethostname()[:40]}-{os.getpid()}-{ids.hex_id(4)}"
        self._later: list[Label] = []  # labels whose decision the log has not appended yet
        self._group_ready = False
        self._next_claim = 0.0

    # the loop ------------------------------------------------------------------------------
    async def serve(self) -> None:
        """Answer labels from the feedback stream until cancelled; Redis or SQL away: retry."""
        while True:
            try:
                await asyncio.to_thread(self.serve_once)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._group_ready = False
                log.warning("feedback_serve_failed", error_type=type(exc).__name__)
                await asyncio.sleep(_RETRY_S)

    def serve_once(self, block_ms: int = 1000) -> int:
        """Read and answer one batch (plus the labels waiting for their decision); the number answered."""
        self.ensure_group()
        block = 100 if self._later else block_ms
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + _CLAIM_EVERY_S
            claimed: Any = self.client.xautoclaim(
                FEEDBACK_STREAM, FEEDBACK_GROUP, self.name, CLAIM_IDLE_MS, count=BATCH
            )
            entries.extend(claimed[1])
        response: Any = self.client.xreadgroup(
            FEEDBACK_GROUP, self.name, {FEEDBACK_STREAM: ">"}, count=BATCH, block=block
        )
        for _stream, read in response or []:
            entries.extend(read)
        labels: list[Label] = []
        junk: list[bytes] = []
        for entry_id, fields in entries:
            found = parse(entry_id, fields) if fields else None
            if found is None:
                junk.append(entry_id)  # deleted meanwhile (claimed with no fields), or not ours
            else:
                labels.append(found)
        if junk:
            self._done(junk)
        # An entry waiting in ``_later`` longer than ``CLAIM_IDLE_MS`` (a long feedback_timeout_s)
        # is claimed again by this very consumer: once per entry, or a recorded label's 201 would
        # be answered by its own duplicate's 409.
        waiting = {x.entry_id for x in self._later}
        labels, self._later = self._later + [x for x in labels if x.entry_id not in waiting], []
        return self.handle(labels) if labels else 0

    def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.client.xgroup_create(FEEDBACK_STREAM, FEEDBACK_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def handle(self, labels: list[Label], now_ms: int | None = None) -> int:
        """Record and answer ``labels``; those whose decision is not logged yet wait for the next round."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        live = [x for x in labels if x.deadline_ms > now_ms]
        expired = [x.entry_id for x in labels if x.deadline_ms <= now_ms]
        if expired:
            metrics.FEEDBACK.labels("expired").inc(len(expired))
            self._done(expired)
        if not live:
            return 0
        answers = self._record(live, now_ms)
        answered = [x for x in live if x.correlation in answers]
        self._later.extend(x for x in live if x.correlation not in answers)
        pipe = self.client.pipeline(transaction=False)
        for x in answered:
            answer = answers[x.correlation]
            body = orjson.dumps(answer.body)
            reply = {"j": x.correlation, "s": str(answer.status), "b": body, "e": str(answer.body.get("detail", ""))}
            pipe.xadd(x.reply_to, reply, maxlen=_REPLY_CAP, approximate=True, nomkstream=True)  # type: ignore[arg-type]
        pipe.execute()
        self._done([x.entry_id for x in answered])
        return len(answered)

    def _done(self, entry_ids: list[bytes]) -> None:
        if not entry_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(FEEDBACK_STREAM, FEEDBACK_GROUP, *entry_ids)
        pipe.xdel(FEEDBACK_STREAM, *entry_ids)
        pipe.execute()

    # recording -----------------------------------------------------------------------------
    def _record(self, labels: list[Label], now_ms: int) -> dict[str, Answer]:
        """Answers by correlation id; a label missing from them waits for its decision."""
        answers: dict[str, Answer] = {}
        wanted = list({x.prediction_id for x in labels if EVENT_ID.fullmatch(x.prediction_id)})
        try:
            with self.sessions.begin() as s:
                leaves = {
                    row.event_id: row
                    for row in s.scalars(
                        select(AuditLeaf).where(AuditLeaf.event_id.in_(wanted), AuditLeaf.kind == "decision")
                    )
                }
                existing = {
                    row.prediction_id: row
                    for row in s.scalars(select(Feedback).where(Feedback.prediction_id.in_(wanted)))
                }
                outcomes = (
                    {
                        row.event_id: row
                        for row in s.scalars(select(DecisionOutcome).where(DecisionOutcome.event_id.in_(list(leaves))))
                    }
                    if leaves
                    else {}
                )
                for x in labels:
                    leaf = leaves.get(x.prediction_id)
                    if leaf is None or leaf.tenant != x.tenant:  # another tenant's: as if unknown, timing too
                        if x.deadline_ms - now_ms > _LOOK_AGAIN_MARGIN_MS and EVENT_ID.fullmatch(x.prediction_id):
                            continue  # the log may not have appended it yet: look again next round
                        answers[x.correlation] = self._answer(404, "not_found", NOT_FOUND)
                        continue
                    answers[x.correlation] = self._label(s, x, leaf, outcomes.get(x.prediction_id), existing)
        except IntegrityError:  # another control plane recorded one of them meanwhile: all again, next round
            return {}
        return answers

    def _label(
        self, s: Session, x: Label, leaf: AuditLeaf, outcome: DecisionOutcome | None, existing: dict[str, Feedback]
    ) -> Answer:
        row = existing.get(x.prediction_id)
        if row is not None and not x.replace:
            return self._answer(
                409, "duplicate", "this prediction is already labelled; send replace: true to change it"
            )
        doc = orjson.loads(leaf.body)
        at = leaf.at if leaf.at.tzinfo is not None else leaf.at.replace(tzinfo=UTC)
        if row is None:
            binary = outcome is not None and outcome.classes in (None, 1, 2)  # a score, not a top probability
            row = Feedback(
                prediction_id=x.prediction_id,
                tenant=x.tenant,
                model=str(doc.get("model") or "")[:128],
                version=int(doc.get("version") or 0),
                role=str(doc.get("role") or "")[:16],
                predicted=outcome.label if outcome is not None else None,
                score=outcome.score if outcome is not None and binary else None,
                predicted_value=outcome.value if outcome is not None else None,
                predicted_at=at,
                replaced=0,
            )
            s.add(row)
            existing[x.prediction_id] = row
            status, result = 201, "recorded"
        else:
            row.replaced += 1
            status, result = 200, "replaced"
        row.label, row.value, row.labelled_at = x.label, x.value, datetime.now(UTC)
        metrics.FEEDBACK.labels(result).inc()
        graded = row.predicted is not None if x.label is not None else row.predicted_value is not None
        body: dict[str, Any] = {"id": x.prediction_id, "model": row.model, "version": row.version}
        body.update({"status": result, "graded": graded})
        body.update({"label": x.label} if x.label is not None else {"value": x.value})
        return Answer(status, body)

    def _answer(self, status: int, result: str, detail: str) -> Answer:
        """A refusal; the gateway turns it into its problem (the same one for every 404)."""
        metrics.FEEDBACK.labels(result).inc()
        return Answer(status, {"detail": detail})

    # quality --------------------------------------------------------------------------------
    def quality(self, model: str, window_s: int) -> dict[int, dict[str, Any]]:
        """Live quality per version over the labels of predictions made in the last ``window_s``
        seconds: ``{version: {"roles", "labels", "graded", "accuracy", "auc", "f1", "mae",
        "label_delay_s", "by_role": {role: the same figures}}}``; intervals are 95 %. At most the
        ``MAX_QUALITY_ROWS`` most recent predictions' labels are read (the judging loop calls this
        every ``drift_interval_s`` per model: its memory and time stay bounded)."""
        since = datetime.fromtimestamp(time.time() - window_s, UTC)
        with self.sessions() as s:
            rows = s.execute(
                select(
                    Feedback.version,
                    Feedback.role,
                    Feedback.label,
                    Feedback.value,
                    Feedback.predicted,
                    Feedback.score,
                    Feedback.predicted_value,
                    Feedback.predicted_at,
                    Feedback.labelled_at,
                )
                .where(Feedback.model == model, Feedback.predicted_at >= since)
                .order_by(Feedback.predicted_at.desc())
                .limit(MAX_QUALITY_ROWS)
            ).all()
        if len(rows) >= MAX_QUALITY_ROWS:
            log.info("live_quality_capped", model=model, labels=len(rows))
        groups: dict[tuple[int, str], list[Any]] = {}
        for row in rows:
            groups.setdefault((row.version, row.role), []).append(row)
        out: dict[int, dict[str, Any]] = {}
        for version in sorted({v for v, _ in groups}):
            roles = sorted(r for v, r in groups if v == version)
            together = [row for role in roles for row in groups[(version, role)]]
            out[version] = {
                "roles": roles,
                **_figures(together),
                "by_role": {role: _figures(groups[(version, role)]) for role in roles},
            }
        return out


def _figures(rows: list[Any]) -> dict[str, Any]:
    classified = [r for r in rows if r.label is not None and r.predicted is not None]
    regressed = [r for r in rows if r.value is not None and r.predicted_value is not None]
    delay = np.array([max(0.0, (_aware(r.labelled_at) - _aware(r.predicted_at)).total_seconds()) for r in rows])
    return figures.summary(
        truth=np.array([r.label for r in classified], dtype=np.int64),
        predicted=np.array([r.predicted for r in classified], dtype=np.int64),
        scores=np.array([np.nan if r.score is None else r.score for r in classified], dtype=np.float64),
        truth_values=np.array([r.value for r in regressed], dtype=np.float64),
        predicted_values=np.array([r.predicted_value for r in regressed], dtype=np.float64),
        delay_s=delay,
        labels=len(rows),
    )


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)

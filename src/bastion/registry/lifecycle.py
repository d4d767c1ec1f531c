"""The version lifecycle: ``registered → staging → production → retired``, and the gates on the way.

Entering ``production`` passes every gate of the model's ``GatePolicy``:

* ``verified``: the version carries a valid Ed25519 signature (when the policy requires it)
* ``documentation``: model card, owner and training-data lineage are present
* ``evaluation`` and one gate per threshold (``accuracy``, ``auc``, ``f1``,
  ``fairness.demographic_parity_difference``, ``fairness.equal_opportunity_difference``):
  a worker evaluated the version on the model's current holdout set and the figures are inside
  the thresholds
* ``approval``: a principal other than the uploader approved it (four-eyes)
* ``live_accuracy`` (``live_accuracy_margin`` set): the version's live accuracy on feedback labels
  is no worse than the primary's by more than the margin, with at least ``min_live_labels`` graded
  labels on each side. The registry does not compute live figures: the caller (the promotion
  route, from ``plane.monitoring.feedback.quality``) hands them in as ``live``.

Promotion makes the version the 100 % primary route. Every step is appended to ``version_events``.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from bastion import holdout
from bastion.artifacts.store import ArtifactStore
from bastion.errors import Conflict, Forbidden, GateFailed, NotFound
from bastion.registry.db import Sessions
from bastion.registry.deployments import Deployments
from bastion.registry.metadata import GatePolicy, parse, stored
from bastion.registry.names import check_name
from bastion.registry.tables import Deployment, Model, ModelVersion, VersionEvent
from bastion.timefmt import iso_utc, parse_iso

REGISTERED, STAGING, PRODUCTION, RETIRED = "registered", "staging", "production", "retired"
STAGES = (REGISTERED, STAGING, PRODUCTION, RETIRED)
_NEXT = {
    REGISTERED: {STAGING, RETIRED},
    STAGING: {PRODUCTION, RETIRED},
    PRODUCTION: {STAGING, RETIRED},
    RETIRED: set[str](),
}


def with_iso_times(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored document (a holdout's or an evaluation's record) with its ``*_at`` times in the
    API's form: records written before every time was ``iso_utc``'s carry ``+00:00`` offsets."""
    if not doc:
        return doc
    out = dict(doc)
    for name, value in doc.items():
        if name.endswith("_at") and isinstance(value, str):
            with contextlib.suppress(ValueError):  # not a time after all: shown as stored
                out[name] = iso_utc(parse_iso(value))
    return out


DEFAULT_MIN_LIVE_LABELS = 100


class Policy(GatePolicy):
    """The gate policy as the API sets it: ``GatePolicy`` and the live-accuracy gate (kept apart,
    in ``models.live_gate``)."""

    live_accuracy_margin: float | None = Field(
        default=None, ge=0.0, le=1.0, description="the most a version's live accuracy may trail the primary's"
    )
    min_live_labels: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="graded feedback labels needed on each side (default 100)"
    )

    @property
    def live_gated(self) -> bool:
        return self.live_accuracy_margin is not None

    @property
    def gated(self) -> bool:
        return super().gated or self.live_gated

    def gate_part(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"live_accuracy_margin", "min_live_labels"})

    def live_part(self) -> dict[str, Any] | None:
        if not self.live_gated:
            return None
        return {
            "live_accuracy_margin": self.live_accuracy_margin,
            "min_live_labels": self.min_live_labels or DEFAULT_MIN_LIVE_LABELS,
        }


def policy_of(model: Model | None) -> GatePolicy:
    return GatePolicy.model_validate(model.policy or {}) if model is not None else GatePolicy()


def full_policy_of(model: Model | None) -> Policy:
    """The model's whole policy: its gates and its live-accuracy gate."""
    if model is None:
        return Policy()
    return Policy.model_validate({**(model.policy or {}), **(model.live_gate or {})})


def record(s: Session, model: Model, version: int, action: str, by: str, **detail: Any) -> None:
    s.add(VersionEvent(model_id=model.id, version=version, action=action, detail=detail or None, created_by=by[:64]))


class Lifecycle:
    def __init__(self, sessions: Sessions, store: ArtifactStore, deployments: Deployments) -> None:
        self.sessions = sessions
        self.store = store
        self.deployments = deployments

    # model-level settings ----------------------------------------------------------------
    def set_policy(self, model: str, policy: dict[str, Any], by: str) -> dict[str, Any]:
        """Set a model's gates; a model that does not exist yet is created, so that its first
        version is gated too."""
        parsed = parse(Policy, policy, "the gate policy")
        with self.sessions.begin() as s:
            row = s.scalar(select(Model).where(Model.name == model))
            if row is None:
                row = Model(name=check_name("model", model))
                s.add(row)
                s.flush()
            row.policy = parsed.gate_part()
            row.live_gate = parsed.live_part()
            record(s, row, 0, "policy_set", by, policy={**row.policy, **(row.live_gate or {})})
            return {"model": model, "policy": full_policy_of(row).model_dump(), "gated": parsed.gated}

    def get_policy(self, model: str) -> dict[str, Any]:
        with self.sessions() as s:
            parsed = full_policy_of(_model(s, model))
            return {"model": model, "policy": parsed.model_dump(), "gated": parsed.gated}

    def live_gated(self, model: str) -> bool:
        """Whether promoting a version of ``model`` needs live figures (its live-accuracy gate is set)."""
        with self.sessions() as s:
            row = s.scalar(select(Model).where(Model.name == model))
            return full_policy_of(row).live_gated

    def set_holdout(self, model: str, doc: Any, by: str) -> dict[str, Any]:
        """Validate and store a labelled holdout set; evaluations run on the newest one."""
        found = holdout.validate(doc)
        digest = self.store.put(holdout.encode(found))
        info = {
            "sha256": digest,
            "rows": found.rows,
            "classes": sorted({int(v) for v in found.labels.tolist()}),
            "groups": found.groups,
            "uploaded_by": by[:64],
            "uploaded_at": iso_utc(datetime.now(UTC)),
        }
        with self.sessions.begin() as s:
            row = _model(s, model)
            row.holdout = info
            record(s, row, 0, "holdout_set", by, sha256=digest, rows=found.rows)
        return {"model": model, "holdout": info}

    # evaluation --------------------------------------------------------------------------
    def begin_evaluation(self, model: str, version: int, by: str) -> tuple[str, bytes]:
        """Mark an evaluation as running; return the job id and the spec for the worker."""
        with self.sessions.begin() as s:
            row, v = _version(s, model, version)
            if v.stage == RETIRED:
                raise Conflict(f"version {version} of model {model!r} is retired")
            if not row.holdout:
                raise Conflict(f"model {model!r} has no holdout set; upload one first")
            post = stored(v.meta).postprocessing
            spec = {"holdout": row.holdout["sha256"], **post.model_dump(exclude_none=True)}
            job_id = "eval-" + secrets.token_urlsafe(12)
            v.evaluation = {
                "status": "running",
                "job_id": job_id,
                "holdout_sha256": row.holdout["sha256"],
                "requested_by": by[:64],
                "requested_at": iso_utc(datetime.now(UTC)),
            }
            record(s, row, version, "evaluation_requested", by, job_id=job_id)
            return job_id, orjson.dumps(spec)

    def running_evaluation(self, model: str, version: int) -> str | None:
        with self.sessions() as s:
            _, v = _version(s, model, version)
            evaluation = v.evaluation or {}
            return str(evaluation["job_id"]) if evaluation.get("status") == "running" else None

    def finish_evaluation(self, model: str, version: int, job_id: str, status: str, result: bytes, error: str) -> None:
        """Store the worker's report (or its failure) with the version, unless a newer run replaced it."""
        with self.sessions.begin() as s:
            row, v = _version(s, model, version)
            current = v.evaluation or {}
            if current.get("job_id") != job_id or current.get("status") != "running":
                return
            if status == "succeeded":
                v.evaluation = {**current, "status": "succeeded", "report": orjson.loads(result)}
            else:
                v.evaluation = {**current, "status": "failed", "error": error[:500]}
            v.evaluation["finished_at"] = iso_utc(datetime.now(UTC))
            record(s, row, version, "evaluated", "worker", job_id=job_id, status=v.evaluation["status"])

    # approval and stages -----------------------------------------------------------------
    def approve(self, model: str, version: int, by: str) -> dict[str, Any]:
        with self.sessions.begin() as s:
            row, v = _version(s, model, version)
            if by == v.created_by:
                raise Forbidden(
                    f"four-eyes rule: {by!r} uploaded version {version} of model {model!r} and cannot approve it; "
                    "another principal must"
                )
            if v.stage in (PRODUCTION, RETIRED):
                raise Conflict(f"version {version} of model {model!r} is already {v.stage}")
            v.approved_by, v.approved_at = by[:64], datetime.now(UTC)
            record(s, row, version, "approved", by)
            return self._view(s, row, v)

    def set_stage(
        self,
        model: str,
        version: int,
        stage: str,
        by: str,
        route: bool = True,
        live: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Move a version; entering production makes it the primary (``route=False``: the caller
        routes it, after the workers have warmed it up). ``live``: the model's live quality per
        version (``FeedbackDesk.quality``), for the live-accuracy gate."""
        if stage not in STAGES:
            raise Conflict(f"stage {stage!r} is not one of {list(STAGES)}")
        with self.sessions.begin() as s:
            row, v = _version(s, model, version)
            if stage == v.stage:
                return self._view(s, row, v)
            if stage not in _NEXT[v.stage]:
                raise Conflict(
                    f"version {version} of model {model!r} is {v.stage}; it can move to {sorted(_NEXT[v.stage])}"
                )
            if stage == PRODUCTION:
                results = gates(row, v, live, _primary(s, row))
                failed = [g for g in results if not g["passed"]]
                if failed:
                    named = "; ".join(f"gate '{g['gate']}' failed: {g['detail']}" for g in failed)
                    raise GateFailed(
                        f"version {version} of model {model!r} cannot enter production: {named}", gates=results
                    )
            if stage != PRODUCTION:
                _refuse_if_routed(s, row, version, stage)
            previous, v.stage = v.stage, stage
            record(s, row, version, "stage", by, source=previous, target=stage)
            view = self._view(s, row, v)
        if stage == PRODUCTION and route:
            self.deployments.promote(model, version, by)
        return view

    def gates(
        self, model: str, version: int, live: Mapping[int, Mapping[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        with self.sessions() as s:
            row, v = _version(s, model, version)
            return gates(row, v, live, _primary(s, row))

    def history(self, model: str, version: int) -> list[dict[str, Any]]:
        with self.sessions() as s:
            row, _ = _version(s, model, version)
            events = s.scalars(
                select(VersionEvent)
                .where(VersionEvent.model_id == row.id, VersionEvent.version.in_([0, version]))
                .order_by(VersionEvent.id)
            )
            return [
                {"action": e.action, "version": e.version, "by": e.created_by, "detail": e.detail or {}}
                | {"at": iso_utc(e.created_at)}
                for e in events
            ]

    def _view(self, s: Session, row: Model, v: ModelVersion) -> dict[str, Any]:
        return {
            "model": row.name,
            "version": v.version,
            "stage": v.stage,
            "approved_by": v.approved_by,
            "approved_at": iso_utc(v.approved_at),
            "gates": gates(row, v),
        }


def gates(
    model: Model,
    v: ModelVersion,
    live: Mapping[int, Mapping[str, Any]] | None = None,
    primary: int | None = None,
) -> list[dict[str, Any]]:
    """Every gate of the model's policy for this version: ``{gate, passed, detail}``; ``live``
    (live quality per version) and ``primary`` (the primary route's version) feed the
    live-accuracy gate."""
    policy = policy_of(model)
    meta = stored(v.meta)
    out: list[dict[str, Any]] = []

    def gate(name: str, passed: bool, detail: str) -> None:
        out.append({"gate": name, "passed": passed, "detail": detail})

    if policy.require_verified:
        gate(
            "verified",
            v.verified,
            f"signed by {v.signed_by}" if v.verified else "the version carries no valid signature",
        )
    if policy.require_documentation:
        missing = meta.documented()
        gate("documentation", not missing, f"missing {missing}" if missing else "model card, owner and lineage present")
    if policy.metric_gates or policy.fairness_gates:
        _evaluation_gates(model, v, policy, gate)
    if policy.require_approval:
        approved = v.approved_by is not None and v.approved_by != v.created_by
        gate(
            "approval", approved, f"approved by {v.approved_by}" if approved else "needs approval by another principal"
        )
    whole = full_policy_of(model)
    if whole.live_accuracy_margin is not None:
        gate("live_accuracy", *_live_gate(whole, v.version, live, primary))
    return out


def _live_gate(
    policy: Policy, version: int, live: Mapping[int, Mapping[str, Any]] | None, primary: int | None
) -> tuple[bool, str]:
    """Whether ``version``'s live accuracy trails the primary's by at most the margin, and why."""
    margin = float(policy.live_accuracy_margin or 0.0)
    need = policy.min_live_labels or DEFAULT_MIN_LIVE_LABELS
    if live is None:
        return False, "no live figures: the control plane computes them from feedback labels"
    if primary is None or primary == version:
        return True, f"version {version} is the primary: no other version to compare with"
    mine, theirs = (live.get(version) or {}).get("accuracy"), (live.get(primary) or {}).get("accuracy")
    have, other = int((mine or {}).get("n", 0)), int((theirs or {}).get("n", 0))
    if mine is None or theirs is None or have < need or other < need:
        return False, (
            f"needs {need} graded feedback labels on each side: version {version} has {have}, "
            f"primary version {primary} has {other}"
        )
    passed = float(mine["value"]) >= float(theirs["value"]) - margin
    return passed, (
        f"live accuracy {_interval(mine)} (n={have}) {'>=' if passed else '<'} primary version {primary}'s "
        f"{_interval(theirs)} (n={other}) - margin {margin}"
    )


def _interval(figure: Mapping[str, Any]) -> str:
    return f"{float(figure['value']):.4f} [{float(figure['low']):.4f}, {float(figure['high']):.4f}]"


def _primary(s: Session, model: Model) -> int | None:
    dep = s.get(Deployment, model.id)
    if dep is None:
        return None
    return next((int(r["version"]) for r in dep.routes if r.get("role") == "primary"), None)


def _evaluation_gates(model: Model, v: ModelVersion, policy: GatePolicy, gate: Any) -> None:
    evaluation = v.evaluation or {}
    report = evaluation.get("report") if evaluation.get("status") == "succeeded" else None
    current = (model.holdout or {}).get("sha256")
    if report is None or evaluation.get("holdout_sha256") != current:
        why = {
            "running": "the evaluation is still running",
            "failed": f"the evaluation failed: {evaluation.get('error')}",
        }
        gate("evaluation", False, why.get(evaluation.get("status", ""), "no evaluation on the current holdout set"))
        return
    gate("evaluation", True, f"evaluated on {report['rows']} rows of holdout {str(current)[:12]}")
    for name, minimum in policy.metric_gates.items():
        value = report["metrics"].get(name)
        passed = value is not None and value >= minimum
        gate(
            name, passed, f"{_fmt(value)} {'>=' if passed else '<'} {minimum}" if value is not None else "not computed"
        )
    fairness = report.get("fairness") or {}
    for name, maximum in policy.fairness_gates.items():
        value = fairness.get(name)
        if value is None:
            gate(f"fairness.{name}", False, "not computed: the holdout set needs a protected attribute with 2+ groups")
            continue
        passed = value <= maximum
        gate(f"fairness.{name}", passed, f"{_fmt(value)} {'<=' if passed else '>'} {maximum}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _refuse_if_routed(s: Session, model: Model, version: int, stage: str) -> None:
    """A version leaving production (or retiring) must not take traffic any more."""
    dep = s.get(Deployment, model.id)
    if dep is None:
        return
    primary = any(r["version"] == version and r["role"] == "primary" for r in dep.routes)
    routed = any(r["version"] == version for r in dep.routes) or dep.fallback_version == version
    if primary or (stage == RETIRED and routed):
        raise Conflict(
            f"version {version} of model {model.name!r} still takes traffic; route it away first "
            "(bastion deploy set / rollback)"
        )


def _model(s: Session, name: str) -> Model:
    row = s.scalar(select(Model).where(Model.name == name))
    if row is None:
        raise NotFound(f"no model {name!r}")
    return row


def _version(s: Session, name: str, version: int) -> tuple[Model, ModelVersion]:
    row = _model(s, name)
    v = s.scalar(select(ModelVersion).where(ModelVersion.model_id == row.id, ModelVersion.version == version))
    if v is None:
        raise NotFound(f"model {name!r} has no version {version}")
    return row, v

"""``POST /v1/predictions/{id}/feedback``: the true label (or value) of a prediction, for live accuracy.

The gateway holds no SQL, so it does not record the label itself: it checks the caller (scope
``feedback``) and the body, puts the label on the ``feedback`` stream for the control plane's
feedback desk (``bastion.monitoring.feedback``) with this gateway's reply stream and a
correlation id, and waits up to ``feedback_timeout_s`` for the desk's answer on the reply stream
(the ``ReplyRouter`` resolves it like a job's reply). No answer in time: 503, safe to retry (the
desk drops a label whose caller's deadline passed).

Answers: 201 recorded, 200 replaced (``"replace": true``), 404 when the prediction is unknown or
another tenant's (one body for both: no oracle), 409 when it is labelled already.

Entry fields (``FEEDBACK_STREAM``): ``c`` correlation id, ``r`` reply stream, ``d`` deadline
(epoch ms), ``t`` tenant, ``p`` prediction id, ``l`` the class label or ``v`` the value (the
other empty), ``x`` "1" to replace.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from bastion import jsonbody
from bastion.constants import FEEDBACK_STREAM
from bastion.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, RateLimited, Unavailable
from bastion.gateway.auth import authenticate
from bastion.gateway.pipeline import redis_errors
from bastion.gateway.state import GatewayState
from bastion.responses import json_response

FEEDBACK = ("feedback",)
MAX_BODY = 1024  # a label is a few bytes
STREAM_CAP = 10_000  # entries at most on the feedback stream (MAXLEN ~); callers wait, so few are there
MAX_LABEL = 2**53  # class labels are integers; this bound fits every database's BIGINT
MAX_VALUE = 1e300
NOT_FOUND = "no such prediction"
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # what a decision's id can be (the decision log's rule)
_FIELDS = frozenset({"label", "value", "replace"})
# Labels one key may have waiting on this gateway at once (429 beyond). The route takes no cost
# units and 200/409 answers are no abuse strikes, so without it one key could flood the capped
# feedback stream (trimming other tenants' labels before the desk reads them) and the desk's SQL.
MAX_IN_FLIGHT = 64
_in_flight: dict[str, int] = {}


def label_of(doc: Any) -> tuple[int | None, float | None, bool]:
    """``(label, value, replace)`` from a body: exactly one of an integer ``label`` (a class) or a
    finite number ``value`` (a regression's truth), and an optional boolean ``replace``."""
    if not isinstance(doc, dict):
        raise InvalidInput('the body is a JSON object: {"label": 1} or {"value": 2.5}, optionally "replace": true')
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise InvalidInput(f"unknown field(s) {[str(k)[:32] for k in unknown[:5]]}: send label or value, and replace")
    if ("label" in doc) == ("value" in doc):
        raise InvalidInput("send exactly one of 'label' (a class, an integer) or 'value' (a number)")
    replace = doc.get("replace", False)
    if type(replace) is not bool:
        raise InvalidInput("'replace' is true or false")
    if "label" in doc:
        label = doc["label"]
        if type(label) is not int:
            raise InvalidInput("'label' is the true class, an integer")
        if abs(label) > MAX_LABEL:
            raise InvalidInput(f"'label' is at most {MAX_LABEL} in magnitude")
        return label, None, replace
    value = doc["value"]
    if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > MAX_VALUE:
        raise InvalidInput("'value' is the true value, a finite number")
    return None, float(value), replace


async def give_feedback(request: Request) -> Response:
    """Label one of the caller's predictions with its true class (or value)."""
    state: GatewayState = request.app.state.gateway
    key = await authenticate(request, state, *FEEDBACK)
    prediction_id = request.path_params["id"]
    if not _ID.fullmatch(prediction_id):
        raise NotFound(NOT_FOUND)
    body = await request.body()
    if len(body) > MAX_BODY:
        raise PayloadTooLarge(f"a feedback body is at most {MAX_BODY} bytes")
    label, value, replace = label_of(jsonbody.parse_json(body, request.headers.get("content-type")))
    timeout_s = state.settings.feedback_timeout_s
    correlation = "f" + state.replies.new_id()
    fields = {
        "c": correlation,
        "r": state.replies.key,
        "d": str(int((time.time() + timeout_s) * 1000)),
        "t": key.tenant,
        "p": prediction_id,
        "l": "" if label is None else str(label),
        "v": "" if value is None else repr(value),
        "x": "1" if replace else "0",
    }
    waiting = _in_flight.get(key.id, 0)
    if waiting >= MAX_IN_FLIGHT:
        raise RateLimited(f"at most {MAX_IN_FLIGHT} labels of one key wait for the desk at once; retry", 1)
    _in_flight[key.id] = waiting + 1
    future = state.replies.expect(correlation)  # before the entry exists: the answer cannot be missed
    try:
        async with redis_errors():
            await state.redis.xadd(FEEDBACK_STREAM, fields, maxlen=STREAM_CAP, approximate=True)
        reply = await asyncio.wait_for(future, timeout_s)
    except TimeoutError:
        raise Unavailable("the feedback desk did not answer in time; retry", retry_after=1) from None
    finally:
        state.replies.forget(correlation)
        left = _in_flight.get(key.id, 1) - 1
        if left > 0:
            _in_flight[key.id] = left
        else:
            _in_flight.pop(key.id, None)
    answer: dict[str, Any] = orjson.loads(reply.blob) if reply.blob else {}
    status = int(reply.status) if reply.status.isdigit() else 502
    if status == 404:
        raise NotFound(NOT_FOUND)
    if status == 409:
        raise Conflict(str(answer.get("detail") or "this prediction is already labelled"))
    if status not in (200, 201):
        raise Unavailable("the feedback desk could not record the label; retry", retry_after=1)
    return json_response(answer, status_code=status)


OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "label": {"type": "integer", "description": "the true class (classifiers)"},
                        "value": {"type": "number", "description": "the true value (regression)"},
                        "replace": {"type": "boolean", "default": False, "description": "replace an earlier label"},
                    },
                    "oneOf": [{"required": ["label"]}, {"required": ["value"]}],
                },
                "example": {"label": 1},
            }
        },
    }
}

"""Evidence is never dropped: while the control plane is not logging, gateways stop taking new
work once the audit stream's backlog passes ``audit_max_backlog``, and take it again once the
log has caught up - every decision taken meanwhile is logged."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import orjson
import pytest

from bastion import demo
from bastion.constants import AUDIT_STREAM
from tests.support import running, wait_until

PREDICT = f"/v1/models/{demo.MODEL_NAME}/predict"
SAMPLE = Path(demo.__file__).parent / "sample.json"


@pytest.mark.timeout(180)
def test_gateways_refuse_new_work_while_the_decision_log_is_behind_and_resume_when_it_catches_up(
    tmp_path: Path,
) -> None:
    with running(tmp_path, audit_max_backlog=5) as stack:
        rc = stack.redis_client()
        payload = orjson.loads(SAMPLE.read_bytes())
        with stack.client() as http:
            assert http.post(PREDICT, json=payload).status_code == 200
            stack.signal("control", signal.SIGSTOP)  # the log's writer stops consuming
            try:
                answered, refused = 0, None
                deadline = time.monotonic() + 30
                while refused is None and time.monotonic() < deadline:
                    r = http.post(PREDICT, json=payload)
                    if r.status_code == 200:
                        answered += 1
                    else:
                        refused = r
                assert refused is not None, "the gateway never stopped taking work"
                assert refused.status_code == 503
                assert refused.headers["content-type"] == "application/problem+json"
                assert "decision log" in refused.json()["detail"] and refused.headers["retry-after"] == "1"
                waiting = rc.xlen(AUDIT_STREAM)
                # every decision taken while nothing was logged waits on the stream (the first may be logged)
                assert answered >= 5 and answered <= waiting <= answered + 1, (waiting, answered)
            finally:
                stack.signal("control", signal.SIGCONT)
            wait_until(lambda: rc.xlen(AUDIT_STREAM) == 0, 30, "the log to catch up")
            wait_until(lambda: http.post(PREDICT, json=payload).status_code == 200, 10, "work to be taken again")
        rc.close()

"""The one place where errors become gRPC statuses (``bastion.problems`` is HTTP's).

    InvalidInput                     INVALID_ARGUMENT
    └── PayloadTooLarge              RESOURCE_EXHAUSTED
    Unauthenticated                  UNAUTHENTICATED
    Forbidden                        PERMISSION_DENIED
    NotFound                         NOT_FOUND
    Conflict                         FAILED_PRECONDITION
    RateLimited                      RESOURCE_EXHAUSTED   + retry-after, ratelimit, ratelimit-policy
    Overloaded, Unavailable          UNAVAILABLE          + retry-after
    DeadlineExceeded                 DEADLINE_EXCEEDED
    JobFailed, IntegrityError        INTERNAL
    anything else                    INTERNAL, "an unexpected error occurred" (the caller logs its type)

The message is the error's ``detail``: written for the caller, never a secret. ``retry-after`` is in
seconds, in the trailing metadata, as HTTP's ``Retry-After`` header is. ``strike`` says whether the
abuse guard counts the error against the caller, as it counts the HTTP answers 400, 401, 403, 404
and 413 (a spent budget is not abuse).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from bastion import errors

UNEXPECTED = "an unexpected error occurred; it has been logged"

_CODES: list[tuple[type[errors.BastionError], grpc.StatusCode]] = [
    (errors.PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Overloaded, grpc.StatusCode.UNAVAILABLE),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.JobFailed, grpc.StatusCode.INTERNAL),
    (errors.IntegrityError, grpc.StatusCode.INTERNAL),
]
_STRIKES = (errors.InvalidInput, errors.Unauthenticated, errors.Forbidden, errors.NotFound)


@dataclass(frozen=True, slots=True)
class Status:
    code: grpc.StatusCode
    message: str
    trailers: tuple[tuple[str, str], ...] = ()
    strike: bool = False  # a failure the abuse guard counts
    expected: bool = True  # False: not an error Bastion raises on purpose (log it)

    async def abort(self, context: grpc.aio.ServicerContext, request_id: str) -> None:
        """End the call with this status (raises), the request id in the trailing metadata."""
        await context.abort(self.code, self.message, (*self.trailers, ("x-request-id", request_id)))


def status_of(exc: Exception) -> Status:
    """The gRPC status, message and trailing metadata that answer ``exc``."""
    if not isinstance(exc, errors.BastionError):
        return Status(grpc.StatusCode.INTERNAL, UNEXPECTED, expected=False)
    code = next((code for cls, code in _CODES if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
    trailers: list[tuple[str, str]] = []
    if isinstance(exc, errors.RateLimited | errors.Overloaded | errors.Unavailable):
        trailers.append(("retry-after", str(exc.retry_after)))
    if isinstance(exc, errors.RateLimited):
        trailers += [(name.lower(), value) for name, value in exc.headers.items()]
    return Status(code, exc.detail, tuple(trailers), strike=isinstance(exc, _STRIKES))

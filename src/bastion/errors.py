"""The one error hierarchy of Bastion.

Domain errors know nothing of HTTP; ``bastion.problems`` maps them to RFC 9457
``application/problem+json`` responses in one place.

    BastionError
    ├── InvalidInput            the request or upload is malformed (400)
    │   ├── PayloadTooLarge     the body exceeds the configured limit (413)
    │   ├── HeadersTooLarge     the request head exceeds its byte or field limit (431)
    │   ├── RequestTimeout      the client did not send its body in time (408)
    │   ├── UnsupportedMedia    the content type is not accepted (415)
    │   ├── InvalidArtifact     an uploaded model is not a safe, valid ONNX graph (422)
    │   └── IdempotencyMismatch an Idempotency-Key reused for a different request (422)
    ├── Unauthenticated         no or unknown credentials (401)
    ├── Forbidden               credentials lack the scope (403)
    ├── NotFound                no such object *for this tenant* (404)
    ├── Conflict                the object exists or is immutable (409)
    │   └── GateFailed          a version did not pass its promotion gates (409)
    ├── RateLimited             a budget, in-flight, stream or storage cap is spent (429, Retry-After,
    │                           RateLimit)
    ├── Overloaded              the queue is full; retry later (503, Retry-After)
    ├── Unavailable             a dependency (Redis, a model) is not reachable (503)
    ├── DeadlineExceeded        the job did not finish in time (504)
    ├── JobFailed               the worker could not compute a result (the job's own status)
    └── IntegrityError          an artifact's bytes do not match its sha256
"""

from __future__ import annotations


class BastionError(Exception):
    """Base of every error Bastion raises on purpose."""

    title = "Bastion error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInput(BastionError):
    title = "Invalid input"


class PayloadTooLarge(InvalidInput):
    title = "Payload too large"


class HeadersTooLarge(InvalidInput):
    title = "Request header fields too large"


class RequestTimeout(InvalidInput):
    title = "Request timeout"


class UnsupportedMedia(InvalidInput):
    title = "Unsupported media type"


class InvalidArtifact(InvalidInput):
    title = "Invalid model artifact"


class IdempotencyMismatch(InvalidInput):
    title = "Idempotency key reused"


class Unauthenticated(BastionError):
    title = "Unauthenticated"


class Forbidden(BastionError):
    title = "Forbidden"


class NotFound(BastionError):
    title = "Not found"


class Conflict(BastionError):
    title = "Conflict"


class GateFailed(Conflict):
    """``gates`` (in ``extra``) lists every gate with whether it passed and why."""

    title = "Promotion gate failed"


class RateLimited(BastionError):
    """``headers`` holds the IETF ``RateLimit`` / ``RateLimit-Policy`` fields for the response."""

    title = "Too many requests"

    def __init__(self, detail: str, retry_after: int = 1, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.headers = headers or {}


class Overloaded(BastionError):
    title = "Overloaded"

    def __init__(self, detail: str, retry_after: int = 1, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class Unavailable(BastionError):
    title = "Service unavailable"

    def __init__(self, detail: str, retry_after: int = 1, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class DeadlineExceeded(BastionError):
    title = "Deadline exceeded"


class JobFailed(BastionError):
    title = "Job failed"


class IntegrityError(BastionError):
    title = "Artifact integrity check failed"

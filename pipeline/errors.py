"""Every error a user can cause, with a stable code and a message that says what to do.

The hierarchy::

    SignalboxError                      code            HTTP
    ├── BadRequest                      bad_request      400
    ├── Unauthorized                    unauthorized     401
    ├── Forbidden                       forbidden        403
    │   ├── SourceNotAllowed            source_not_allowed 403
    │   └── ClientCertificateRequired   client_certificate_required 403
    ├── NotFound                        not_found        404
    ├── Conflict                        conflict         409
    │   └── IllegalTransition           illegal_transition 409
    ├── RequestTimeout                  request_timeout  408
    ├── PayloadTooLarge                 payload_too_large 413
    ├── TooManyRequests                 too_many_requests 429
    │   └── TooManyAuthFailures         too_many_auth_failures 429
    ├── LogUnavailable                  log_unavailable  503
    └── SchemaMismatch                  schema_mismatch  503

HTTP answers render them as ``{"error": code, "message": message}``; WebSocket errors use the
close codes of the protocol instead (see ``pipeline.wsframes``).
"""

from __future__ import annotations


class SignalboxError(Exception):
    """Base of every error with a stable code; ``status`` is the HTTP status it maps to."""

    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_body(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


class BadRequest(SignalboxError):
    code = "bad_request"
    status = 400


class Unauthorized(SignalboxError):
    code = "unauthorized"
    status = 401


class Forbidden(SignalboxError):
    code = "forbidden"
    status = 403


class SourceNotAllowed(Forbidden):
    code = "source_not_allowed"


class ClientCertificateRequired(Forbidden):
    code = "client_certificate_required"


class NotFound(SignalboxError):
    code = "not_found"
    status = 404


class Conflict(SignalboxError):
    code = "conflict"
    status = 409


class IllegalTransition(Conflict):
    code = "illegal_transition"


class PayloadTooLarge(SignalboxError):
    code = "payload_too_large"
    status = 413


class RequestTimeout(SignalboxError):
    code = "request_timeout"
    status = 408


class TooManyRequests(SignalboxError):
    """Refused for now; ``retry_after`` is how many seconds to wait before trying again.

    Raised as such when a token is over its ingestion rate: the same request is welcome after
    the wait."""

    code = "too_many_requests"
    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyAuthFailures(TooManyRequests):
    """The client's address failed to authenticate too often: refused, whatever its token,
    until its window ends. A code of its own, because waiting is not what fixes it: finding
    whoever at that address uses a wrong token is."""

    code = "too_many_auth_failures"


class LogUnavailable(SignalboxError):
    """The log could not commit (database down, locked, disk full): nothing was acknowledged."""

    code = "log_unavailable"
    status = 503


class SchemaMismatch(SignalboxError):
    """The database's schema is older or newer than this version of Signalbox understands."""

    code = "schema_mismatch"
    status = 503

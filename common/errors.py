"""Error codes shared by every process, and their HTTP mapping.

The codes are the wire vocabulary (ERROR envelopes carry `code`); the HTTP status is chosen by the
frontend from this table so that the broker, the workers and the Python client agree on meaning.
"""
from __future__ import annotations

from typing import Any

# code -> (HTTP status, OpenAI error type)
ERROR_TABLE: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "invalid_image": (400, "invalid_request_error"),
    "unsupported_parameter": (400, "invalid_request_error"),
    "unauthorized": (401, "authentication_error"),
    "not_found": (404, "invalid_request_error"),
    "unknown_model": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "payload_too_large": (413, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "cancelled": (499, "invalid_request_error"),
    "internal": (500, "api_error"),
    "load_failed": (500, "api_error"),
    "worker_crash_poison": (500, "api_error"),
    "worker_lost": (502, "api_error"),
    "overloaded": (503, "api_error"),
    "broker_unavailable": (503, "api_error"),
    "broker_restarted": (503, "api_error"),
    "model_unavailable": (503, "api_error"),
    "deadline_exceeded": (504, "api_error"),
    "insufficient_memory": (507, "api_error"),
}

ERROR_CODES = frozenset(ERROR_TABLE)


def http_status(code: str, retryable: bool = False) -> int:
    """HTTP status for an error code; a retryable worker loss is a 503 (try again), not a 502."""
    if code == "worker_lost" and retryable:
        return 503
    return ERROR_TABLE.get(code, ERROR_TABLE["internal"])[0]


class ServerError(Exception):
    """An error with a stable wire code; raised by the Python client and the frontend."""

    def __init__(self, code: str, message: str, *, retryable: bool = False,
                 retry_after_ms: int | None = None, param: str | None = None, job_id: str | None = None):
        if code not in ERROR_TABLE:
            code = "internal"
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms
        self.param = param
        self.job_id = job_id

    @property
    def http_status(self) -> int:
        return http_status(self.code, self.retryable)

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": ERROR_TABLE[self.code][1],
                          "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"ServerError({self.code!r}, {self.message!r}, retryable={self.retryable})"


class ConfigError(Exception):
    """Bad configuration; the message names the offending key. Printed without a traceback."""

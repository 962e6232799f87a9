"""The client's exceptions: what the service refused, and when it could not be reached."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """The service answered with an error: ``status``, a snake_case ``code``, a sentence and ``detail``.

    Example:
        >>> err = ServiceError(404, "unknown_model", "No model named 'x' is loaded.")
        >>> (err.status, err.code)
        (404, 'unknown_model')
    """

    def __init__(self, status: int, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail or {}

    @classmethod
    def from_body(cls, status: int, body: Any) -> ServiceError:
        """Build from an error reply ``{"error": {"code", "message", "detail"}}`` (or anything else).

        Example:
            >>> ServiceError.from_body(409, {"error": {"code": "step_conflict", "message": "m"}}).code
            'step_conflict'
        """
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            detail = error.get("detail")
            return cls(
                status,
                str(error.get("code", f"http_{status}")),
                str(error.get("message", "")),
                detail if isinstance(detail, dict) else {},
            )
        return cls(status, f"http_{status}", f"unexpected reply: {str(body)[:200]}")


class ServiceUnavailable(ServiceError):
    """No answer: the service timed out or could not be reached, after the allowed retries.

    A step that ended with this error may or may not have reached the service; the next call of the
    same session finds out (the step counter makes that safe) and resends what is missing.

    Example:
        >>> ServiceUnavailable("timeout", "no reply within 0.02 s").status
        0
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(0, code, message)

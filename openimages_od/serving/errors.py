"""The service's one error type: an HTTP status, a stable code and a message."""

from __future__ import annotations

__all__ = ["ApiError"]


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``.

    Args:
        status: HTTP status (4xx for the caller's mistakes, 5xx for ours or upstream).
        code: short stable machine-readable code (``blocked_address``, ``too_many_pixels``...).
        message: one human-readable sentence naming what was wrong.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

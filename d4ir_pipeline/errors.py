"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class D4IRError(Exception):
    """Bad input or a refused operation; the message names the file/argument and the fix."""


class BadImageError(D4IRError):
    """An image that cannot be used; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

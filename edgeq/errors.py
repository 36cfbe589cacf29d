"""Errors a user can act on.

Every failure edgeq reports to a person is an :class:`EdgeqError`: its message is one line that
names the thing at fault (file, node, input, target) and says what to do. The CLI prints it
without a traceback (``--debug`` shows one) and exits with the error's ``exit_code``.
"""

from __future__ import annotations


class EdgeqError(Exception):
    """Base class of every user-facing edgeq failure."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class InputError(EdgeqError):
    """Bad user input: a path, an input spec, a data file, a factory, a flag."""


class ExportError(EdgeqError):
    """The PyTorch model could not be exported, or the export does not match torch."""


class UnsupportedError(EdgeqError):
    """A model uses something a stage or a target cannot handle."""


class ValidationFailed(EdgeqError):
    """A candidate missed a threshold the user asked for."""

    exit_code = 1


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), at most ``limit`` characters.

    Third-party errors (ONNX Runtime, protobuf, coremltools) carry pages of context; a message for
    a person keeps the line that says what went wrong.
    """
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]

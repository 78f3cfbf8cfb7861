"""Which exceptions are the user's mistake, and how the ``mxfp8`` command words them.

A wrong option, a missing file or a corpus too small to train on is not a bug: the command
prints one line (``mxfp8 train: error: ...``) and exits with status 2, and ``--debug`` shows
the traceback for those who want it. Anything else is a bug and keeps its traceback (status 1).

The floors below the CLI raise :class:`UserError` (or a subclass) for bad input, so they never
need to know about the CLI; :data:`USER_ERRORS` is the one list of what counts as bad input.
This module imports nothing from the package, so any floor can import it.
"""

from __future__ import annotations

__all__ = ["USER_ERRORS", "UserError", "is_user_error", "user_message"]


class UserError(ValueError):
    """Bad input from the user (a config value, a file, a corpus); the message says which.

    A ``ValueError`` so that callers which already catch ``ValueError`` for bad arguments keep
    working. The message should name the culprit and, where it can, the fix.
    """


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,  # mxfp8.config.fields.ConfigError and the data errors derive from it
    FileNotFoundError,
    FileExistsError,  # e.g. --out that already holds another run
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    UnicodeDecodeError,
)
"""Exceptions that mean "the input is wrong", not "the program is wrong": exit status 2."""


def is_user_error(exc: BaseException) -> bool:
    """True when ``exc`` is bad input (see :data:`USER_ERRORS`), False for a bug."""
    return isinstance(exc, USER_ERRORS)


def user_message(exc: BaseException) -> str:
    """``exc`` as one line for the terminal, without the exception's class name.

    An ``OSError`` raised by ``open()`` itself reads ``[Errno 2] No such file or directory:
    'x'``; it becomes ``No such file or directory: x``. Line breaks are folded into spaces so
    that the message stays on the one ``error:`` line.
    """
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename}"
        if exc.filename2 is not None:
            text += f" -> {exc.filename2}"
    elif isinstance(exc, UnicodeDecodeError):
        text = f"the text is not valid {exc.encoding}: {exc.reason} at byte offset {exc.start}"
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__

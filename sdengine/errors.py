"""Error messages as users see them: one line, from any exception."""
from __future__ import annotations


class CLIError(Exception):
    """An error whose message is meant for the user as it is (the CLI prints it as its one line)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none. A KeyError's message is its
    key, shown without the quotes str() adds."""
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = message.strip().splitlines()
    return lines[0] if lines else type(exc).__name__

"""The one exception type the library raises for bad input: the CLI prints it as one line on stderr with exit
status 2, so every message names the offending input (key, file or value) and says what is wrong with it."""

import re


class ColamError(ValueError):
    """Bad input (configuration, data or artifact), shown to the user as is. Raised in a DataLoader worker, torch
    rebuilds it as "Caught ColamError in DataLoader worker ...\nOriginal Traceback ...": cut back to its line."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap(args[0]),)
        super().__init__(*args)


_RAISED = f"{ColamError.__module__}.{ColamError.__qualname__}: "


def _unwrap(message: str) -> str:
    """The original message of a ColamError re-raised from another process or thread by torch."""
    if not message.startswith(f"Caught {ColamError.__name__} ") or "\nOriginal Traceback" not in message:
        return message
    return next((line[len(_RAISED):] for line in reversed(message.splitlines()) if line.startswith(_RAISED)), message)


def require(ok: bool, key: str, value: object, what: str) -> None:
    """Raise `ColamError("KEY: WHAT, got VALUE")` unless `ok`."""
    if not ok:
        raise ColamError(f"{key}: {what}, got {value!r}")


MESSAGE_LIMIT = 600  # characters of one error line: a quoted value longer than that is cut, not echoed whole


def one_line(message: str) -> str:
    """`message` as one safe line for a terminal: credentials in URIs hidden, control characters (newlines, ANSI
    escapes) shown escaped, and cut to MESSAGE_LIMIT characters."""
    message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in redact(message))
    return message if len(message) <= MESSAGE_LIMIT else message[:MESSAGE_LIMIT] + "... (cut)"


def redact(text: str) -> str:
    """`scheme://user:password@host` with the password replaced by ***."""
    return re.sub(r"(://[^/:@\s]*):[^/@\s]*@", r"\1:***@", text)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its type's name where it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def flat_message(err: BaseException) -> str:
    """An error's whole message on one line: its runs of whitespace, newlines too, as one space."""
    return " ".join(str(err).split())


def os_error(exc: OSError) -> str:
    """An OSError as the one line a user needs: the path and what the system said about it."""
    paths = " -> ".join(f"'{p}'" for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{paths}: {reason}" if paths else f"{reason} ({type(exc).__name__})"

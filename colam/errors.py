"""The one exception type the library raises for bad input.

The CLI turns it into a single line on stderr and exit status 2, so every message
must name the offending input (key, file or value) and say what is wrong with it.
"""


class ColamError(ValueError):
    """Bad input: configuration, data or artifact. The message is shown to the user as is.

    Raised in a DataLoader worker (a corrupt image), it reaches the main process rebuilt by torch
    (`torch._utils.ExceptionWrapper.reraise`) from "Caught ColamError in DataLoader worker process
    N.\nOriginal Traceback ...": such a message is cut back to the worker's own one line.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap(args[0]),)
        super().__init__(*args)


_RAISED = f"{ColamError.__module__}.{ColamError.__qualname__}: "


def _unwrap(message: str) -> str:
    """The original message of a ColamError re-raised from another process or thread by torch."""
    if not message.startswith(f"Caught {ColamError.__name__} ") or "\nOriginal Traceback" not in message:
        return message
    for line in reversed(message.splitlines()):
        if line.startswith(_RAISED):
            return line[len(_RAISED):]
    return message


def require(ok: bool, key: str, value: object, what: str) -> None:
    """Raise `ColamError("KEY: WHAT, got VALUE")` unless `ok`."""
    if not ok:
        raise ColamError(f"{key}: {what}, got {value!r}")

"""The one exception type the library raises for bad input: the CLI prints it as one line on stderr with exit
status 2, so every message names the offending input (key, file or value) and says what is wrong with it."""


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

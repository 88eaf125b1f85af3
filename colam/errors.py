"""The one exception type the library raises for bad input.

The CLI turns it into a single line on stderr and exit status 2, so every message
must name the offending input (key, file or value) and say what is wrong with it.
"""


class ColamError(ValueError):
    """Bad input: configuration, data or artifact. The message is shown to the user as is."""


def require(ok: bool, key: str, value: object, what: str) -> None:
    """Raise `ColamError("KEY: WHAT, got VALUE")` unless `ok`."""
    if not ok:
        raise ColamError(f"{key}: {what}, got {value!r}")

"""The method registry: every training method, one file each, listed by name.

Every module of this package is imported and each `Method` subclass with a `name` is registered,
so a method is added by adding its file. Tests and the CLI iterate over `METHODS`: a method added
here is tested and listed automatically.
"""

import importlib
import pkgutil

from colam.methods.base import Method, soft_cross_entropy

# The paper's own comparison first, in this order; methods added later follow by name.
_FIRST = ("hl", "ls", "cp", "disturblabel", "colam")


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    stack = list(Method.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "name" in cls.__dict__:
            found[cls.name] = cls
    order = [n for n in _FIRST if n in found] + sorted(n for n in found if n not in _FIRST)
    return {name: found[name] for name in order}


METHODS: dict[str, type[Method]] = _discover()

__all__ = ["METHODS", "Method", "soft_cross_entropy"]

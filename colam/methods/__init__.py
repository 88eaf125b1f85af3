"""The method registry: every `Method` subclass with a `name` in this package's modules, one file each, so a method is
added by adding its file; tests and the CLI iterate over `METHODS`."""

import importlib
import pkgutil

from colam.methods.base import Method, soft_cross_entropy

# The paper's own comparison first, in this order; methods added later follow by name.
_FIRST = ("hl", "ls", "cp", "disturblabel", "colam")


def _discover() -> dict[str, type[Method]]:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    found, stack = {}, list(Method.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "name" in cls.__dict__:
            found[cls.name] = cls
    order = [n for n in _FIRST if n in found] + sorted(n for n in found if n not in _FIRST)
    return {name: found[name] for name in order}


METHODS: dict[str, type[Method]] = _discover()


def headline_section(method_section: dict, name: str | None, key: str) -> dict:
    """Where a pipeline's value of the headline setting `key` (its `temperature` parameter) goes in a raw `method`
    mapping: the section of the method trained (`name`, else the mapping's own) when `key` is one of that method's
    headline settings, else a scratch mapping (hl has no temperature)."""
    from colam.config import MethodConfig

    name = method_section.get("name", MethodConfig.name) if name is None else name
    if key not in getattr(METHODS.get(name), "headline", ()):
        return {}
    section = method_section.setdefault(name, {})
    return section if isinstance(section, dict) else {}  # not a mapping: from_dict names the key


__all__ = ["METHODS", "Method", "headline_section", "soft_cross_entropy"]

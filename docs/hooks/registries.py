"""MkDocs hook: the methods, models and data sets pages list what the registries hold at build time.

A page marks where a list goes with `<!-- registry:methods -->`, `<!-- registry:models -->` or
`<!-- registry:datasets -->`; the marker is replaced by tables built from `colam.methods.METHODS`,
`colam.models.MODELS` and `colam.datasets.DATASETS`, the registries `colam methods`, `colam models`
and `colam datasets` print. A method, model or data set added to the code is thus on the site
without editing a page, and one removed disappears from it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

MARKER = re.compile(r"<!-- registry:(\w+) -->")
# `name: type = default  # reason`, and the comment lines that continue a reason
FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$")
COMMENT_LINE = re.compile(r"^\s+#\s*(.*)$")


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda match: RENDER[match.group(1)](), markdown)


def _value(value) -> str:
    """A default as the YAML of a config would spell it, for a code span."""
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value) if value != "" else '""'


def _text(text: str) -> str:
    """Prose for a table cell: a pipe would split the cell, `<class>` would be read as HTML and
    `lam*T^2*KL` as emphasis."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def _reasons(cls: type) -> dict[str, str]:
    """Each setting's one-line reason: the comment beside the field in the settings class."""
    reasons: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        field, comment = FIELD_LINE.match(line), COMMENT_LINE.match(line)
        if field:
            last = field.group(1)
            reasons[last] = field.group(2)
        elif comment and last:
            reasons[last] += " " + comment.group(1)
        else:
            last = None
    return reasons


def _settings_table(section) -> list[str]:
    """`method.NAME.*`: key, default and reason of every setting of a method's settings class."""
    if section is None or not dataclasses.fields(section):
        return ["No settings."]
    reasons = _reasons(type(section))
    rows = ["| key | default | why |", "|---|---|---|"]
    for field in dataclasses.fields(section):
        why = _text(reasons.get(field.name, ""))
        rows.append(f"| `{field.name}` | `{_value(getattr(section, field.name))}` | {why} |")
    return rows


def methods() -> str:
    from colam.config import Config
    from colam.methods import METHODS

    defaults = Config().method
    lines = ["| name | what it trains on | paper |", "|---|---|---|"]
    lines += [f"| `{name}` | {_text(cls.summary)} | {_text(cls.paper)} |" for name, cls in METHODS.items()]
    for name in METHODS:
        lines += ["", f"### `{name}` settings", "", f"`method.{name}.*` in the config:", ""]
        lines += _settings_table(getattr(defaults, name, None))
    return "\n".join(lines)


def models() -> str:
    from colam.models import MODELS, model_size

    lines = ["| name | input | parameters, 10 classes | parameters, 100 classes | options | paper |",
             "|---|---:|---:|---:|---|---|"]
    for name, spec in MODELS.items():
        options = ", ".join(f"`{key}={_value(value)}`" for key, value in spec.options.items()) or "–"
        lines.append(f"| `{name}` | {spec.input_size} | {model_size(name, 10):,} | {model_size(name, 100):,} | "
                     f"{options} | {_text(spec.paper)} |")
    return "\n".join(lines)


def datasets() -> str:
    from colam.datasets import DATASETS

    lines = ["| name | what | needs files in `data.root` |", "|---|---|---|"]
    lines += [f"| `{name}` | {_text(spec.description)} | {'yes' if spec.needs_files else 'no (bundled)'} |"
              for name, spec in DATASETS.items()]
    return "\n".join(lines)


RENDER = {"methods": methods, "models": models, "datasets": datasets}

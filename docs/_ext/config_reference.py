"""The ``config-reference`` directive: the configuration reference, read from the schema.

::

    ```{config-reference}
    ```

walks :class:`pyro_hvae.config.Config` at build time and emits one section per
configuration section (``data``, ``model``, ...) with a table of its options: the
dotted name, the accepted type with its bounds (from the pydantic JSON schema), the
default (or "required") and the field's description. A section that is a union
discriminated by ``kind`` (``model``) gets one section per kind, each listing only
that kind's options. The top-level scalar options (``name``, ``seed``, ...) come
first, in a section of their own. A field without a description is reported as a
warning, which fails a ``-W`` build.
"""

from __future__ import annotations

import json
import re
from typing import Any

from docutils import nodes
from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> list[nodes.Node]:
    """Text with ```code``` spans turned into literals."""
    parts: list[nodes.Node] = []
    for i, piece in enumerate(_CODE.split(text)):
        if piece:
            parts.append(nodes.literal(piece, piece) if i % 2 else nodes.Text(piece))
    return parts


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _bounds(schema: dict[str, Any]) -> str:
    """``> 0``, ``>= 0``, ``in [0, 1)`` from JSON-schema bounds."""
    low = ("[", schema["minimum"]) if "minimum" in schema else ("(", schema.get("exclusiveMinimum"))
    high = ("]", schema["maximum"]) if "maximum" in schema else (")", schema.get("exclusiveMaximum"))
    if low[1] is not None and high[1] is not None:
        return f" in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low[1] is not None:
        return f" {'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    if high[1] is not None:
        return f" {'<=' if high[0] == ']' else '<'} {_number(high[1])}"
    return ""


def _type(schema: dict[str, Any], plural: bool = False) -> str:
    """A short reading of one property's JSON schema: ``integer > 0``, ``path or null``, ..."""
    if "anyOf" in schema:
        options = schema["anyOf"]
        nullable = any(o.get("type") == "null" for o in options)
        rest = " or ".join(_type(o, plural) for o in options if o.get("type") != "null")
        return f"{rest} or null" if nullable else rest
    if "enum" in schema:
        return "one of " + ", ".join(f"'{v}'" if isinstance(v, str) else str(v) for v in schema["enum"])
    if "const" in schema:
        return f"'{schema['const']}'"
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            items = schema["prefixItems"]
            if all(i == items[0] for i in items):
                return f"{len(items)} {_type(items[0], plural=True)}"
            return "[" + ", ".join(_type(i) for i in items) + "]"
        size = "non-empty list" if schema.get("minItems", 0) >= 1 else "list"
        return f"{size} of {_type(schema.get('items', {}), plural=True)}"
    names = {"integer": "integer", "number": "float", "boolean": "bool", "string": "string", "object": "mapping"}
    name = names.get(kind, kind or "any")
    if kind == "string" and schema.get("format") == "path":
        name = "path"
    if plural:
        name += "s"
    return name + _bounds(schema)


def _default(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _table(rows: list[tuple[str, str, str, str]]) -> nodes.table:
    table = nodes.table(classes=["config-reference"])
    group = nodes.tgroup(cols=4)
    table += group
    for width in (18, 18, 12, 52):
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    header = nodes.row()
    for title in ("option", "type", "default", "description"):
        header += nodes.entry("", nodes.paragraph(text=title))
    head += header
    body = nodes.tbody()
    group += body
    for option, kind, default, description in rows:
        row = nodes.row()
        row += nodes.entry("", nodes.paragraph("", "", nodes.literal(option, option)))
        row += nodes.entry("", nodes.paragraph(text=kind))
        row += nodes.entry("", nodes.paragraph("", "", nodes.literal(default, default)))
        row += nodes.entry("", nodes.paragraph("", "", *_inline(description)))
        body += row
    return table


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


class ConfigReference(SphinxDirective):
    """Sections and option tables of :class:`pyro_hvae.config.Config`."""

    has_content = False
    required_arguments = 0

    def _section(self, key: str, title: str, intro: str, rows) -> nodes.section:
        section = nodes.section(ids=[f"config-{key}"], names=[f"config-{key}"])
        section += nodes.title(title, "", *_inline(title) if key != "top" else [nodes.Text(title)])
        if intro:
            section += nodes.paragraph("", "", *_inline(intro))
        section += _table(rows)
        return section

    def _rows(self, model: type[BaseModel], schema: dict, prefix: str, where: str, defs: dict):
        """One row per option of ``model``; an option that is itself a mapping of options
        (e.g. ``train.spectral_reg``) is followed by the rows of its options."""
        rows = []
        for name, field in model.model_fields.items():
            if _sections(field.annotation):
                continue
            description = field.description or ""
            if not description:
                logger.warning(
                    "config option %s%s has no description in %s", prefix, name, where, location=self.get_location()
                )
            default = field.get_default(call_default_factory=True)
            shown = "required" if default is PydanticUndefined else _default(to_jsonable_python(default))
            nested = _optional_section(field.annotation)
            kind = _type(schema["properties"][name]) if nested is None else "mapping or null"
            rows.append((prefix + name, kind, shown, description))
            if nested is not None:
                rows += self._rows(nested, defs[nested.__name__], f"{prefix}{name}.", nested.__name__, defs)
        return rows

    def run(self) -> list[nodes.Node]:
        from pyro_hvae.config import Config

        self.env.note_dependency(__import__("pyro_hvae.config", fromlist=["_"]).__file__)
        schema = Config.model_json_schema()
        sections = [self._section("top", "Top-level options", "", self._rows(Config, schema, "", "Config", schema["$defs"]))]
        for name, field in Config.model_fields.items():
            kinds = _sections(field.annotation)
            for kind, model in kinds.items():
                key, title = (f"{name}-{kind}", f"`{name}` (kind: {kind})") if kind else (name, f"`{name}`")
                intro = _first_paragraph(model.__doc__)
                rows = self._rows(model, schema["$defs"][model.__name__], f"{name}.", model.__name__, schema["$defs"])
                sections.append(self._section(key, title, intro, rows))
        return sections


def _sections(annotation) -> dict[str, type[BaseModel]]:
    """``{"": section}`` for a section, ``{kind: section}`` for a union of sections
    discriminated by ``kind``, ``{}`` for an option."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"": annotation}
    from pyro_hvae.config import _kinds

    return _kinds(annotation) or {}


def _optional_section(annotation) -> type[BaseModel] | None:
    """The options of an option that is a mapping of options (``Section`` or ``Optional[Section]``)."""
    from pyro_hvae.config import _optional_section

    return _optional_section(annotation)


def setup(app):
    app.add_directive("config-reference", ConfigReference)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}

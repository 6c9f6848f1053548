"""MkDocs hook: the configuration page's key tables, generated from the config schema.

A page that holds `<!-- robustft:config-keys -->` gets one section per top-level key of
workflow/schemas/config.schema.yaml, as the workflow validates a config against it
(`robustft.config.with_method_table`: method names from the method table), with a row per
key: dotted path, type, default, description. `<!-- robustft:user-method-keys -->` gets the
keys a method of your own adds, for the example examples/freeze_early.py. Nothing is copied by
hand, so the page cannot drift from the schema.
"""

from __future__ import annotations

import html
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

KEYS_MARKER = "<!-- robustft:config-keys -->"
USER_METHOD_MARKER = "<!-- robustft:user-method-keys -->"
SCHEMA = Path("workflow/schemas/config.schema.yaml")
EXAMPLE_METHOD = ("freeze_early", Path("examples/freeze_early.py"), "make_method")
# What the key of a free-form mapping stands for, in the dotted paths.
PLACEHOLDERS = {
    "backbone_options": "<backbone>",
    "dataset_settings": "<dataset>",
    "baseline.lines": "<dataset>",
}


def schema_keys(schema: Mapping[str, Any], *, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(dotted path, its schema) of every key, parents before children."""
    for name, spec in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield path, spec
        yield from schema_keys(spec, prefix=path)
        mapping = spec.get("additionalProperties")
        if isinstance(mapping, dict) and "properties" in mapping:
            yield from schema_keys(mapping, prefix=f"{path}.{PLACEHOLDERS.get(path, '<key>')}")
        items = spec.get("items")
        if isinstance(items, dict) and "properties" in items:
            yield from schema_keys(items, prefix=f"{path}[]")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _bounds(spec: Mapping[str, Any]) -> str:
    """` in [0, 1]`, ` > 0`, ` ≥ 1` ...: the range JSON schema allows a number."""
    low = ("[", spec["minimum"]) if "minimum" in spec else None
    low = ("(", spec["exclusiveMinimum"]) if "exclusiveMinimum" in spec else low
    high = (spec["maximum"], "]") if "maximum" in spec else None
    high = (spec["exclusiveMaximum"], ")") if "exclusiveMaximum" in spec else high
    if low and high:
        return f" in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f" {'≥' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'≤' if high[1] == ']' else '<'} {high[0]}"
    return ""


def type_text(spec: Mapping[str, Any]) -> str:
    """The JSON type(s) of a key, with the allowed values and bounds."""
    if "anyOf" in spec:
        return " or ".join(type_text(option) for option in spec["anyOf"])
    types = spec.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    if not types:
        return "any"
    texts = []
    for kind in types:
        text = kind
        if kind == "array" and isinstance(spec.get("items"), dict):
            items = type_text(spec["items"])
            text = f"array of ({items})" if " or " in items else f"array of {items}"
        if kind in ("integer", "number"):
            text += _bounds(spec)
        texts.append(text)
    enum = [value for value in spec.get("enum", []) if value is not None]
    if enum:
        texts[0] += " (" + ", ".join(str(value) for value in enum) + ")"
    return " or ".join(texts)


def default_text(spec: Mapping[str, Any], *, required: bool) -> str:
    if "default" in spec:
        return _json(spec["default"])
    return "required" if required else "—"


def description_text(spec: Mapping[str, Any]) -> str:
    return " ".join(str(spec.get("description", "")).split())


def _inline(text: str) -> str:
    """Escaped HTML of a schema description; `backticks` become code."""
    parts = html.escape(text, quote=False).split("`")
    return "".join(f"<code>{part}</code>" if odd % 2 else part for odd, part in enumerate(parts))


def _table(rows: list[tuple[str, dict, bool]], *, kind: str) -> str:
    lines = [
        f'<table data-robustft="{kind}">',  # no class: Material styles class-less tables
        "<thead><tr><th>key</th><th>type</th><th>default</th><th>description</th></tr></thead>",
        "<tbody>",
    ]
    for path, spec, required in rows:
        cells = (
            f"<code>{html.escape(path)}</code>",
            html.escape(type_text(spec)),
            f"<code>{html.escape(default_text(spec, required=required))}</code>",
            _inline(description_text(spec)),
        )
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _rows(schema: Mapping[str, Any]) -> list[tuple[str, dict, bool]]:
    """Every key with whether its parent requires it."""
    required = {}
    for path, spec in [("", schema), *schema_keys(schema)]:
        for container in (spec, spec.get("additionalProperties"), spec.get("items")):
            if isinstance(container, dict):
                for name in container.get("required", []):
                    required.setdefault(path, set()).add(name)
    rows = []
    for path, spec in schema_keys(schema):
        parent, _, name = path.rpartition(".")
        parent = re.sub(r"(\.<[a-z]+>|\[\])$", "", parent)
        rows.append((path, spec, name in required.get(parent, set())))
    return rows


def keys_markdown(schema: Mapping[str, Any]) -> str:
    """One section per top-level key, each a table of that key and everything under it."""
    sections = []
    for top in schema["properties"]:
        rows = [row for row in _rows(schema) if re.match(rf"{top}($|[.\[])", row[0])]
        sections.append(f"## `{top}`\n\n{_table(rows, kind='config-keys')}\n")
    return "\n".join(sections)


def user_method_markdown(schema: Mapping[str, Any], with_method: Mapping[str, Any]) -> str:
    """The keys a method of your own adds: those of `with_method` that `schema` lacks."""
    known = {path for path, _ in schema_keys(schema)}
    rows = [row for row in _rows(with_method) if row[0] not in known]
    rows.sort(key=lambda row: not row[0].startswith("finetune."))  # its own section first
    return _table(rows, kind="user-method-keys") + "\n"


def _schemas(root: Path) -> tuple[dict, dict]:
    """The schema as the workflow validates a config of built-in methods, and as it validates
    one that adds the example method."""
    source = str(root / "src")
    if source not in sys.path:
        sys.path.insert(0, source)  # this checkout's library, installed or not
    from robustft.config import load_schema, with_method_table

    schema = load_schema(root / SCHEMA)
    name, path, function = EXAMPLE_METHOD
    own = {name: {"entry": f"{root / path}:{function}"}}
    return with_method_table(schema, finetune=None), with_method_table(schema, finetune=own)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    if KEYS_MARKER not in markdown and USER_METHOD_MARKER not in markdown:
        return markdown
    builtin, with_method = _schemas(Path(config.config_file_path).resolve().parent)
    markdown = markdown.replace(KEYS_MARKER, keys_markdown(builtin))
    return markdown.replace(USER_METHOD_MARKER, user_method_markdown(builtin, with_method))

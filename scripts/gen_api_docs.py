#!/usr/bin/env python3
"""Render docs/API.md from the collector's OpenAPI document, keeping its hand-written preamble.

The document is built in-process exactly as ``GET /api/v1/openapi.json`` builds it
(``build_openapi`` over the route registry ``micboard.collector.api.app.ROUTES``): no server,
database or NATS is needed. The part of docs/API.md between the preamble markers is kept as it
is; everything between the generated markers is rewritten.

    python scripts/gen_api_docs.py            # rewrite docs/API.md
    python scripts/gen_api_docs.py --check    # exit 1 when docs/API.md is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "API.md"

TITLE = "# The collector's HTTP API"
PREAMBLE_BEGIN = "<!-- BEGIN PREAMBLE: hand-written; scripts/gen_api_docs.py keeps it as it is -->"
PREAMBLE_END = "<!-- END PREAMBLE -->"
GENERATED_BEGIN = (
    "<!-- BEGIN GENERATED: rendered from the OpenAPI document by scripts/gen_api_docs.py; "
    "do not edit by hand -->"
)
GENERATED_END = "<!-- END GENERATED -->"

_METHOD_ORDER = ("get", "post", "put", "patch", "delete")
_REF_PREFIX = "#/components/schemas/"


def build_document() -> dict[str, Any]:
    """The OpenAPI document the collector serves at ``/api/v1/openapi.json``."""
    from micboard.collector.api.app import ROUTES
    from micboard.collector.api.openapi import build_openapi

    return build_openapi(ROUTES)


# -- schema rendering ----------------------------------------------------------------------


def _cell(text: str) -> str:
    """``text`` made safe for one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"`{text}`"


def _constraints(schema: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        found.append(f"{low}..{high}")
    elif low is not None:
        found.append(f">= {low}")
    elif high is not None:
        found.append(f"<= {high}")
    if "exclusiveMinimum" in schema:
        found.append(f"> {schema['exclusiveMinimum']}")
    if "exclusiveMaximum" in schema:
        found.append(f"< {schema['exclusiveMaximum']}")
    short, long = schema.get("minLength"), schema.get("maxLength")
    if short is not None or long is not None:
        found.append(f"length {short or 0}..{long if long is not None else ''}".rstrip("."))
    if "minItems" in schema or "maxItems" in schema:
        found.append(f"items {schema.get('minItems', 0)}..{schema.get('maxItems', '')}".rstrip("."))
    if "pattern" in schema:
        found.append(f"pattern {_code(schema['pattern'])}")
    return found


def render_type(schema: Mapping[str, Any]) -> str:
    """A short, readable type of a JSON schema: ``integer (1..1000)``, ``DevicePage``, ``string or null``."""
    if "$ref" in schema:
        return _code(str(schema["$ref"]).removeprefix(_REF_PREFIX))
    if "const" in schema:
        return _code(schema["const"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [render_type(option) for option in schema[key]]
            nullable = "null" in options
            shown = " or ".join(o for o in options if o != "null")
            return f"{shown} or null" if nullable else shown
    if "enum" in schema:
        return "one of " + ", ".join(_code(value) for value in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        base = " or ".join(str(k) for k in kind)
    elif kind == "array":
        items = schema.get("items")
        base = f"array of {render_type(items)}" if isinstance(items, Mapping) and items else "array"
    elif kind is None:
        base = "any"
    else:
        base = str(kind)
    if "format" in schema:
        base += f" ({schema['format']})"
    extra = _constraints(schema)
    return f"{base} ({', '.join(extra)})" if extra else base


def _default(schema: Mapping[str, Any]) -> str:
    if "default" not in schema or schema["default"] is None:
        return ""
    return _code(schema["default"])


def _description(schema: Mapping[str, Any], fallback: str | None = None) -> str:
    text = schema.get("description") or fallback or ""
    if not text:
        for key in ("anyOf", "oneOf"):
            for option in schema.get(key, ()):
                if isinstance(option, Mapping) and option.get("description"):
                    return str(option["description"])
    return str(text)


def _schema_ref(content: Mapping[str, Any]) -> str:
    """The schema shown for a request or response body: its name, or its type."""
    parts = []
    for media_type, media in content.items():
        schema = media.get("schema", {})
        parts.append(f"{render_type(schema)} (`{media_type}`)")
    return "; ".join(parts)


# -- document rendering --------------------------------------------------------------------


def _operations(document: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    found = []
    for path, item in document["paths"].items():
        for method in _METHOD_ORDER:
            if method in item:
                found.append((path, method, item[method]))
    return found


def _tags(operations: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[str]:
    tags: list[str] = []
    for _path, _method, operation in operations:
        for tag in operation.get("tags", ["other"]):
            if tag not in tags and tag != "service":
                tags.append(tag)
    # The unauthenticated service endpoints come last.
    return [*tags, "service"]


def _role(operation: Mapping[str, Any]) -> str:
    role = operation.get("x-required-role")
    return f"**{role}**" if role else "none (no token needed)"


def _parameters(operation: Mapping[str, Any]) -> list[str]:
    params = operation.get("parameters") or []
    if not params:
        return ["Parameters: none."]
    lines = [
        "| parameter | in | type | required | default | description |",
        "|---|---|---|---|---|---|",
    ]
    for param in params:
        schema = param.get("schema", {})
        lines.append(
            "| "
            + " | ".join(
                _cell(cell)
                for cell in (
                    f"`{param['name']}`",
                    str(param["in"]),
                    render_type(schema),
                    "yes" if param.get("required") else "no",
                    _default(schema),
                    _description(schema, param.get("description")),
                )
            )
            + " |"
        )
    return lines


def _responses(operation: Mapping[str, Any]) -> list[str]:
    lines = ["| status | meaning | body |", "|---|---|---|"]
    for status, response in sorted(operation.get("responses", {}).items()):
        content = response.get("content") or {}
        body = _schema_ref(content) if content else ""
        lines.append(f"| {status} | {_cell(str(response.get('description', '')))} | {_cell(body)} |")
    return lines


def render_operation(path: str, method: str, operation: Mapping[str, Any]) -> list[str]:
    """The Markdown of one operation."""
    lines = [f"#### `{method.upper()} {path}`", "", str(operation.get("summary", "")).rstrip(".") + "."]
    description = str(operation.get("description") or "").strip()
    if description and description != operation.get("summary"):
        lines += ["", description]
    lines += ["", f"- Role required: {_role(operation)}", f"- Operation id: `{operation.get('operationId')}`"]
    body = operation.get("requestBody")
    if body:
        lines.append(f"- Request body: {_schema_ref(body.get('content', {}))}")
    lines += ["", *_parameters(operation), "", *_responses(operation), ""]
    return lines


def render_schema(name: str, schema: Mapping[str, Any]) -> list[str]:
    """The Markdown of one component schema: its fields, their types and whether they are required."""
    lines = [f"### `{name}`", ""]
    description = str(schema.get("description") or "").strip()
    if description:
        lines += [" ".join(description.split()), ""]
    properties: Mapping[str, Any] = schema.get("properties") or {}
    if not properties:
        lines += [f"Type: {render_type(schema)}.", ""]
        return lines
    required = set(schema.get("required", ()))
    lines += ["| field | type | required | description |", "|---|---|---|---|"]
    for field, prop in properties.items():
        lines.append(
            "| "
            + " | ".join(
                _cell(cell)
                for cell in (
                    f"`{field}`",
                    render_type(prop),
                    "yes" if field in required else "no",
                    _description(prop),
                )
            )
            + " |"
        )
    lines.append("")
    return lines


def render_reference(document: Mapping[str, Any]) -> str:
    """The generated part of docs/API.md: every operation by tag, then every schema."""
    operations = _operations(document)
    lines = [
        "## Reference",
        "",
        "Every operation of the OpenAPI document (`GET /api/v1/openapi.json`), grouped by tag. Paths",
        "with `{id}` or `{index}` take a positive integer; any other value is a 404. Error bodies",
        "are the `Problem` schema (`application/problem+json`).",
        "",
    ]
    for tag in _tags(operations):
        tagged = [op for op in operations if tag in op[2].get("tags", ["other"])]
        if not tagged:
            continue
        lines += [f"### {tag}", ""]
        lines += [
            f"- `{method.upper()} {path}`: {operation.get('summary', '')}"
            for path, method, operation in tagged
        ]
        lines.append("")
        for path, method, operation in tagged:
            lines += render_operation(path, method, operation)
    lines += ["## Schemas", ""]
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        lines += render_schema(name, schema)
    return "\n".join(lines).rstrip() + "\n"


# -- the file ------------------------------------------------------------------------------


def extract_preamble(text: str) -> str:
    """The hand-written preamble of ``text`` (between the markers; a file without them is all preamble)."""
    if PREAMBLE_BEGIN in text and PREAMBLE_END in text:
        start = text.index(PREAMBLE_BEGIN) + len(PREAMBLE_BEGIN)
        return text[start : text.index(PREAMBLE_END, start)].strip("\n")
    body = text.split(GENERATED_BEGIN, 1)[0]
    lines = body.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip("\n")


def render_file(preamble: str, document: Mapping[str, Any]) -> str:
    """The whole of docs/API.md."""
    return "\n".join(
        [
            TITLE,
            "",
            PREAMBLE_BEGIN,
            "",
            preamble,
            "",
            PREAMBLE_END,
            "",
            GENERATED_BEGIN,
            "",
            render_reference(document).rstrip("\n"),
            "",
            GENERATED_END,
            "",
        ]
    )


def _unified_diff(old: str, new: str) -> Iterable[str]:
    import difflib

    return difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), "docs/API.md", "generated", n=1
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Write docs/API.md, or with ``--check`` report whether it is up to date (exit 1 if not)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/API.md is out of date")
    parser.add_argument("--output", type=Path, default=API_MD, help="the file (default docs/API.md)")
    args = parser.parse_args(argv)
    current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
    wanted = render_file(extract_preamble(current), build_document())
    if args.check:
        if current == wanted:
            print(f"{args.output} is up to date")
            return 0
        sys.stdout.writelines(list(_unified_diff(current, wanted))[:80])
        print(f"\n{args.output} is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
        return 1
    if current != wanted:
        args.output.write_text(wanted, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        print(f"{args.output} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

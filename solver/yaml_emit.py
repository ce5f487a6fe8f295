"""The YAML emitter of problem files: block style at the top, one flow-style line per option.

PyYAML's own representer is slow on large documents and prints an option over several lines;
this one writes what a person would (``- {id: b4, loss: 0.01, cost: {memory_bytes: 1500}}``)
and every scalar so that PyYAML's safe loader (YAML 1.1) reads back exactly the same value.
"""

from __future__ import annotations

import re
from typing import Any

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
_YAML_RESERVED = frozenset(
    "y n yes no on off true false null ~".split()
)


# Printable, but folded or stripped inside a quoted scalar: NEL, LS, PS (line breaks) and BOM.
_YAML_ESCAPE_ALWAYS = frozenset((0x85, 0x2028, 0x2029, 0xFEFF))


def _yaml_str(text: str) -> str:
    """A YAML scalar that reads back as exactly ``text`` (plain when safe, else quoted)."""
    if _PLAIN.match(text) and text.lower() not in _YAML_RESERVED:
        return text
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif (0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD
              or 0x10000 <= code <= 0x10FFFF) and code not in _YAML_ESCAPE_ALWAYS:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:  # pragma: no cover - printable check above covers the astral planes
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _yaml_num(value: float | int | None) -> str:
    """A number PyYAML (YAML 1.1) reads back as the same number."""
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    if "e" in text:
        mantissa, exp = text.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        if exp[0] not in "+-":
            exp = "+" + exp
        text = f"{mantissa}e{exp}"
    return text


def emit_yaml(data: dict[str, Any]) -> str:
    """The document as YAML: block style at the top, one flow-style line per option."""
    import yaml

    s, n = _yaml_str, _yaml_num
    lines = [f"schema: {s(data['schema'])}", f"name: {s(data['name'])}"]
    settings = data.get("settings")
    if settings:
        items = ", ".join(f"{k}: {s(v) if isinstance(v, str) else n(v)}"
                          for k, v in settings.items())
        lines.append(f"settings: {{{items}}}")
    resources = data.get("resources") or {}
    if resources:
        lines.append("resources:")
        for name, spec in resources.items():
            lines.append(f"  {s(name)}: {{limit: {n(spec['limit'])}}}")
    else:
        lines.append("resources: {}")
    lines.append("units:")
    for unit in data["units"]:
        lines.append(f"  - id: {s(unit['id'])}")
        for key in ("kind", "layer", "params"):
            if key in unit:
                val = unit[key]
                lines.append(f"    {key}: {s(val) if isinstance(val, str) else n(val)}")
        lines.append("    options:")
        for opt in unit["options"]:
            cost = ", ".join(f"{s(k)}: {n(v)}" for k, v in opt["cost"].items())
            lines.append(f"      - {{id: {opt['id']}, loss: {n(opt['loss'])}, cost: {{{cost}}}}}")
    if data.get("constraints"):
        lines.append("constraints:")
        for con in data["constraints"]:
            units = ", ".join(s(u) for u in con["units"])
            count = f", count: {con['count']}" if "count" in con else ""
            lines.append(f"  - {{type: {con['type']}, units: [{units}]{count}}}")
    if "interactions" in data:
        inter = data["interactions"]
        lines.append("interactions:")
        if "file" in inter:
            lines.append(f"  file: {s(inter['file'])}")
        if "pairs" in inter:
            lines.append("  pairs:")
            for p in inter["pairs"]:
                a = f"[{s(p['a'][0])}, {s(p['a'][1])}]"
                b = f"[{s(p['b'][0])}, {s(p['b'][1])}]"
                lines.append(f"    - {{a: {a}, b: {b}, value: {n(p['value'])}}}")
    if data.get("metadata"):
        meta = yaml.dump({"metadata": data["metadata"]}, Dumper=_dumper(), sort_keys=False,
                         default_flow_style=False, allow_unicode=True, width=100)
        lines.append(meta.rstrip("\n"))
    return "\n".join(lines) + "\n"


def _dumper() -> type:
    """PyYAML's safe dumper that never writes anchors/aliases (the loader refuses them):
    an object met twice in the metadata is written out twice."""
    import yaml

    base = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

    class NoAliasDumper(base):  # type: ignore[misc, valid-type]
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return NoAliasDumper

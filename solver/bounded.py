"""Reading untrusted problem files within fixed bounds of time and memory.

A problem file may come from anywhere, so reading one must never take unbounded time or
memory, whatever it holds. The bounds, each refused with one ``ValidationError`` naming what
was exceeded:

- **size**: a JSON file up to ``MAX_JSON_BYTES``, a YAML file up to ``MAX_YAML_BYTES`` (YAML is
  parsed event by event in Python, ~10× slower than JSON; large instances are meant to be JSON);
- **YAML aliases and anchors** are refused outright: a problem file never needs them, and
  they are how a few kilobytes expand into gigabytes ("billion laughs");
- **depth**: containers nested deeper than ``MAX_DEPTH`` (a problem needs 5 levels; nested
  metadata a few more). Both parsers are driven without recursion, so depth costs no stack;
- **nodes**: at most ``MAX_NODES`` scalars and containers in one document;
- **error messages** quote values through :func:`short_repr`, which looks at a bounded number
  of elements and characters whatever the value's size;
- **interaction sidecars** (``.npz``): each member's dtype and shape are read from its header
  (:func:`npz_member_header`) and checked by the caller before any array is allocated.

YAML is read with PyYAML's *safe* machinery only (the libyaml event parser when present);
every scalar is resolved by PyYAML's safe resolver and constructor, so a file can never make the
loader build an object or run code, and ``!!python/...`` tags are refused.
"""

from __future__ import annotations

import json
import reprlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitsack.errors import ValidationError

#: Largest JSON problem file read (bytes).
MAX_JSON_BYTES = 256 << 20
#: Largest YAML problem file read (bytes); beyond it, write the problem as JSON.
MAX_YAML_BYTES = 32 << 20
#: Deepest nesting of containers in a problem document.
MAX_DEPTH = 32
#: Most nodes (scalars + containers) in one document.
MAX_NODES = 20_000_000

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, computed in bounded time and memory.

    Containers are shown to depth 3 and 6 items per level, strings to 60 characters, so even
    a value with a billion elements (or one that refers to itself) prints in microseconds.
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# size, depth and node limits


def read_text_bounded(path: Path, limit: int, fmt: str) -> str:
    """The file's text, refusing files larger than ``limit`` bytes before reading them.

    Raises:
        ValidationError: missing, unreadable, not UTF-8, or too large.
    """
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise ValidationError("problem", f"{str(path)!r} is a folder; valid: a .json, "
                                  ".yaml or .yml file")
        if size > limit:
            hint = "; write large problems as .json" if fmt == "yaml" else ""
            raise ValidationError("problem", f"{str(path)!r} is {size} bytes; valid: a {fmt} "
                                  f"problem file of at most {limit} bytes{hint}")
        with open(path, encoding="utf-8") as handle:
            text = handle.read(limit + 1)
    except FileNotFoundError:
        raise ValidationError("problem", f"{str(path)!r} does not exist") from None
    except ValidationError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError("problem", f"{str(path)!r} cannot be read: "
                              f"{short_repr(str(exc), 200)}") from None
    if len(text.encode("utf-8", "surrogatepass")) > limit:  # grew while we looked
        raise ValidationError("problem", f"{str(path)!r} is larger than {limit} bytes")
    return text


def _too_deep(where: str) -> ValidationError:
    return ValidationError("problem", f"{where} nests containers deeper than {MAX_DEPTH} "
                           f"levels; valid: at most {MAX_DEPTH} (a problem needs about 6)")


def _too_many(where: str) -> ValidationError:
    return ValidationError("problem", f"{where} has more than {MAX_NODES} values; valid: at "
                           f"most {MAX_NODES}")


def check_tree(data: Any, where: str) -> None:
    """Refuse a parsed document nested deeper than ``MAX_DEPTH`` or with over ``MAX_NODES``
    nodes (iterative, no recursion).

    Raises:
        ValidationError: naming the limit.
    """
    stack = [(data, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise _too_many(where)
        if isinstance(value, dict):
            if depth >= MAX_DEPTH:
                raise _too_deep(where)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            if depth >= MAX_DEPTH:
                raise _too_deep(where)
            stack.extend((v, depth + 1) for v in value)


def parse_json(text: str, where: str) -> Any:
    """Parse JSON text, refusing over-deep or over-large documents with one clear message.

    The C decoder recurses per nesting level and stops at the interpreter's recursion limit
    with ``RecursionError``; that is reported as the depth limit.

    Raises:
        ValidationError: invalid JSON, too deep, or too many nodes.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError("problem", f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep(where) from None
    check_tree(data, where)
    return data


# --------------------------------------------------------------------------------------------
# YAML, event by event


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text with PyYAML's safe resolver and constructor, event by event.

    The document is built from the parser's events with an explicit stack, so there is no
    recursion (depth costs no stack) and every node is counted as it is made. Aliases and
    anchors are refused at the first one met: nothing is ever expanded.

    Raises:
        ValidationError: invalid YAML, an alias/anchor, a non-safe tag, too deep, or too many
            nodes (with the line and column where it was found).
    """
    import yaml

    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loader = loader_cls(text)
    try:
        return _build(loader, where)
    except yaml.YAMLError as exc:
        first = short_repr(str(exc).splitlines()[0], 200).strip("'\"")
        raise ValidationError("problem", f"{where} is not valid (safe) YAML: {first} "
                              f"{_mark(exc)}") from None
    finally:
        loader.dispose()


def _mark(exc: Any) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "start_mark", None)
    return f"(line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _at(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


_SCALAR_TAGS = frozenset(f"tag:yaml.org,2002:{t}"
                         for t in ("null", "bool", "int", "float", "str", "timestamp"))


@dataclass
class _Frame:
    """A container under construction: a list, or a dict waiting for a key or a value."""

    value: Any
    key: Any = None
    has_key: bool = False


def _build(loader: Any, where: str) -> Any:
    import yaml
    from yaml import events
    from yaml.nodes import ScalarNode

    constructors = loader.yaml_constructors
    documents: list[Any] = []
    stack: list[_Frame] = []
    nodes = 0

    def add(value: Any) -> None:
        if not stack:
            documents.append(value)
            return
        top = stack[-1]
        if isinstance(top.value, list):
            top.value.append(value)
        elif not top.has_key:
            try:
                hash(value)
            except TypeError:
                raise ValidationError("problem", f"{where}: a mapping key is a "
                                      f"{type(value).__name__}; valid: plain scalar keys") \
                    from None
            top.key, top.has_key = value, True
        else:
            top.value[top.key] = value
            top.key, top.has_key = None, False

    while True:
        event = loader.get_event()
        if event is None or isinstance(event, events.StreamEndEvent):
            break
        if isinstance(event, events.AliasEvent) or getattr(event, "anchor", None):
            raise ValidationError("problem", f"{where} uses a YAML alias or anchor"
                                  f"{_at(event)}; valid: a file without '&' anchors and '*' "
                                  "aliases (a problem file never needs them)")
        if isinstance(event, (events.StreamStartEvent, events.DocumentStartEvent,
                              events.DocumentEndEvent)):
            continue
        if isinstance(event, (events.SequenceStartEvent, events.MappingStartEvent)):
            nodes += 1
            if nodes > MAX_NODES:
                raise _too_many(where)
            if len(stack) >= MAX_DEPTH:
                raise _too_deep(where)
            tag = event.tag
            is_seq = isinstance(event, events.SequenceStartEvent)
            default = "tag:yaml.org,2002:seq" if is_seq else "tag:yaml.org,2002:map"
            if tag not in (None, "!", default):
                raise ValidationError("problem", f"{where} has tag {short_repr(tag)}"
                                      f"{_at(event)}; valid: plain YAML (no tags)")
            stack.append(_Frame([] if is_seq else {}))
        elif isinstance(event, (events.SequenceEndEvent, events.MappingEndEvent)):
            frame = stack.pop()
            add(frame.value)
        elif isinstance(event, events.ScalarEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise _too_many(where)
            tag = event.tag
            if tag is None or tag == "!":
                tag = loader.resolve(ScalarNode, event.value, event.implicit)
            if tag not in _SCALAR_TAGS:
                raise ValidationError("problem", f"{where} has tag {short_repr(tag)}"
                                      f"{_at(event)}; valid: plain YAML scalars")
            node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
            construct = constructors.get(tag) or constructors[None]
            try:
                # the scalar constructor itself: construct_object would memoize every node
                add(construct(loader, node))
            except yaml.constructor.ConstructorError as exc:
                raise ValidationError("problem", f"{where}: {short_repr(str(exc), 200)}") \
                    from None
        else:  # pragma: no cover - every event class is handled above
            raise ValidationError("problem", f"{where}: unexpected YAML event {event!r}")
    if len(documents) > 1:
        raise ValidationError("problem", f"{where} holds {len(documents)} YAML documents; "
                              "valid: one")
    return documents[0] if documents else None


# --------------------------------------------------------------------------------------------
# .npz headers


@dataclass(frozen=True)
class NpyHeader:
    """What an ``.npy`` member of an ``.npz`` declares, read without reading its data."""

    dtype: Any
    shape: tuple[int, ...]
    fortran_order: bool
    stored_bytes: int


def npz_member_header(path: Path, member: str) -> NpyHeader | None:
    """The header of array ``member`` of the ``.npz`` at ``path``, or None if absent.

    Only the zip directory and the member's first bytes (the ``.npy`` header, a few hundred
    bytes) are read, so a file claiming a huge array costs nothing to inspect.

    Raises:
        ValidationError: not a zip file, or a member that is not a valid ``.npy``.
    """
    import numpy as np
    from numpy.lib import format as npformat

    try:
        with zipfile.ZipFile(path) as archive:
            name = f"{member}.npy"
            if name not in archive.namelist():
                return None
            info = archive.getinfo(name)
            with archive.open(info) as handle:
                version = npformat.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = npformat.read_array_header_1_0(handle)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran, dtype = npformat.read_array_header_2_0(handle)
                else:  # pragma: no cover - read_magic refuses other versions itself
                    raise ValueError(f"unsupported .npy version {version}")
    except zipfile.BadZipFile as exc:
        raise ValidationError("interactions.file", f"{path.name!r} is not an .npz (zip) "
                              f"file: {short_repr(str(exc), 120)}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ValidationError("interactions.file", f"{path.name!r}: member {member!r} is not "
                              f"a valid .npy array: {short_repr(str(exc), 120)}") from None
    return NpyHeader(dtype=np.dtype(dtype), shape=tuple(int(d) for d in shape),
                     fortran_order=bool(fortran), stored_bytes=int(info.file_size))


def npz_names(path: Path) -> list[str]:
    """Array names in an ``.npz`` (zip directory only).

    Raises:
        ValidationError: not a zip file.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as exc:
        raise ValidationError("interactions.file", f"{path.name!r} is not an .npz (zip) "
                              f"file: {short_repr(str(exc), 120)}") from None

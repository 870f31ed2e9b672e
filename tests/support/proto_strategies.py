"""Hypothesis strategies for any protobuf message, from its descriptor alone.

Hand-written: the PyPI packages for this (hypothesis-protobuf, hypothesis-pb) have not
been released since 2015 and 2019 and predate protobuf 4's descriptor API.

Values lean on the hostile: strings with control characters, right-to-left overrides,
path tricks and 70,000 characters; integers at their type's limits; NaN and infinities;
enum numbers no version of the proto knows; empty messages set but with nothing in them.
``fields`` replaces a field's strategy by name ("name" for every message, or the full
"pkg.Message.name" for one), e.g. to keep an address on loopback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor

ODD_STRINGS = [
    "",
    " ",
    "-",
    "--help",
    ".",
    "..",
    "../../etc/passwd",
    "/",
    "a/b",
    "\x00",
    "a\x00b",
    "\n",
    "\r\n\t",
    "\x1b[31mred\x1b[0m",
    "\u202eevil\u202c",
    "\ufeff",
    "\u0300",
    "😀" * 5,
    "ü",
    "%s%n",
    "' OR 1=1 --",
    "$(id)",
    "A" * 64,
    "a" * 300,
    "x" * 20_000,
]

_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def odd_text(known: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """Strings a handler must survive; ``known`` are values that reach deeper code."""
    choices = [st.sampled_from(ODD_STRINGS), st.text(max_size=40)]
    if known:
        choices.insert(0, st.sampled_from(known))
    return st.one_of(*choices)


def odd_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=64), st.sampled_from([b"", b"\x00" * 1024, b"\xff" * 100_000])
    )


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({lo, hi, 0, min(max(-1, lo), hi), min(1, hi), min(65535, hi), min(65536, hi)})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def scalar(field: FieldDescriptor, text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        return _ints(*_INT_RANGES[t])
    if t == F.TYPE_DOUBLE:
        return st.floats()
    if t == F.TYPE_FLOAT:
        return st.floats(width=32)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return text
    if t == F.TYPE_BYTES:
        return odd_bytes()
    if t == F.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        if field.enum_type.is_closed:  # proto2: unknown numbers cannot be set
            return st.sampled_from(known)
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field {field.full_name} of type {t}")


def messages(
    descriptor: Descriptor,
    *,
    fields: Mapping[str, st.SearchStrategy[Any]] | None = None,
    text: st.SearchStrategy[str] | None = None,
    max_depth: int = 3,
    max_items: int = 3,
) -> st.SearchStrategy[Message]:
    """Any message of ``descriptor``'s type: every field maybe set, one member of a oneof."""
    overrides = dict(fields or {})
    strings = text if text is not None else odd_text()

    def value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        for key in (field.full_name, field.name):
            if key in overrides:
                return overrides[key]
        if field.message_type is not None:
            return build(field.message_type, depth + 1)
        return scalar(field, strings)

    @st.composite
    def draw_message(draw: st.DrawFn, desc: Descriptor, depth: int) -> Message:
        msg = GetMessageClass(desc)()
        oneof_pick = {
            o.name: draw(st.sampled_from([None, *o.fields]))
            for o in desc.oneofs
            if not (len(o.fields) == 1 and o.fields[0].name.startswith("_"))  # proto3 optional
        }
        for field in desc.fields:
            oneof = field.containing_oneof
            if oneof is not None and oneof.name in oneof_pick:
                if oneof_pick[oneof.name] is not field:
                    continue
            elif not draw(st.booleans()):
                continue
            is_msg = field.type == F.TYPE_MESSAGE
            if is_msg and depth >= max_depth and field.full_name not in overrides:
                continue
            _set(draw, msg, field, value, depth, max_items)
        return msg

    cache: dict[tuple[str, int], st.SearchStrategy[Message]] = {}

    def build(desc: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        key = (desc.full_name, depth)
        if key not in cache:
            cache[key] = draw_message(desc, depth)
        return cache[key]

    return build(descriptor, 0)


def _set(
    draw: st.DrawFn, msg: Message, field: FieldDescriptor, value: Any, depth: int, n: int
) -> None:
    target = getattr(msg, field.name)
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key_f, val_f = entry.fields_by_name["key"], entry.fields_by_name["value"]
        entries = draw(st.dictionaries(value(key_f, depth), value(val_f, depth), max_size=n))
        for k, v in entries.items():
            if val_f.type == F.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.is_repeated:
        element = value(field, depth)
        if element.is_empty:  # fields={"ports": st.nothing()}: always an empty list
            return
        items = draw(st.lists(element, max_size=n))
        if field.type == F.TYPE_MESSAGE:
            for item in items:
                target.add().CopyFrom(item)
        else:
            target.extend(items)
    elif field.type == F.TYPE_MESSAGE:
        target.SetInParent()  # set, even when it stays empty
        target.CopyFrom(draw(value(field, depth)))
    else:
        setattr(msg, field.name, draw(value(field, depth)))

"""Wire compatibility of protos/ with the last released API (`make lint`).

Compiles protos/vendetta/v1/*.proto with grpcio-tools' protoc into a descriptor set,
summarises what the wire depends on (each message's fields by number with their type
and cardinality, each enum's values by number, each service's methods with their
request and response types and streaming) and compares it with the committed summary
protos/compat-baseline.json. Breaking (exit 1, one line each):

- a message, enum, service or method removed;
- a field or enum value number gone (unless the number is now reserved), or renumbered
  (its name under another number);
- a field's type or cardinality (repeated or not) changed; a method's request,
  response or streaming changed.

Adding is always fine. Renaming a field keeps the wire (the JSON of grpcurl changes:
said, not refused). At a release, record the new baseline with --update.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "protos" / "compat-baseline.json"
Summary = dict[str, Any]


def descriptor_set(protos: Path) -> descriptor_pb2.FileDescriptorSet:
    files = sorted(str(p.relative_to(protos)) for p in (protos / "vendetta").rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        protoc = [sys.executable, "-m", "grpc_tools.protoc", f"-I{protos}"]
        subprocess.run([*protoc, f"--descriptor_set_out={out}", *files], check=True)
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    kind = descriptor_pb2.FieldDescriptorProto.Type.Name(field.type).removeprefix("TYPE_").lower()
    return field.type_name.lstrip(".") if field.type_name else kind


def _messages(prefix: str, messages: Any, out: Summary) -> None:
    for msg in messages:
        name = f"{prefix}.{msg.name}"
        repeated = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
        out["messages"][name] = {
            "fields": {
                str(f.number): {"name": f.name, "type": _type(f), "repeated": f.label == repeated}
                for f in msg.field
            },
            "reserved": [[r.start, r.end] for r in msg.reserved_range],
        }
        _enums(name, msg.enum_type, out)
        _messages(name, msg.nested_type, out)


def _enums(prefix: str, enums: Any, out: Summary) -> None:
    for enum in enums:
        out["enums"][f"{prefix}.{enum.name}"] = {
            "values": {str(v.number): v.name for v in enum.value},
            "reserved": [[r.start, r.end + 1] for r in enum.reserved_range],
        }


def summarise(files: descriptor_pb2.FileDescriptorSet) -> Summary:
    out: Summary = {"messages": {}, "enums": {}, "services": {}}
    for file in files.file:
        _messages(file.package, file.message_type, out)
        _enums(file.package, file.enum_type, out)
        for service in file.service:
            out["services"][f"{file.package}.{service.name}"] = {
                m.name: [
                    m.input_type.lstrip("."),
                    m.output_type.lstrip("."),
                    m.client_streaming,
                    m.server_streaming,
                ]
                for m in service.method
            }
    return out


def _reserved(number: int, ranges: list[list[int]]) -> bool:
    return any(start <= number < end for start, end in ranges)


def breaking(old: Summary, new: Summary) -> tuple[list[str], list[str]]:
    """(what breaks the wire, what only changes names) from ``old`` to ``new``."""
    broken: list[str] = []
    renamed: list[str] = []
    for name, msg in old["messages"].items():
        now = new["messages"].get(name)
        if now is None:
            broken.append(f"message {name} removed")
            continue
        numbers = {f["name"]: n for n, f in now["fields"].items()}
        for number, field in msg["fields"].items():
            got = now["fields"].get(number)
            where = f"{name}.{field['name']} = {number}"
            if got is None:
                if field["name"] in numbers:
                    broken.append(f"{where} renumbered to {numbers[field['name']]}")
                elif not _reserved(int(number), now["reserved"]):
                    broken.append(f"{where} removed (reserve its number instead)")
                continue
            if (got["type"], got["repeated"]) != (field["type"], field["repeated"]):
                was = ("repeated " if field["repeated"] else "") + field["type"]
                is_ = ("repeated " if got["repeated"] else "") + got["type"]
                broken.append(f"{where} changed type: {was} -> {is_}")
            if got["name"] != field["name"]:
                renamed.append(f"{where} renamed {got['name']} (its JSON name changes)")
    for name, enum in old["enums"].items():
        now = new["enums"].get(name)
        if now is None:
            broken.append(f"enum {name} removed")
            continue
        numbers = {v: n for n, v in now["values"].items()}
        for number, value in enum["values"].items():
            if number in now["values"]:
                continue
            if value in numbers:
                broken.append(f"{name}.{value} = {number} renumbered to {numbers[value]}")
            elif not _reserved(int(number), now["reserved"]):
                broken.append(f"{name}.{value} = {number} removed (reserve its number instead)")
    for name, methods in old["services"].items():
        now = new["services"].get(name)
        if now is None:
            broken.append(f"service {name} removed")
            continue
        for method, shape in methods.items():
            if method not in now:
                broken.append(f"rpc {name}/{method} removed")
            elif now[method] != shape:
                broken.append(f"rpc {name}/{method} changed: {shape} -> {now[method]}")
    return broken, renamed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protos", type=Path, default=ROOT / "protos", help="the .proto root")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--update", action="store_true", help="record the baseline (a release)")
    args = parser.parse_args(argv)
    new = summarise(descriptor_set(args.protos))
    if args.update:
        args.baseline.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
        print(f"recorded {args.baseline}")
        return 0
    old = json.loads(args.baseline.read_text())
    broken, renamed = breaking(old, new)
    for line in renamed:
        print(f"note: {line}")
    for line in broken:
        print(f"error: {line}", file=sys.stderr)
    if broken:
        print(
            f"error: protos/ breaks wire compatibility with {args.baseline.name} "
            f"({len(broken)} change(s)): add new fields, messages or RPCs instead",
            file=sys.stderr,
        )
        return 1
    print(f"protos/ are wire compatible with {args.baseline.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

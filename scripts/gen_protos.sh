#!/usr/bin/env bash
# Regenerates vendetta/v1 from protos/ with the pinned grpcio-tools and
# mypy-protobuf. `--check` fails when the committed code has drifted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# protoc finds the mypy-protobuf plugins (protoc-gen-mypy*) on PATH, beside the interpreter.
export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"
out=vendetta
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)/vendetta
fi
rm -rf "$out/v1"
mkdir -p "$out/v1"
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$(dirname "$out")" --grpc_python_out="$(dirname "$out")" \
  --mypy_out="$(dirname "$out")" --mypy_grpc_out="$(dirname "$out")" \
  protos/vendetta/v1/*.proto
printf '"""Generated from protos/vendetta/v1 by `make protos`. Do not edit."""\n' > "$out/v1/__init__.py"
printf '"""Generated code only: see protos/. Do not edit."""\n' > "$out/__init__.py"
touch "$out/py.typed"
if [[ "${1:-}" == "--check" ]]; then
  if ! diff -r -x __pycache__ "$out" vendetta >/dev/null; then
    diff -r -x __pycache__ "$out" vendetta | head -40
    echo "error: vendetta/v1 is out of date with protos/: run 'make protos' and commit" >&2
    exit 1
  fi
  echo "generated code matches protos/"
fi

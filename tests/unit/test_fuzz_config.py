"""Fuzzing the project config: generated YAML for every key of ProjectConfig.

The generator walks the pydantic model (common/config.py), so a new key is fuzzed
without a change here; a key of a type it does not know fails test_every_key_is_generated.
Each key gets values of its own type (at and past its bounds) or any other YAML; whole
documents are also cut short or replaced with hostile YAML. `parse_config` must accept
the text or raise ConfigError with a short message, nothing else; a sample goes through
the real `vendetta config validate FILE`: exit 0 or 1, one message, no traceback.

Budget: VENDETTA_FUZZ_EXAMPLES (default 10) sets both: 25 times as many documents
through parse_config, and as many through the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import types
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from common.config import ProjectConfig, parse_config
from common.errors import ConfigError
from tests.support.proto_strategies import odd_text

EXAMPLES = int(os.environ.get("VENDETTA_FUZZ_EXAMPLES", "10"))
# The 20,000-character strings are meant; hypothesis warns about their repr.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
VENDETTA = Path(sys.executable).parent / "vendetta"
MAX_MESSAGE = 4000  # characters: up to 20 problems, each a line

# Values that reach past the first checks of some keys (sizes, durations, names, users).
HINTS = (
    "web",
    "db",
    "node1",
    "dev",
    "1000:1000",
    "/workspace",
    "512M",
    "8G",
    "2GiB",
    "1.5T",
    "500ms",
    "1h30m",
    "1s",
    "nan",
    "inf",
    "-1s",
    "9" * 400 + "h",
    "9" * 400 + "G",
    "1e308",
    "ubuntu:22.04",
    "lxc",
    "kvm",
    "on-failure",
    "http://localhost:8080/health",
)
TEXT = odd_text(HINTS)
KEYS = odd_text(("web", "db", "api", "x-extra", "healthcheck", "url", "<<"))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    TEXT,
)
ANY_YAML = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)

# Whole documents no generator of values writes: deep, aliased, tagged, broken.
HOSTILE = [
    "",
    "---",
    "name",
    "[]",
    "- a\n- b",
    "name: a\nname: b",
    "name: [" * 5000,
    "services: " + "{a: " * 2000 + "1" + "}" * 2000,
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"a{i}: &a{i} [*a{i - 1 if i > 1 else ''}, *a{i - 1 if i > 1 else ''}]\n"
        for i in range(1, 30)
    )
    + "services: {web: {command: *a29}}",
    "name: !!python/object/apply:os.system [id]",
    "name: !!binary aGVsbG8=",
    "name: &x\n  - *x",
    "name: ok\nservices:\n  web:\n    command: x\n    <<: {port: 1}",
    "\ufeffname: ok",
    "name: ok\x00",
    "\t name: ok",
    "name: 'unterminated",
    "%YAML 9.9\n---\nname: ok",
    "? [a, b]\n: c",
    "name: ok\n" + "x: 1\n" * 5000,
]


def _bounds(info: FieldInfo) -> list[int]:
    edges: list[int] = []
    for m in info.metadata:
        for kind, attr in ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (Lt, "lt")):
            if isinstance(m, kind):
                v = int(getattr(m, attr))
                edges += [v - 1, v, v + 1]
    return edges


def _is_duration(info: FieldInfo | None) -> bool:
    return info is not None and any(isinstance(m, BeforeValidator) for m in info.metadata)


def value_of(tp: Any, info: FieldInfo | None = None) -> st.SearchStrategy[Any]:
    """Values of the type a key is declared with (and near its bounds)."""
    origin = get_origin(tp)
    if tp is type(None):
        return st.none()
    if origin in (Union, types.UnionType):
        return st.one_of(*(value_of(a, info) for a in get_args(tp)))
    if origin is typing.Annotated:
        return value_of(get_args(tp)[0], info)
    if origin is Literal:
        return st.one_of(st.sampled_from(get_args(tp)), TEXT)
    if origin is list:
        return st.lists(value_of(get_args(tp)[0]), max_size=4)
    if origin is dict:
        key_t, val_t = get_args(tp)
        return st.dictionaries(
            KEYS if key_t is str else value_of(key_t), value_of(val_t), max_size=3
        )
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return model_doc(tp)
    if tp is bool:
        return st.booleans()
    if tp is int:
        edges = [*(_bounds(info) if info else []), 0, -1, 65535, 65536, 2**31, 2**63, 10**400]
        return st.one_of(st.sampled_from(edges), st.integers())
    if tp is float:
        numbers = st.one_of(st.floats(), st.integers(-(2**70), 2**70))
        return st.one_of(numbers, TEXT) if _is_duration(info) else numbers
    if tp is str:
        return TEXT
    raise TypeError(f"no generator for a config value of type {tp!r}: add one to value_of")


def model_doc(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    """A mapping for ``model``: each key maybe there, with its own kind of value or any
    YAML; sometimes a key it does not have; sometimes not a mapping at all."""

    @st.composite
    def draw(draw: st.DrawFn) -> Any:
        doc: dict[str, Any] = {}
        for name, info in model.model_fields.items():
            if not draw(st.booleans()):
                continue
            key = info.alias or name
            doc[key] = draw(st.one_of(value_of(info.annotation, info), ANY_YAML))
        if draw(st.integers(0, 9)) == 0:
            doc[draw(KEYS)] = draw(ANY_YAML)
        return doc

    return st.one_of(draw(), ANY_YAML) if model is not ProjectConfig else draw()


def _text(doc: Any, cut: int | None) -> str:
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    return text[: cut % (len(text) + 1)] if cut is not None else text


DOCUMENTS = st.one_of(
    st.builds(_text, model_doc(ProjectConfig), st.none()),
    st.builds(_text, model_doc(ProjectConfig), st.integers(0, 10_000)),
    st.builds(_text, ANY_YAML, st.none()),
    st.sampled_from(HOSTILE),
    st.text(max_size=200),
)


def check_parse(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError as exc:
        message = str(exc)
        assert message.strip(), f"an empty message for {text[:300]!r}"
        assert len(message) <= MAX_MESSAGE, f"a {len(message)}-character message: {message[:300]}"
        assert "Traceback" not in message, message


# ------------------------------------------------------------------------ the tests


def _walk(model: type[BaseModel], seen: set[str]) -> None:
    for name, info in model.model_fields.items():
        seen.add(f"{model.__name__}.{name}")
        value_of(info.annotation, info)  # raises for a type the generator does not know
        for arg in [info.annotation, *typing.get_args(info.annotation)]:
            for inner in [arg, *get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    _walk(inner, seen)


def test_every_key_is_generated() -> None:
    seen: set[str] = set()
    _walk(ProjectConfig, seen)
    # The walk reaches the nested sections and services too.
    assert {"ProjectConfig.name", "Service.command", "HealthCheck.interval"} <= seen


@settings(
    max_examples=EXAMPLES * 25,
    deadline=timedelta(seconds=10),  # a hang detector, not a speed test
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(text=DOCUMENTS)
@example(text=HOSTILE[7])
@example(text=HOSTILE[8])
def test_parse_config_answers_every_document(text: str) -> None:
    check_parse(text)


def test_hostile_documents() -> None:
    for text in HOSTILE:
        check_parse(text)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(text=DOCUMENTS, binary=st.booleans())
def test_config_validate_cli_answers_every_document(text: str, binary: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="vd-fuzz-") as tmp:
        path = Path(tmp) / "config.yaml"
        data = text.encode()
        if binary:  # not UTF-8 any more
            data = data[:50] + b"\xff\xfe\x00\x80" + data[50:]
        path.write_bytes(data)
        proc = subprocess.run(
            [str(VENDETTA), "config", "validate", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "HOME": tmp, "NO_COLOR": "1", "COLUMNS": "200"},
        )
    output = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), f"exit {proc.returncode}: {output[-2000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert output.strip(), "no message"
    assert len(output) <= MAX_MESSAGE * 2, f"{len(output)} characters of output"

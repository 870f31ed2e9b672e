"""What the CLI prints is the text it was given: no emoji codes, no markup."""

from __future__ import annotations

import pytest

from cli import output


def test_an_error_prints_colons_and_brackets_as_they_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    message = "certificate SHA256:AB:CD:EF:smile: is not pinned [/x]"
    output.print_error(message)
    assert message in " ".join(capsys.readouterr().err.split())

"""Run a command's coroutine; turn errors into one clear line and an exit code."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio
import typer

from cli.client import error_of
from cli.output import print_error
from common.errors import VendettaError

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _error(exc: grpc.aio.AioRpcError) -> VendettaError:
    return error_of(exc)


def fail(exc: VendettaError) -> NoReturn:
    """Report an error found on the CLI's side the way run() reports the server's."""
    print_error(str(exc))
    raise typer.Exit(EXIT_ERROR)


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except VendettaError as exc:
        print_error(str(exc))
        raise typer.Exit(EXIT_ERROR) from None
    except grpc.aio.AioRpcError as exc:
        print_error(str(_error(exc)))
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None

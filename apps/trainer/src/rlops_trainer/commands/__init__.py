"""Typer sub-commands that the ``rlops`` command mounts through the ``rlops.commands`` entry points."""

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# Errors only; each command module keeps its own stdout console, so that one command's rendering
# state never leaks into another's output.
err_console = Console(stderr=True)


def group(name: str, help: str) -> typer.Typer:
    """A command group as every rlops sub-command builds it."""
    return typer.Typer(
        name=name, help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False
    )


def fail(message: str) -> NoReturn:
    """Bad input: one red line on stderr naming what was wrong, and exit code 2 (no traceback)."""
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)

"""``rlops``: one command whose sub-commands come from the installed packages.

Each package (trainer, server, …) declares its sub-commands in the ``rlops.commands`` entry-point
group: a ``typer.Typer`` becomes a command group, a plain function a single command. Neither app
imports the other; this package only composes them.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

import typer

GROUP = "rlops.commands"


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="rlops",
        help="Take a reinforcement-learning policy from data to production and keep it healthy there.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_show_locals=False,
    )
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            target = ep.load()
        except ImportError as e:
            # One broken package must not take every other command down with it; its own command
            # says what is wrong when it is used.
            app.command(name=ep.name, help=f"(unavailable: {e})", add_help_option=False)(_broken(ep, e))
            continue
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=ep.name)
        elif callable(target):
            app.command(name=ep.name)(target)
        else:
            raise TypeError(f"entry point {ep.name} = {ep.value} is neither a typer.Typer nor a function")
    return app


def _broken(ep: EntryPoint, error: ImportError) -> Callable[[], None]:
    def unavailable() -> None:
        package = ep.dist.name if ep.dist is not None else ep.value.split(":")[0]
        typer.echo(
            f"rlops {ep.name} is unavailable: {ep.value} (package {package}) failed to import: {error}. "
            "Reinstall it (make venv) or fix the import.",
            err=True,
        )
        raise typer.Exit(1)

    return unavailable


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()

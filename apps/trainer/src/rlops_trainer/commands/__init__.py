"""Typer sub-commands that the ``rlops`` command mounts through the ``rlops.commands`` entry points."""

"""``rlops`` sub-commands of the stack package, mounted through the ``rlops.commands`` entry points.

``group`` and ``fail`` are the server package's, so every rlops command looks and fails alike.
"""

from rlops_server.commands import err_console, fail, group

__all__ = ["err_console", "fail", "group"]

"""``rlops`` sub-commands of the server package, mounted through the ``rlops.commands`` entry points."""

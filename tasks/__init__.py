"""Prefect tasks: thin wrappers, one call into ``models`` or one side effect each, the same for
every model family."""

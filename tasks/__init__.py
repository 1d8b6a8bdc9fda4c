"""Prefect tasks: thin wrappers, one call into ``models`` or one side effect each (issue 3)."""

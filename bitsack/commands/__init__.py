"""Subcommands of the ``bitsack`` CLI, one module each (see ``bitsack.cli``)."""

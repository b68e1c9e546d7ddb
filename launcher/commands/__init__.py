"""Subcommands of the ``decentlam`` CLI, one module each."""

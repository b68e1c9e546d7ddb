"""Errors that the CLI reports as a one-line message with exit status 2 (never a traceback)."""

from __future__ import annotations


class UsageError(Exception):
    """A user mistake (bad flag value, missing file, invalid manifest...).

    The CLI prints ``decentlam: error: <message>`` and exits with status 2.
    """

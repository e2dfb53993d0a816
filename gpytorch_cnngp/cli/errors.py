"""The exception of the ``cnngp`` command for an expected problem, reported in one line."""

from __future__ import annotations


class UserError(Exception):
    """An expected problem with the command line or its inputs: reported as one message, exit status 1."""

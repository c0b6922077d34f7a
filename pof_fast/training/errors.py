"""The error a run reports to the user in one line."""
from __future__ import annotations

__all__ = ["RunError"]


class RunError(Exception):
    """A problem with the user's input (paths, arguments, files) that the command line reports in one line."""

"""Errors the user can fix, which the console prints as one line instead of a traceback."""

from __future__ import annotations


class ConfigurationError(ValueError):
    """An option or input folder is wrong; the message names the option and the fix."""

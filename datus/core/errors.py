"""Errors the user can fix, which the console prints as one line instead of a traceback."""

from __future__ import annotations


class ConfigurationError(ValueError):
    """An option or input folder is wrong; the message names the option and the fix."""


def one_line(text: str) -> str:
    """``text`` with control and other unprintable characters as escapes (``\\n``, ``\\x1b``).

    File names are untrusted: one holding a newline or a terminal escape must not start a
    console line of its own or recolour the terminal. Printable characters, accents and
    scripts included, stay as they are.
    """
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)

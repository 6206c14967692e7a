"""The one family of user errors: bad input, configuration, paths. `drseg` prints them as one line, exit status 2.

Each also derives from the built-in exception it refines (ValueError, FileNotFoundError, FileExistsError), so library
callers can catch either. Anything that is not a DrsegError is a bug and keeps its traceback. Standard library only.
"""

from __future__ import annotations


class DrsegError(Exception):
    """A user error; the message names the file, key or value and says how to fix it."""


class InputError(DrsegError, ValueError):
    """A value, argument or file content is wrong."""


class MissingError(DrsegError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class ExistsError(DrsegError, FileExistsError):
    """An output already exists and the command will not replace it unasked."""

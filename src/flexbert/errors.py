"""The one base of every error this project raises about its input (a config, data, a checkpoint, a
path). Each entry point catches :class:`FlexBertError` and prints its message as one line; anything
else is a bug, and keeps its traceback.

Each subclass also derives from the built-in exception it refines (``ValueError``,
``FileNotFoundError`` ...), so callers that catch those keep working.
"""

from __future__ import annotations


class FlexBertError(Exception):
    """Bad input named in one line: what is wrong, and where."""


class MissingFileError(FlexBertError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class InteropError(FlexBertError, ValueError):
    """A model or checkpoint cannot be converted between this project and Hugging Face."""


class RunFolderError(FlexBertError, ValueError):
    """A run folder lacks what a command reads from it (metrics to plot, a recorded step ...)."""


class CheckpointError(FlexBertError, ValueError):
    """A checkpoint cannot be read, or does not fit what it is used with."""

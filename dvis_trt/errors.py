"""The one error type the CLI turns into a single clear line and a non-zero exit."""
from __future__ import annotations


class DvisTrtError(Exception):
    """A user-facing error: ``str(err)`` says what went wrong, where, and what to do.

    The CLI prints it as one line (``dvis-trt: error: ...``) and exits with ``exit_code``
    (2 by default) instead of showing a traceback.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(DvisTrtError):
    """Bad user input: unreadable/empty video, unsupported pixel format, bad path or option."""


class CheckpointError(DvisTrtError):
    """A checkpoint that does not match the config (missing / unexpected / mis-shaped keys)."""


class BundleError(DvisTrtError):
    """A bundle or engine that is missing, corrupt, stale or built for another machine."""


class DependencyError(DvisTrtError):
    """An optional dependency (torch, tensorrt, plugin library, ...) is needed but missing."""

"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""


class KilnError(Exception):
    """Base class of kiln's user-facing errors."""


class ModelError(KilnError):
    """The model file is not usable: unknown architecture, missing or mis-shaped tensor."""


class ContextOverflowError(KilnError, ValueError):
    """A prompt does not fit in the context window."""


class CacheRewindError(KilnError, ValueError):
    """A sequence cannot continue from the position asked: its sliding-window cache (a
    ring of the last positions) no longer holds the window before it."""


class ConvertError(KilnError):
    """A checkpoint the converter cannot handle; the message is one line saying what is
    wrong and what is supported."""

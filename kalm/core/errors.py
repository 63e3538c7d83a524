"""One exception type for user mistakes: the CLI prints it as a single line, never a traceback."""


class KalmError(Exception):
    """A user-facing error (bad config, missing file, unknown recipe). Never retried."""


class TransientIOError(OSError):
    """An I/O error worth retrying (network blip, throttled object store)."""

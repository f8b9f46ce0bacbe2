"""User-facing errors: the CLI prints these as one line, without a traceback."""


class ImgclsError(Exception):
    """A problem the user can fix (bad input, missing file, wrong flag); printed without a traceback."""


class ImageDecodeError(ImgclsError):
    """Bytes that are not a decodable image, or one too large to decode safely."""


class DecodeMemoryError(ImageDecodeError):
    """The decode ran out of the memory it may use (a decode worker's address-space bound, or the host)."""


class ManifestError(ImgclsError):
    """A manifest that is missing, unreadable or does not match the schema; names the field."""


class DecodeAborted(ImgclsError):
    """A decode stopped before it finished: its deadline passed, it was cancelled, or it ran past the hard bound.

    `reason` is one of "deadline", "cancelled", "cpu" (the worker was killed at the CPU-time bound), "memory"
    (the server-wide decode memory budget stayed full until the deadline) or "closed" (the pool shut down),
    so the server can map each to its own status code.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

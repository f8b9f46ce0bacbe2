"""User-facing errors: the CLI prints these as one line, without a traceback."""


class ImgclsError(Exception):
    """A problem the user can fix (bad input, missing file, wrong flag); printed without a traceback."""


class ImageDecodeError(ImgclsError):
    """Bytes that are not a decodable image, or one too large to decode safely."""


class ManifestError(ImgclsError):
    """A manifest that is missing, unreadable or does not match the schema; names the field."""

"""The exception hierarchy of dicomfs and its mapping to errno.

Every module raises one of these; the FUSE layer and the CLI are the only places that turn them
into an errno or an exit status. Messages are one line and never contain secrets.
"""

from __future__ import annotations

import errno


class DicomfsError(Exception):
    """Base class. ``errno`` is what a FUSE request failing with this error returns."""

    errno: int = errno.EIO


class UsageError(DicomfsError):
    """The user asked for something impossible (bad source, bad option, bad mount point)."""

    errno = errno.EINVAL


class NotFound(DicomfsError):
    """No such study, series, instance or path."""

    errno = errno.ENOENT


class NotADirectory(DicomfsError):
    errno = errno.ENOTDIR


class SourceError(DicomfsError):
    """The archive failed to answer (network error, HTTP error, timeout)."""


class SourceUnavailable(SourceError):
    """The archive could not be reached at all."""


class AccessRefused(SourceUnavailable):
    """The archive refused our credentials (HTTP 401/403): not an outage to ride out offline."""


class ProtocolError(SourceError):
    """The archive answered, but with something malformed or hostile."""


class IntegrityError(SourceError):
    """Bytes from the archive contradict what was announced (size, CRC32C)."""


class OutputError(DicomfsError):
    """An output folder cannot be written (permissions, full disk, a file in the way)."""


class CacheError(DicomfsError):
    """The local cache is unusable (locked by another daemon, not writable)."""

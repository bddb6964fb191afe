"""The exception hierarchy of dicomfs and its mapping to errno.

Every module raises one of these; the FUSE layer, the DICOMweb server and the CLI are the only
places that turn them into an errno, an HTTP status or an exit status. Messages are one line and never contain secrets.
"""

from __future__ import annotations

import errno


class DicomfsError(Exception):
    """Base class. ``errno`` is what a FUSE request failing with this error returns,
    ``http_status`` what an HTTP request (``dicomfs serve``) does."""

    errno: int = errno.EIO
    http_status: int = 502  # (most failures are the archive's: a bad gateway)


class UsageError(DicomfsError):
    """The user asked for something impossible (bad source, bad option, bad mount point)."""

    errno = errno.EINVAL
    http_status = 400


class NotFound(DicomfsError):
    """No such study, series, instance or path."""

    http_status = 404

    errno = errno.ENOENT


class NotADirectory(DicomfsError):
    errno = errno.ENOTDIR
    http_status = 404


class SourceError(DicomfsError):
    """The archive failed to answer (network error, HTTP error, timeout)."""


class SourceUnavailable(SourceError):
    """The archive as a whole is not working: unreachable, timed out, too slow, overloaded (HTTP
    429/502/503/504). Listings fall back to the stored catalog, and the breaker opens."""

    http_status = 503


class AccessRefused(SourceUnavailable):
    """The archive refused our credentials (HTTP 401/403): not an outage to ride out offline."""

    http_status = 502


class TransferBroken(SourceError):
    """A transfer that had started broke off (connection reset, body cut short): a download may
    resume it."""


class ProtocolError(SourceError):
    """The archive answered, but with something malformed or hostile."""


class IntegrityError(SourceError):
    """Bytes from the archive contradict what was announced (size, CRC32C)."""


class OutputError(DicomfsError):
    """An output folder cannot be written (permissions, full disk, a file in the way)."""

    http_status = 500


class CacheError(DicomfsError):
    """The local cache is unusable (locked by another daemon, not writable, full)."""

    http_status = 507


class Interrupted(DicomfsError):
    """The process a request was waiting for is being killed: its answer no longer matters."""

    errno = errno.EINTR
    http_status = 503


class WaitTimeout(DicomfsError):
    """A request waited longer than ``--read-timeout`` (the download goes on)."""

    http_status = 504

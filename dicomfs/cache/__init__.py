"""The disk cache of series blobs, shared by every process that uses one cache directory.

One module per job (docs/architecture.md has the table; docs/cache.md the design):
``layout`` names every path and key, ``disk`` holds the files, locks and pins, ``download``
writes a running download, ``handles`` reads an open instance, ``store`` is the policy
(``BlobStore``), ``admin`` the directory as a whole (``cache stats|verify|clear``). The names
other modules use are re-exported here.
"""

from dicomfs.cache.admin import (
    CacheStats,
    CacheUse,
    VerifyReport,
    caches_under,
    clear,
    fit_size_limit,
    label,
    make_private,
    stats,
    stored_size_limit,
    verify,
)
from dicomfs.cache.download import SeriesDownload, ThreadSink
from dicomfs.cache.handles import InstanceHandle
from dicomfs.cache.layout import Manifest
from dicomfs.cache.store import BlobStore

__all__ = [
    "BlobStore",
    "CacheStats",
    "CacheUse",
    "InstanceHandle",
    "Manifest",
    "SeriesDownload",
    "ThreadSink",
    "VerifyReport",
    "caches_under",
    "clear",
    "fit_size_limit",
    "label",
    "make_private",
    "stats",
    "stored_size_limit",
    "verify",
]

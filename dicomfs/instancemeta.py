"""An instance's metadata (DICOM JSON) read from its Part 10 bytes: a file, or a range of a blob.

Owns reading the header with pydicom, large values left unread (deferred), for the archives that
have no metadata service of their own: folders (their files) and DIMSE PACS (the instances a
retrieve brought into the cache). Blocking: callers run it in a worker thread. Must not decide
where the bytes come from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from dicomfs.dicomread import RangeFile, read_dataset
from dicomfs.errors import SourceError
from dicomfs.localfile import open_regular
from dicomfs.records import DicomJson


def metadata(path: Path | None = None, *, fd: int | None = None, offset: int = 0, length: int = 0) -> DicomJson:
    """The DICOM JSON of the instance in file ``path``, or in ``length`` bytes of ``fd`` from
    ``offset``. Blocking."""
    from dicomfs.dicomjson import BULK_THRESHOLD, dataset_json

    own = None
    source: BinaryIO | RangeFile
    if path is not None:
        own = open_regular(path)
        # A named file (buffered reads, 10-15 % faster than pread of each piece): by the name of
        # the descriptor, which pydicom opens again for a deferred value, as long as it is open
        # (the same file whatever is put in its place since).
        source, what = open(f"/proc/self/fd/{own}", "rb"), str(path)  # noqa: SIM115 (closed below)
    else:  # (not in a BufferedReader: pydicom would take it for a named file and reopen it by name)
        assert fd is not None
        source, what = RangeFile(fd, offset, length), "a cached instance"
    try:
        ds = read_dataset(source, defer_size=BULK_THRESHOLD)
        return dataset_json(ds)
    except Exception as exc:  # pydicom raises many kinds of errors for broken files
        raise SourceError(f"{what} is not readable as DICOM: {exc}") from None
    finally:
        if own is not None:
            source.close()
            os.close(own)

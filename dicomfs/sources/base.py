"""The source protocol: what every archive implementation provides, and nothing more.

A source lists studies, series and instances as records and delivers a series' bytes into a
``SeriesSink`` provided by the blob store. It must not cache blobs, know about FUSE, or keep
state that the catalog owns.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from dicomfs.records import DicomJson, FrameTable, InstanceRecord, SeriesRecord, StudyRecord

if TYPE_CHECKING:
    from dicomfs.query import Term


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "dicomweb" | "cod" | "dimse" | "idc" | "folder" | "demo"
    location: str  # URL without credentials, or an absolute folder path
    endpoint: str | None = None  # where the location is served from, when the source names it
    token: str | None = field(default=None, repr=False)  # a token that came with the source URL

    @property
    def source_id(self) -> str:
        """A stable, readable, file-name-safe identifier, used for the default cache dir."""
        readable = re.sub(r"[^A-Za-z0-9.-]+", "_", self.location.split("://")[-1]).strip("_")
        digest = hashlib.sha256(f"{self.kind}:{self.location}".encode()).hexdigest()[:10]
        return f"{self.kind}-{readable[-40:]}-{digest}"


@dataclass(frozen=True)
class Credentials:
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never print secrets, even in a traceback
        return f"Credentials(user={self.user!r}, password=***, token=***)"


class MemberWriter(Protocol):
    """Receives one instance's bytes, in order."""

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes; the writer may keep ``data`` until written, so it must not change."""
        ...

    async def finish(self) -> None: ...


class BlockingMemberWriter(Protocol):
    """``MemberWriter`` for a retrieve running in a worker thread: writes as it is called."""

    def write(self, data: bytes | memoryview) -> None:
        """Take the next bytes (written before this returns: ``data`` may change afterwards)."""
        ...

    def finish(self) -> None: ...


class BlockingSink(Protocol):
    """A ``SeriesSink`` as a retrieve running in one worker thread sees it (called from that
    thread only): the bytes are checked and written in the thread."""

    def arrived(self, size: int) -> None: ...

    def wants(self, key: str) -> bool: ...

    def begin(self, key: str, size: int | None) -> BlockingMemberWriter: ...

    def publish(self) -> None:
        """Make the instances finished so far readable: one trip to the event loop for all of
        them. Call after each piece read from the archive."""
        ...


class SeriesSink(Protocol):
    """Where a source delivers the instances of a series as they arrive."""

    def in_thread(self) -> BlockingSink:
        """This sink for a retrieve that runs in one worker thread (``tasks.run_stoppable``);
        asked for on the event loop, before the thread starts."""
        ...

    def arrived(self, size: int) -> None:
        """``size`` more bytes came from the archive (kept or not): the download's progress, by
        which a stalled or trickling archive is told from a slow but working one."""
        ...

    def wants(self, key: str) -> bool:
        """False if this instance is already stored (a resumed download may skip it)."""
        ...

    def awaited(self) -> Collection[str]:
        """The instances readers are waiting for now: a source that fetches a series piece by
        piece (an object per instance) takes these next."""
        ...

    async def begin(self, key: str, size: int | None) -> MemberWriter: ...


class Source(Protocol):
    """Optionally also ``local_listings = True``: studies and series are listed from local data
    (the IDC index), so the catalog does not keep them in its store, and a series' listing is
    all the archive can tell of it (a search does not look on its instances for more).
    Optionally ``searches_may_stop_short = True``: the archive may answer a series' instance
    search (a study's series search) with fewer than its series (study) search counts, without
    saying so, and its metadata service has them all: ``series_metadata`` (``MetadataSource``) and
    ``study_metadata(study_uid)``, from which the catalog completes the listing."""

    description: str  # safe to log: no credentials
    serves_files_in_place: bool  # every instance has a ``local_file``: nothing to cache

    async def check(self) -> None:
        """Raise SourceError if the archive cannot be used (unreachable, auth refused)."""

    async def list_studies(self) -> list[StudyRecord]: ...

    async def list_series(self, study_uid: str) -> list[SeriesRecord]: ...

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]: ...

    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        """Deliver every instance of ``series`` to ``sink``, telling it of every byte that
        arrives (``arrived``); raise SourceError on failure (``TransferBroken`` if the transfer
        broke off, so that the download may resume it). Retry nothing: the HTTP layer's one
        policy retries requests, the blob store resumes transfers."""

    def local_file(self, instance: InstanceRecord) -> Path | None:
        """A local file holding exactly this instance's bytes, if the source has one."""

    async def aclose(self) -> None: ...


@runtime_checkable
class MetadataSource(Protocol):
    """A source with a metadata service: every instance's attributes without its bytes (WADO-RS
    metadata, COD's index, a folder's headers). A source without one (DIMSE) has its series'
    metadata read from the instances a retrieve brings."""

    async def series_metadata(self, series: SeriesRecord) -> dict[str, DicomJson]:
        """Every instance's full DICOM JSON, by instance key, without fetching instance data.

        As the archive has it: it may hold group 0002, the archive's own BulkDataURIs or odd
        spellings; ``dicomjson.normalise`` makes it canonical.
        """
        ...


@runtime_checkable
class InstanceFetcher(Protocol):
    """A source that can deliver one instance much more cheaply than its whole series."""

    async def fetch_instance(self, instance: InstanceRecord, sink: SeriesSink) -> None: ...



@runtime_checkable
class FrameRangeReader(Protocol):
    """A source that says where an instance's frames lie without reading it, and reads any range
    of an instance (COD: the offset tables of its index, Range requests into the tar): a tile of
    a large slide level is then one small request, not the level."""

    async def frame_table(self, instance: InstanceRecord) -> FrameTable | None:
        """What the archive says of the instance's frames (unchecked), or None if it says nothing."""
        ...

    async def read_instance_range(self, instance: InstanceRecord, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of the instance from ``offset`` (within its recorded size)."""
        ...

@runtime_checkable
class KeepsProgress(Protocol):
    """A source that stores work in its cache directory while it is checked (a folder's index of
    the files it has read), worth keeping when the command is interrupted: a fresh cache that
    holds some is not removed as litter."""

    def stored_progress(self) -> bool: ...


@runtime_checkable
class FetchPreparer(Protocol):
    """A source whose retrieves need something made ready first (DIMSE: worker processes, which
    take a third of a second to start), told as soon as retrieves may come (a blob store will
    open)."""

    async def prepare_fetches(self) -> None: ...


@runtime_checkable
class StudySearcher(Protocol):
    """A source that can narrow a study listing on the archive's side (QIDO-RS, C-FIND)."""

    async def search_studies(self, terms: Sequence[Term], narrowing: Sequence[Term] = ()
                             ) -> tuple[list[StudyRecord], list[Term]]:
        """Studies the archive says match the study-level ``terms``, and the terms the caller must
        still check on them (those the archive could not be asked exactly, or may match loosely).
        ``narrowing``: series- and instance-level terms, which the caller checks on the series
        anyway; an archive that can may leave out the studies none of whose series match them
        (the IDC index: one row per series; it says so with ``narrows_by_series = True``, and is
        then asked for a search with such terms alone too), one that cannot ignores them."""
        ...


@runtime_checkable
class NotesSource(Protocol):
    """A source with words its users must read beside the data (IDC: which release the index is,
    and each collection's licenses)."""

    async def root_notes(self) -> dict[str, str]:
        """Files for the mount's root, by name (``VERSION.txt``)."""
        ...

    async def collection_notes(self, collection: str) -> dict[str, str]:
        """Files for a collection's folder, by name (``LICENSE.txt``); empty for an unknown one."""
        ...

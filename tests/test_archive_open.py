"""Opening an archive (``archive._open_checked``): the catalog and the blob store open in worker
threads while the archive is checked; what the user is told when the check or an opening fails;
going offline on a stored catalog; and that whatever was opened is closed again, also after a
failure or a cancellation. A scripted source; real caches in a temporary folder."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from dicomfs import archive
from dicomfs.archive import ArchiveOptions
from dicomfs.cache import BlobStore, layout
from dicomfs.catalog import Catalog
from dicomfs.errors import AccessRefused, CacheError, SourceUnavailable
from dicomfs.records import StudyRecord
from dicomfs.sources import Credentials, SourceOptions
from dicomfs.sources.base import SourceSpec


class Scripted:
    """A source whose check does what a test says; it lists nothing (it is down)."""

    description = "scripted archive"
    serves_files_in_place = False

    def __init__(self, check: Callable[[], Awaitable[None]]) -> None:
        self._check = check

    async def check(self) -> None:
        await self._check()

    async def list_studies(self) -> list[StudyRecord]:
        raise SourceUnavailable("cannot reach the archive (scripted)")


def options(tmp_path: Path) -> ArchiveOptions:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    return ArchiveOptions(SourceSpec("folder", str(tmp_path)), cache, Credentials(), SourceOptions(),
                          cache_size=1 << 30)


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the parts closed (by the exit stack), in order."""
    calls: list[str] = []
    for cls, name in ((Catalog, "catalog"), (BlobStore, "blobs")):
        original = cls.close

        def close(self: object, original: Callable[..., None] = original, name: str = name) -> None:
            if threading.current_thread() is threading.main_thread():
                calls.append(name)
            original(self)

        monkeypatch.setattr(cls, "close", close)
    return calls


async def open_checked(tmp_path: Path, check: Callable[[], Awaitable[None]],
                       closing: ExitStack) -> tuple[Catalog, BlobStore | None]:
    return await archive._open_checked(options(tmp_path), Scripted(check), closing)  # type: ignore[arg-type]


async def test_the_check_runs_while_the_cache_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    closed: list[str]) -> None:
    checking = threading.Event()
    seen: list[bool] = []
    original = Catalog.__init__

    def opening(self: Catalog, *args: object, **kwargs: object) -> None:
        seen.append(checking.wait(10))  # the check has begun although the catalog is not open yet
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    async def check() -> None:
        checking.set()

    monkeypatch.setattr(Catalog, "__init__", opening)
    with ExitStack() as closing:
        catalog, blobs = await open_checked(tmp_path, check, closing)
        assert isinstance(catalog, Catalog) and isinstance(blobs, BlobStore)
    assert seen == [True]
    assert closed == ["blobs", "catalog"]


async def test_refused_credentials_are_the_error_and_what_opened_is_closed(tmp_path: Path,
                                                                          closed: list[str]) -> None:
    async def check() -> None:
        raise AccessRefused("the archive refused access (HTTP 401): check credentials")

    with pytest.raises(AccessRefused), ExitStack() as closing:
        await open_checked(tmp_path, check, closing)
    assert sorted(closed) == ["blobs", "catalog"]


async def test_a_refused_check_is_reported_before_a_broken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 closed: list[str]) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise CacheError("cannot open the cache (scripted)")

    async def check() -> None:
        await trio.sleep(0.05)  # fails after the opening did
        raise AccessRefused("the archive refused access (HTTP 403): check credentials")

    monkeypatch.setattr("dicomfs.cache.store.open_indexes", broken)
    with pytest.raises(AccessRefused), ExitStack() as closing:
        await open_checked(tmp_path, check, closing)
    assert closed == ["catalog"]  # (the blob store never opened)


async def test_unreachable_with_nothing_stored_is_an_error(tmp_path: Path, closed: list[str]) -> None:
    async def check() -> None:
        raise SourceUnavailable("cannot reach the archive (scripted)")

    with pytest.raises(SourceUnavailable), ExitStack() as closing:
        await open_checked(tmp_path, check, closing)
    assert sorted(closed) == ["blobs", "catalog"]


async def test_unreachable_with_a_stored_catalog_goes_offline(tmp_path: Path, closed: list[str]) -> None:
    async def check() -> None:
        raise SourceUnavailable("cannot reach the archive (scripted)")

    stored = Catalog(Scripted(check), layout.paths(options(tmp_path).cache_dir).catalog)  # type: ignore[arg-type]
    await stored.remember_studies([StudyRecord("1.9", {})])  # what a prefetch stored
    stored.close()
    closed.clear()
    with ExitStack() as closing:
        catalog, blobs = await open_checked(tmp_path, check, closing)
        assert sorted(await catalog.studies()) == ["1.9"]
        assert blobs is not None
    assert closed == ["blobs", "catalog"]


async def test_a_cancelled_opening_closes_what_it_opened(tmp_path: Path, closed: list[str]) -> None:
    async def check() -> None:
        await trio.sleep_forever()  # an archive that does not answer

    with ExitStack() as closing:
        with trio.move_on_after(0.5) as scope:
            await open_checked(tmp_path, check, closing)
    assert scope.cancelled_caught
    assert sorted(closed) == ["blobs", "catalog"]

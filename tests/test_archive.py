"""Unit tests of ``dicomfs.archive.open_archive``: a cache directory it created is litter when the
archive fails, or the command is stopped, before use; not when the source stored work there."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from dicomfs import archive
from dicomfs.archive import ArchiveOptions
from dicomfs.errors import SourceUnavailable
from dicomfs.sources import Credentials, SourceOptions, SourceSpec


class Hanging:
    """A source whose check never ends (a host that says nothing), or fails, and that may have
    stored work in its cache directory by then."""

    description = "a hanging archive"
    serves_files_in_place = False

    def __init__(self, work_dir: Path, *, fail: bool = False, store: bool = False) -> None:
        self.work_dir, self.fail, self.store = work_dir, fail, store

    async def check(self) -> None:
        if self.store:
            (self.work_dir / "index.json").write_text("{}")
        if self.fail:
            raise SourceUnavailable("the archive does not answer")
        await trio.sleep_forever()

    def stored_progress(self) -> bool:
        return (self.work_dir / "index.json").exists()

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(("fail", "store", "kept"), [(False, False, False), (True, False, False),
                                                     (True, True, False), (False, True, True)],
                         ids=["stopped", "failed", "failed-with-work", "stopped-with-work"])
async def test_a_fresh_cache_is_kept_only_for_work_a_stopped_source_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool, store: bool, kept: bool) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(archive, "open_source",
                        lambda spec, credentials, work_dir, options: Hanging(work_dir, fail=fail, store=store))
    options = ArchiveOptions(SourceSpec("folder", str(tmp_path)), cache, Credentials(), SourceOptions())
    with trio.move_on_after(0.5):
        try:
            async with archive.open_archive(options):
                pytest.fail("the archive opened")
        except SourceUnavailable:
            assert fail
    assert cache.exists() == kept

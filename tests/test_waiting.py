"""Request waits: their deadline, a caller being killed (read from a /proc of our own), shutdown."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from dicomfs.errors import DicomfsError, Interrupted, WaitTimeout
from dicomfs.waiting import Waits

STATUS = "Name:\tcp\nState:\tD (disk sleep)\nSigPnd:\t{thread}\nShdPnd:\t{shared}\nSigBlk:\t0000000000000000\n"


def proc_with(tmp_path: Path, pid: int, thread: str = "0000000000000000", shared: str = "0000000000000000") -> Path:
    (tmp_path / str(pid)).mkdir(exist_ok=True)
    (tmp_path / str(pid) / "status").write_text(STATUS.format(thread=thread, shared=shared))
    return tmp_path


async def wait_in(waits: Waits, pid: int, outcome: list[BaseException]) -> None:
    try:
        with waits.bounded(pid, "open"):
            await trio.sleep_forever()
    except DicomfsError as exc:
        outcome.append(exc)


@pytest.mark.parametrize("field", ["thread", "shared"])
async def test_a_killed_caller_stops_the_wait_with_eintr(tmp_path: Path, field: str) -> None:
    proc = proc_with(tmp_path, 4242)
    waits = Waits(300, proc=proc)
    outcome: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waits.run)
        nursery.start_soon(wait_in, waits, 4242, outcome)
        nursery.start_soon(wait_in, waits, 4343, outcome)  # no such process: never interrupted
        await trio.sleep(1.2)
        assert outcome == [] and waits.waiting == 2
        proc_with(tmp_path, 4242, **{field: "0000000000000100"})  # SIGKILL pending
        with trio.fail_after(3):
            while not outcome:
                await trio.sleep(0.05)
        assert isinstance(outcome[0], Interrupted) and outcome[0].errno == errno.EINTR
        assert waits.waiting == 1
        proc_with(tmp_path, 4242, thread="0000000000000002")  # SIGINT handled: not a reason
        nursery.cancel_scope.cancel()


async def test_a_handled_signal_does_not_interrupt(tmp_path: Path) -> None:
    waits = Waits(300, proc=proc_with(tmp_path, 7, thread="0000000000004002"))  # SIGINT, SIGTERM pending
    outcome: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waits.run)
        nursery.start_soon(wait_in, waits, 7, outcome)
        await trio.sleep(1.5)
        assert outcome == []
        nursery.cancel_scope.cancel()


async def test_the_deadline_and_shutdown(tmp_path: Path) -> None:
    waits = Waits(0.3, proc=tmp_path)
    outcome: list[BaseException] = []
    with trio.fail_after(5):
        await wait_in(waits, 1, outcome)
    assert isinstance(outcome[0], WaitTimeout) and outcome[0].errno == errno.EIO
    assert "--read-timeout" in str(outcome[0])

    waits = Waits(300, proc=tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_in, waits, 1, outcome)
        await trio.sleep(0.1)
        waits.cancel_all()
    await wait_in(waits, 1, outcome)  # a request after the shutdown began fails at once
    assert [type(e) for e in outcome[1:]] == [DicomfsError, DicomfsError]
    assert all("shutting down" in str(e) for e in outcome[1:])


async def test_a_wait_that_ends_in_time_is_untouched(tmp_path: Path) -> None:
    waits = Waits(5, proc=tmp_path)
    with waits.bounded(1, "getattr"):
        await trio.sleep(0.01)
    assert waits.waiting == 0

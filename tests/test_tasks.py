"""Unit tests of ``dicomfs.tasks.map_bounded``: results in order, at most the limiter's tokens at
work (also when others hold some), a failure raised plainly, and as many tasks as tokens however
many items (a task per item held ~10 KB each while it waited: a search of 22,731 IDC studies)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dicomfs.errors import SourceError
from dicomfs.tasks import map_bounded


async def test_every_item_in_order_with_at_most_the_limit_at_work_in_as_many_tasks() -> None:
    limit = trio.CapacityLimiter(4)
    running = most = 0
    tasks: set[trio.lowlevel.Task] = set()

    async def call(item: int) -> int:
        nonlocal running, most
        tasks.add(trio.lowlevel.current_task())
        running += 1
        most = max(most, running)
        await trio.sleep(0.001 * (item % 3))
        running -= 1
        return item * 2

    items = list(range(2_000))
    assert await map_bounded(items, call, limit) == [item * 2 for item in items]
    assert most == 4 and len(tasks) == 4


async def test_a_shared_limiter_bounds_every_map_together() -> None:
    limit = trio.CapacityLimiter(3)
    running = most = 0

    async def call(item: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await trio.sleep(0.001)
        running -= 1
        return item

    results: list[list[int]] = []

    async def one(items: list[int]) -> None:
        results.append(await map_bounded(items, call, limit))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, list(range(50)))
        nursery.start_soon(one, list(range(50, 90)))
    assert most == 3 and sorted(map(tuple, results)) == [tuple(range(50)), tuple(range(50, 90))]


async def test_a_failure_is_raised_plainly_and_stops_the_rest() -> None:
    started: list[int] = []

    async def call(item: int) -> int:
        started.append(item)
        if item == 5:
            raise SourceError("item 5 failed")
        await trio.sleep(0.01)
        return item

    with pytest.raises(SourceError, match="item 5 failed"):
        await map_bounded(list(range(1_000)), call, trio.CapacityLimiter(2))
    assert len(started) < 20


async def test_nothing_to_do_and_an_unbounded_limiter() -> None:
    async def call(item: int) -> int:
        return -item

    assert await map_bounded([], call, trio.CapacityLimiter(4)) == []
    assert await map_bounded([1, 2, 3], call, trio.CapacityLimiter(float("inf"))) == [-1, -2, -3]
